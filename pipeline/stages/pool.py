"""pool: the candidate pools of one collection's synthesized queries (``<paths.synthetic>/<name>/queries.parquet``)
→ ``<paths.pool>/<name>/candidates.parquet`` (schema ``pool_candidates``): the top ``pool.depth_per_method`` of
every ``pool.methods`` retriever (method = its name) and the deduplicated pool shown to the teacher (method =
"pool"); see ``pipeline.pool`` for the fusion and the order.

Also writes ``<paths.metrics>/retrieval/<name>.json``: how often each method (and the pool) finds the document a
synthesized query came from, and the retrieve stage's effectiveness on every evaluation collection (nDCG@10,
R@100 of each method in its candidates). One file per synthesize target, because dvc.yaml runs this stage once per
target (foreach) and two stages cannot declare the same metrics file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline import schemas
from pipeline.config import EvaluationCollection, Params, Paths, PoolConfig, RetrieveConfig
from pipeline.io import read_table, write_json, write_table
from pipeline.metrics import evaluate_run
from pipeline.pool import POOL_METHOD, pool_table, source_recall, unique_share
from pipeline.retrievers import retrieve

EVALUATION_MEASURES = ("nDCG@10", "R@100")


def metrics_path(paths: Paths, name: str) -> Path:
    return Path(paths.metrics) / "retrieval" / f"{name}.json"


def run(name: str, cfg: PoolConfig, retrieve_cfg: RetrieveConfig, paths: Paths) -> dict:
    """Pool the synthesized queries of ``name`` and return the synthetic part of the metrics."""
    spec = schemas.TABLES["synthetic_queries"]
    queries = read_table(paths.synthetic_dir(name) / spec.filename)
    runs, seconds = retrieve(name, cfg.methods, queries, cfg.depth_per_method, retrieve_cfg, paths)
    started = time.perf_counter()
    table = pool_table(runs, size=cfg.size, k=cfg.rrf_k, order=cfg.order, seed=cfg.seed).assign(collection=name)
    seconds["fusion"] = round(time.perf_counter() - started, 2)
    out = schemas.TABLES["pool_candidates"]
    write_table(table, out.schema, paths.pool_dir(name) / out.filename)
    pool_rows = table[table.method == POOL_METHOD]
    recall = source_recall(table, queries[["query_id", "source_doc_id"]], cfg.recall_depths, [*runs, POOL_METHOD])
    return {
        "queries": len(queries),
        "source_recall": recall,
        "pool_size_mean": float(pool_rows.groupby("query_id").size().reindex(queries.query_id, fill_value=0).mean())
        if len(queries)
        else 0.0,
        "unique_docs_per_method_share": unique_share(table, runs),
        "seconds": seconds,
    }


def evaluation_metrics(
    evaluation: dict[str, EvaluationCollection], min_relevance: dict[str, int], paths: Paths
) -> dict[str, dict[str, dict[str, float]]]:
    """{collection: {method: {"nDCG@10": .., "R@100": ..}}} of the retrieve stage's candidates, on the qrels of
    each evaluation collection's split."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for collection, target in evaluation.items():
        candidates = read_table(paths.retrieval_dir(collection) / schemas.TABLES["candidates"].filename)
        qrels = read_table(paths.collection_dir(collection) / schemas.TABLES["qrels"].filename)
        qrels = qrels[qrels["split"] == target.split]
        judged = set(qrels.query_id)
        result[collection] = {
            method: {
                measure: round(value, 4)
                for measure, value in evaluate_run(
                    qrels, rows[rows.query_id.isin(judged)], EVALUATION_MEASURES, min_relevance[collection]
                ).aggregate.items()
            }
            for method, rows in candidates.groupby("method", sort=True)
        }
    return result


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    params.collection(name)
    synthetic = run(name, params.pool, params.retrieve, params.paths)
    min_relevance = {c: params.collection(c).min_relevance for c in params.evaluation}
    evaluation = evaluation_metrics(params.evaluation, min_relevance, params.paths)
    metrics = {
        "synthetic": {name: {key: value for key, value in synthetic.items() if key != "seconds"}},
        "evaluation": evaluation,
    }
    write_json(metrics, metrics_path(params.paths, name))
    return {"collection": name, **metrics, "seconds": synthetic["seconds"]}


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("pool", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
