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

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from pipeline import schemas
from pipeline.config import EvaluationCollection, Params, Paths, PoolConfig, RetrieveConfig
from pipeline.io import ParquetChunkWriter, copy_parquet, read_table, write_json
from pipeline.lucene import set_jvm_max_heap
from pipeline.metrics import evaluate_run
from pipeline.pool import POOL_METHOD, pool_table, source_hits, unique_counts
from pipeline.retrievers import QUERY_ID_ORDER, retrieve_chunks

EVALUATION_MEASURES = ("nDCG@10", "R@100")


def metrics_path(paths: Paths, name: str) -> Path:
    return Path(paths.metrics) / "retrieval" / f"{name}.json"


def run(name: str, cfg: PoolConfig, retrieve_cfg: RetrieveConfig, paths: Paths, chunk_queries: int = 1000) -> dict:
    """Pool the synthesized queries of ``name``, ``chunk_queries`` at a time, and return the synthetic part of the
    metrics. Each method's rows and the pool's go to spill files as the chunks come, then into the table in the
    order pooling every query at once gives (``pool_table``: method by method, then the pool sorted by query);
    the metrics are counts summed over the chunks, divided at the end."""
    spec = schemas.TABLES["synthetic_queries"]
    queries = read_table(paths.synthetic_dir(name) / spec.filename)
    out = schemas.TABLES["pool_candidates"]
    methods = list(dict.fromkeys(cfg.methods))
    seconds: dict[str, float] = {}
    fusion = 0.0
    hits: dict[str, dict[str, int]] = {}
    with_source = pooled = 0
    unique: dict[str, list[int]] = {method: [0, 0] for method in methods}
    with tempfile.TemporaryDirectory(prefix=f"distillrank-pool-{name}-") as spill_dir:
        spills = {method: Path(spill_dir) / f"{index}.parquet" for index, method in enumerate([*methods, POOL_METHOD])}
        with contextlib.ExitStack() as stack:
            writers = {m: stack.enter_context(ParquetChunkWriter(path, out.schema)) for m, path in spills.items()}
            chunks = retrieve_chunks(
                name, methods, queries, cfg.depth_per_method, retrieve_cfg, paths, chunk_queries, seconds
            )
            for chunk, runs in chunks:
                started = time.perf_counter()
                table = pool_table(runs, size=cfg.size, k=cfg.rrf_k, order=cfg.order, seed=cfg.seed)
                fusion += time.perf_counter() - started
                for method, rows in table.assign(collection=name).groupby("method", sort=False):
                    writers[str(method)].write(rows)
                chunk_hits, chunk_sources = source_hits(
                    table, chunk[["query_id", "source_doc_id"]], cfg.recall_depths, [*runs, POOL_METHOD]
                )
                with_source += chunk_sources
                for method, found in chunk_hits.items():
                    totals = hits.setdefault(method, dict.fromkeys(found, 0))
                    for at, count in found.items():
                        totals[at] += count
                pooled += int((table.method == POOL_METHOD).sum())
                for method, (alone, rows) in unique_counts(table, runs).items():
                    unique[method][0] += alone
                    unique[method][1] += rows
        sort = [spills[m] for m in [*methods, POOL_METHOD] if m in QUERY_ID_ORDER or m == POOL_METHOD]
        with ParquetChunkWriter(paths.pool_dir(name) / out.filename, out.schema) as writer:
            copy_parquet(list(spills.values()), writer, sort_by_query=sort)
    seconds["fusion"] = round(fusion, 2)
    return {
        "queries": len(queries),
        "source_recall": {
            method: {at: float(count / with_source) if with_source else 0.0 for at, count in found.items()}
            for method, found in hits.items()
        },
        # every query counts, those without a pool as 0
        "pool_size_mean": pooled / len(queries) if len(queries) else 0.0,
        "unique_docs_per_method_share": {m: alone / rows if rows else 0.0 for m, (alone, rows) in unique.items()},
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
    set_jvm_max_heap(params.scale.jvm_max_heap)
    synthetic = run(name, params.pool, params.retrieve, params.paths, params.scale.chunk_queries)
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
