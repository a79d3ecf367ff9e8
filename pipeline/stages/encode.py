"""encode: the bi-encoder document embeddings of one collection, computed once, as a FAISS index in
``<paths.dense>/<collection>/`` (``index.faiss``, ``doc_ids.json``, ``meta.json``), for the ``dense`` retriever of
the retrieve and pool stages. The model and its settings are ``retrieve.dense``; retrieval refuses a folder
encoded with other ones."""

from __future__ import annotations

import sys

from pipeline import schemas
from pipeline.config import DenseConfig, Params, Paths
from pipeline.io import read_table
from pipeline.retrievers import encode_corpus


def run(name: str, cfg: DenseConfig, paths: Paths) -> dict:
    corpus = read_table(paths.collection_dir(name) / schemas.TABLES["corpus"].filename)
    meta = encode_corpus(corpus, cfg, paths.dense_dir(name))
    return {
        "collection": name,
        "dense": str(paths.dense_dir(name)),
        **meta,
        "docs_per_second": round(meta["docs"] / max(meta["seconds"], 1e-9), 1),
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    params.collection(name)
    return run(name, params.retrieve.dense, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("encode", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
