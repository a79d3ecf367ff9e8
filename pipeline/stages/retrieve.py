"""retrieve: first-stage runs for one evaluation collection's queries → the ``candidates`` table and a TREC
run file per method (``<paths.retrieval>/<collection>/runs/<method>.trec``)."""

from __future__ import annotations

import sys
import time

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, EvaluationCollection, Params, Paths, RetrieveConfig
from pipeline.io import read_table, write_table, write_trec_run
from pipeline.lucene import bm25_search
from pipeline.sources import in_split

RUNS_FOLDER = "runs"


def split_queries(paths: Paths, name: str, split: str) -> pd.DataFrame:
    """The queries of ``split`` in collection ``name``; an empty split is an error naming the parameter."""
    queries = read_table(paths.collection_dir(name) / schemas.TABLES["queries"].filename)
    selected = queries[in_split(queries["split"], split)]
    if selected.empty:
        known = sorted({s for joined in queries["split"] for s in joined.split(",")})
        raise ConfigError(f"evaluation.{name}.split: no queries in split {split!r} (splits here: {known})")
    return selected.reset_index(drop=True)


def run(name: str, evaluation: EvaluationCollection, cfg: RetrieveConfig, paths: Paths) -> dict:
    queries = split_queries(paths, name, evaluation.split)
    out = paths.retrieval_dir(name)
    frames, timings = [], {}
    for method in cfg.methods:
        started = time.perf_counter()
        if method == "bm25":
            run_frame = bm25_search(paths.index_dir(name), queries, cfg.depth, cfg.bm25, cfg.threads)
        else:  # the config's Literal makes this unreachable; kept as a guard for new methods
            raise ConfigError(f"retrieve.methods: unknown method {method!r}")
        timings[method] = round(time.perf_counter() - started, 2)
        write_trec_run(run_frame, out / RUNS_FOLDER / f"{method}.trec", tag=method)
        frames.append(run_frame.assign(method=method, collection=name))
    candidates = pd.concat(frames, ignore_index=True)
    spec = schemas.TABLES["candidates"]
    write_table(candidates, spec.schema, out / spec.filename)
    return {
        "collection": name,
        "split": evaluation.split,
        "queries": len(queries),
        "candidates": len(candidates),
        "methods": list(cfg.methods),
        "seconds": timings,
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.evaluation:
        raise ConfigError(f"evaluation.{name}: not an evaluation collection (known: {sorted(params.evaluation)})")
    return run(name, params.evaluation[name], params.retrieve, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("retrieve", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
