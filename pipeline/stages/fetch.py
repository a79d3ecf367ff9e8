"""fetch: export an ``ir_datasets`` collection to a BEIR-layout folder under ``paths.sources``.

A collection then names that folder as its ``source``, so DVC tracks the exported files like any other
folder, and ``prepare`` reads one layout only. ir_datasets downloads on first use: this stage needs a network
(or a dataset registered from local files, as the tests do).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.config import IrDatasetsExport, Params, Paths, PrepareConfig
from pipeline.sources import load_ir_datasets, write_beir_folder


def run(name: str, cfg: IrDatasetsExport, prepare: PrepareConfig, paths: Paths) -> dict:
    started = time.perf_counter()
    collection = load_ir_datasets(list(cfg.ids), name, prepare.on_unknown_qrels)
    folder = write_beir_folder(collection, Path(paths.sources) / name)
    return {
        "collection": name,
        "ids": list(cfg.ids),
        "folder": str(folder),
        "documents": len(collection.corpus),
        "queries": len(collection.queries),
        "qrels": len(collection.qrels),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.ir_datasets:
        from pipeline.config import ConfigError

        raise ConfigError(f"ir_datasets.{name}: not defined in params.yaml (known: {sorted(params.ir_datasets)})")
    return run(name, params.ir_datasets[name], params.prepare, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("fetch", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
