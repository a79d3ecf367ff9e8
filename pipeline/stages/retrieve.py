"""retrieve: first-stage runs for every query of one collection → the ``candidates`` table and a TREC run file
per method (``<paths.retrieval>/<collection>/runs/<method>.trec``).

Every split is retrieved (BM25 costs milliseconds a query): ``evaluate`` keeps the evaluation split, the
teacher labels the training split, so neither re-runs retrieval when the other's split changes.

Methods: ``pipeline.retrievers`` (bm25, bm25-rm3, dense, splade, bm25+rerank, rrf). ``dense`` reads the folder the
``encode`` stage wrote (``<paths.dense>/<collection>``); ``rrf`` computes the inputs it fuses that are not in
``retrieve.methods`` itself, without writing them.
"""

from __future__ import annotations

import sys

import pandas as pd

from pipeline import schemas
from pipeline.config import Params, Paths, RetrieveConfig
from pipeline.io import read_table, write_table, write_trec_run
from pipeline.retrievers import retrieve

RUNS_FOLDER = "runs"


def run(name: str, cfg: RetrieveConfig, paths: Paths) -> dict:
    queries = read_table(paths.collection_dir(name) / schemas.TABLES["queries"].filename)
    out = paths.retrieval_dir(name)
    methods = cfg.methods_for(name)
    runs, timings = retrieve(name, methods, queries, cfg.depth, cfg, paths)
    frames = []
    for method, run_frame in runs.items():
        write_trec_run(run_frame, out / RUNS_FOLDER / f"{method}.trec", tag=method)
        frames.append(run_frame.assign(method=method, collection=name))
    candidates = pd.concat(frames, ignore_index=True)
    spec = schemas.TABLES["candidates"]
    write_table(candidates, spec.schema, out / spec.filename)
    return {
        "collection": name,
        "queries": queries["split"].value_counts().sort_index().to_dict(),
        "candidates": len(candidates),
        "methods": list(methods),
        "seconds": {method: timings[method] for method in runs},
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    params.collection(name)
    return run(name, params.retrieve, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("retrieve", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
