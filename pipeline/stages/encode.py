"""encode: the bi-encoder document embeddings of one collection, computed once, as a FAISS index in
``<paths.dense>/<collection>/`` (``index.faiss``, ``doc_ids.json``, ``meta.json``), for the ``dense`` retriever of
the retrieve and pool stages. The model and its settings are ``retrieve.dense``; retrieval refuses a folder
encoded with other ones."""

from __future__ import annotations

import json
import sys

from pipeline import schemas
from pipeline.config import DenseConfig, Params, Paths
from pipeline.io import atomic_folder, read_table
from pipeline.retrievers import META_FILE, encode_corpus


def skip(name: str, paths: Paths, reason: str) -> dict:
    """Write a folder that says the collection was not encoded (its DVC output always exists; the dense retriever
    refuses it with ``reason``). Encoding costs minutes on a CPU: a collection no method needs is not encoded."""
    with atomic_folder(paths.dense_dir(name)) as folder:
        (folder / META_FILE).write_text(json.dumps({"encoded": False, "reason": reason}, indent=2), encoding="utf-8")
    return {"collection": name, "encoded": False, "reason": reason}


def needs_dense(params: Params, name: str) -> bool:
    """Whether collection ``name``'s retrieval, or its synthesized queries' pool, uses the dense retriever."""
    retrieve = params.retrieve
    pool = name in params.synthesize and retrieve.uses_dense(params.pool.methods)
    return retrieve.uses_dense(retrieve.methods_for(name)) or pool


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
    if not needs_dense(params, name):
        reason = (
            "no retrieve or pool method of this collection used the dense retriever when encode ran: "
            f"run `dvc repro --force encode@{name}` after adding one"
        )
        return skip(name, params.paths, reason)
    return run(name, params.retrieve.dense, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("encode", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
