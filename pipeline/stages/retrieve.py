"""retrieve: first-stage runs for every query of one collection → the ``candidates`` table and a TREC run file
per method (``<paths.retrieval>/<collection>/runs/<method>.trec``).

Every split is retrieved (BM25 costs milliseconds a query): ``evaluate`` keeps the evaluation split, the
teacher labels the training split, so neither re-runs retrieval when the other's split changes.

Methods: ``pipeline.retrievers`` (bm25, bm25-rm3, dense, splade, bm25+rerank, rrf). ``dense`` reads the folder the
``encode`` stage wrote (``<paths.dense>/<collection>``); ``rrf`` computes the inputs it fuses that are not in
``retrieve.methods`` itself, without writing them.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from pipeline import schemas
from pipeline.config import Params, Paths, RetrieveConfig
from pipeline.io import ParquetChunkWriter, copy_parquet, read_table, write_trec_run_from_parquet
from pipeline.lucene import set_jvm_max_heap
from pipeline.retrievers import QUERY_ID_ORDER, retrieve_chunks

RUNS_FOLDER = "runs"


def run(name: str, cfg: RetrieveConfig, paths: Paths, chunk_queries: int = 1000) -> dict:
    """Retrieve every query of ``name``, ``chunk_queries`` at a time.

    Each method's rows go to a spill file of their own as the chunks come (in the system's temporary folder),
    which are then copied one after the other into the candidates table (the ``QUERY_ID_ORDER`` methods' sorted
    by DuckDB, out of core), so that the table is the one retrieving every query at once gives, whatever the
    chunk size; each TREC run is sorted out of core from its spill file.
    """
    queries = read_table(paths.collection_dir(name) / schemas.TABLES["queries"].filename)
    out = paths.retrieval_dir(name)
    methods = list(dict.fromkeys(cfg.methods_for(name)))
    spec = schemas.TABLES["candidates"]
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"distillrank-retrieve-{name}-") as spill_dir:
        spills = {method: Path(spill_dir) / f"{index}.parquet" for index, method in enumerate(methods)}
        with contextlib.ExitStack() as stack:
            writers = {m: stack.enter_context(ParquetChunkWriter(path, spec.schema)) for m, path in spills.items()}
            for _, runs in retrieve_chunks(name, methods, queries, cfg.depth, cfg, paths, chunk_queries, seconds):
                for method, run_frame in runs.items():
                    writers[method].write(run_frame.assign(method=method, collection=name))
        for method, path in spills.items():
            write_trec_run_from_parquet(path, out / RUNS_FOLDER / f"{method}.trec", tag=method)
        with ParquetChunkWriter(out / spec.filename, spec.schema) as candidates:
            sort = [spills[m] for m in methods if m in QUERY_ID_ORDER]
            copy_parquet(list(spills.values()), candidates, sort_by_query=sort)
    return {
        "collection": name,
        "queries": queries["split"].value_counts().sort_index().to_dict(),
        "candidates": candidates.rows,
        "methods": methods,
        "seconds": {method: seconds[method] for method in methods},
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    params.collection(name)
    set_jvm_max_heap(params.scale.jvm_max_heap)
    return run(name, params.retrieve, params.paths, params.scale.chunk_queries)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("retrieve", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
