"""index: a pyserini Lucene index (BM25) of one collection's corpus, with positions, docvectors and raw
documents stored so that RM3 and later stages can use it."""

from __future__ import annotations

import sys
import time

from pipeline import schemas
from pipeline.config import IndexConfig, Params, Paths
from pipeline.io import read_table
from pipeline.lucene import build_index, index_stats


def run(name: str, cfg: IndexConfig, paths: Paths) -> dict:
    started = time.perf_counter()
    corpus = read_table(paths.collection_dir(name) / schemas.TABLES["corpus"].filename)
    index_dir = build_index(corpus, paths.index_dir(name), cfg)
    stats = index_stats(index_dir)
    if stats.documents != len(corpus):
        raise RuntimeError(f"{index_dir}: indexed {stats.documents} documents of {len(corpus)}")
    seconds = time.perf_counter() - started
    return {
        "collection": name,
        "index": str(index_dir),
        "documents": stats.documents,
        "unique_terms": stats.terms,
        "seconds": round(seconds, 2),
        "docs_per_second": round(len(corpus) / seconds, 1),
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    params.collection(name)
    return run(name, params.index, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("index", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
