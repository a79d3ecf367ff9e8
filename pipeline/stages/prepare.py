"""prepare: load one collection into the ``corpus``, ``queries``, ``qrels`` and ``shipped_runs`` tables, from a
BEIR-layout folder or (``format: r2r-jsonl``) a Reason-to-Rank teacher file.

All four files are validated first and then written atomically, so a bad input leaves no partial table.
"""

from __future__ import annotations

import sys
import time

from pipeline import schemas
from pipeline.config import CollectionConfig, Params, Paths, PrepareConfig
from pipeline.io import write_table
from pipeline.sources import load_beir_folder, load_r2r_file


def run(name: str, cfg: CollectionConfig, prepare: PrepareConfig, paths: Paths) -> dict:
    started = time.perf_counter()
    if cfg.format == "r2r-jsonl":
        collection = load_r2r_file(cfg.source, name)
    else:
        collection = load_beir_folder(cfg.source, name, prepare.on_unknown_qrels)
    out = paths.collection_dir(name)
    tables = {
        "corpus": collection.corpus,
        "queries": collection.queries,
        "qrels": collection.qrels,
        "shipped_runs": collection.shipped_runs,
    }
    for table, frame in tables.items():
        spec = schemas.TABLES[table]
        write_table(frame, spec.schema, out / spec.filename)
    return {
        "collection": name,
        "source": cfg.source,
        "documents": len(collection.corpus),
        "queries": collection.queries["split"].value_counts().sort_index().to_dict(),
        "qrels": collection.qrels["split"].value_counts().sort_index().to_dict(),
        "unknown_qrels": collection.unknown_qrels,
        "shipped_runs": sorted(collection.shipped_runs["run"].unique().tolist()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    return run(name, params.collection(name), params.prepare, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("prepare", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
