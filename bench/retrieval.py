"""Retrieval bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/retrieval.py [--pool-queries 20000] [--pool-subset 1000] [--skip-pool]

On the real SciFact (5,183 documents, ../shared/data/scifact), in a temporary folder:
1. BM25 indexing docs/s: our ``build_index`` (the index stage) vs pyserini's own CLI (``pyserini.index.lucene``) on
   the same JsonCollection, one after the other in this run, and the ratio.
2. Batch search queries/s: our ``bm25_search`` vs pyserini's search CLI on the same queries (every SciFact query,
   100 hits, 2 threads), and the ratio. The CLI's time includes starting its JVM; ours runs in a JVM already up.
3. Dense encoding docs/s (the encode stage, MiniLM, CPU).
4. The retrieve stage's methods (bm25, bm25-rm3, dense, rrf) evaluated on the test qrels: nDCG@10, R@100.
5. Pool construction for --pool-queries synthetic queries (a sentence cropped from a document, the source document
   known) × 4 methods at depth 30: retrieval is measured on --pool-subset queries and extrapolated; the
   fusion/dedup step (``pipeline.pool.pool_table``) is timed on the full query count (the subset's runs
   replicated under new query ids).
The machine's 2 cores are shared: figures move by tens of percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import schemas  # noqa: E402
from pipeline.config import CollectionConfig, IndexConfig, Paths, PoolConfig, PrepareConfig, RetrieveConfig  # noqa: E402
from pipeline.io import read_table, read_trec_run  # noqa: E402
from pipeline.lucene import bm25_search, document_contents, java_environment, pyserini_command  # noqa: E402
from pipeline.metrics import evaluate_run  # noqa: E402
from pipeline.pool import POOL_METHOD, pool_table, source_recall  # noqa: E402
from pipeline.retrievers import retrieve  # noqa: E402
from pipeline.stages import encode, index, prepare  # noqa: E402
from pipeline.stages import retrieve as retrieve_stage  # noqa: E402

SCIFACT = REPO.parent / "shared" / "data" / "scifact"
METHODS = ("bm25", "bm25-rm3", "dense", "rrf")


def timed(label: str, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return result, seconds


def cli(module: str, args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        pyserini_command(module, args), env=java_environment(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def bench_indexing(paths: Paths, work: Path) -> None:
    corpus = read_table(paths.collection_dir("scifact") / schemas.TABLES["corpus"].filename)
    n = len(corpus)
    print(f"1. BM25 indexing, {n} documents, 2 threads")
    _, ours = timed(
        "ours (index stage: write JsonCollection + pyserini indexer + stats)",
        index.run,
        "scifact",
        IndexConfig(threads=2),
        paths,
    )
    docs = work / "jsoncollection"
    docs.mkdir()
    with (docs / "docs.jsonl").open("w", encoding="utf-8") as out:
        for doc_id, title, text in zip(corpus.doc_id, corpus.title, corpus.text, strict=True):
            out.write(json.dumps({"id": doc_id, "contents": document_contents(title, text)}) + "\n")
    args = ["--collection", "JsonCollection", "--input", str(docs), "--index", str(work / "cli-index")]
    args += ["--generator", "DefaultLuceneDocumentGenerator", "--threads", "2"]
    args += ["--storePositions", "--storeDocvectors", "--storeRaw"]
    theirs = cli("pyserini.index.lucene", args)
    print(f"  pyserini CLI: {theirs:.1f} s")
    print(f"  docs/s: ours {n / ours:.0f}, CLI {n / theirs:.0f}; ours/CLI time ratio {ours / theirs:.2f}")


def bench_search(paths: Paths, work: Path) -> None:
    queries = read_table(paths.collection_dir("scifact") / schemas.TABLES["queries"].filename)
    n = len(queries)
    cfg = RetrieveConfig()
    print(f"2. BM25 batch search, {n} queries, 100 hits, 2 threads")
    bm25_search(paths.index_dir("scifact"), queries.head(10), 100, cfg.bm25, 2)  # JVM up, as in a stage
    ours_run, ours = timed("ours (bm25_search)", bm25_search, paths.index_dir("scifact"), queries, 100, cfg.bm25, 2)
    topics = work / "topics.tsv"
    topics.write_text("".join(f"{q}\t{t}\n" for q, t in zip(queries.query_id, queries.text, strict=True)))
    out = work / "cli.trec"
    args = ["--index", str(paths.index_dir("scifact")), "--topics", str(topics), "--output", str(out)]
    args += ["--bm25", "--k1", "0.9", "--b", "0.4", "--hits", "100", "--threads", "2", "--batch-size", "1000"]
    theirs = cli("pyserini.search.lucene", args)
    same = read_trec_run(out)[["query_id", "doc_id", "rank"]].sort_values(["query_id", "rank"]).reset_index(drop=True)
    mine = ours_run[["query_id", "doc_id", "rank"]].sort_values(["query_id", "rank"]).reset_index(drop=True)
    print(f"  pyserini CLI (incl. JVM start): {theirs:.1f} s; identical runs: {same.equals(mine)}")
    print(f"  queries/s: ours {n / ours:.0f}, CLI {n / theirs:.0f}; ours/CLI time ratio {ours / theirs:.2f}")


def bench_effectiveness(paths: Paths) -> None:
    print("3. dense encoding (encode stage, all-MiniLM-L6-v2, CPU, batch 64, max_length 256)")
    summary = encode.run("scifact", RetrieveConfig().dense, paths)
    print(f"  {summary['docs']} docs in {summary['seconds']:.1f} s: {summary['docs_per_second']:.1f} docs/s")
    print("4. retrieve stage on every SciFact query, evaluated on the test qrels (min_relevance 1)")
    cfg = RetrieveConfig(methods=METHODS, depth=100, threads=2)
    summary = retrieve_stage.run("scifact", cfg, paths)
    print(f"  seconds per method: {summary['seconds']}")
    candidates = read_table(paths.retrieval_dir("scifact") / schemas.TABLES["candidates"].filename)
    qrels = read_table(paths.collection_dir("scifact") / schemas.TABLES["qrels"].filename)
    qrels = qrels[qrels["split"] == "test"]
    for method in METHODS:
        rows = candidates[(candidates.method == method) & candidates.query_id.isin(set(qrels.query_id))]
        result = evaluate_run(qrels, rows, ("nDCG@10", "R@100"), 1)
        print(
            f"  {method:9s} nDCG@10 {result.aggregate['nDCG@10']:.4f}  R@100 {result.aggregate['R@100']:.4f}"
            f"  ({result.queries} queries)"
        )


def synthetic_queries(corpus: pd.DataFrame, count: int) -> pd.DataFrame:
    """``count`` cropped-sentence queries over the corpus: the documents' sentences (5+ words), round robin over
    documents so every document contributes before any gives a second one."""
    per_doc = [[s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5] for text in corpus.text]
    rows, depth = [], 0
    while len(rows) < count and any(len(s) > depth for s in per_doc):
        for doc_id, sentences in zip(corpus.doc_id, per_doc, strict=True):
            if depth < len(sentences) and len(rows) < count:
                rows.append((f"s{len(rows)}", " ".join(sentences[depth].split()[:20]), doc_id))
        depth += 1
    return pd.DataFrame(rows, columns=["query_id", "text", "source_doc_id"])


def bench_pool(paths: Paths, total: int, subset: int) -> None:
    corpus = read_table(paths.collection_dir("scifact") / schemas.TABLES["corpus"].filename)
    queries = synthetic_queries(corpus, total)
    print(f"5. pool: {len(queries)} synthetic queries × {len(METHODS)} methods at depth 30, size 30")
    part = queries.sample(n=min(subset, len(queries)), random_state=0).reset_index(drop=True)
    pool_cfg = PoolConfig()
    started = time.perf_counter()
    runs, seconds = retrieve("scifact", METHODS, part, pool_cfg.depth_per_method, RetrieveConfig(threads=2), paths)
    measured = time.perf_counter() - started
    scale = len(queries) / len(part)
    estimate = measured * scale
    print(
        f"  retrieval measured on {len(part)} queries: {measured:.1f} s {seconds}; {len(queries)} queries: "
        f"{estimate / 60:.1f} min, EXTRAPOLATED from the subset (--pool-subset {len(queries)} runs them all"
        f"{', over the ~5 minutes this bench allows itself' if estimate > 300 else ''})"
    )
    table = pool_table(runs, pool_cfg.size, pool_cfg.rrf_k, pool_cfg.order, pool_cfg.seed)
    recall = source_recall(table, part[["query_id", "source_doc_id"]], (1, 10, 30), [*METHODS, POOL_METHOD])
    for method, values in recall.items():
        print(f"  source recall {method:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    copies = int(-(-len(queries) // len(part)))
    full = {
        method: pd.concat([run.assign(query_id=run.query_id + f"#{i}") for i in range(copies)], ignore_index=True)
        for method, run in runs.items()
    }
    rows = sum(len(run) for run in full.values())
    for order in ("fused", "shuffled"):
        timed(
            f"fusion + dedup ({order}), {len(part) * copies} queries, {rows} method rows",
            pool_table,
            full,
            pool_cfg.size,
            pool_cfg.rrf_k,
            order,
            pool_cfg.seed,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-queries", type=int, default=20000)
    parser.add_argument("--pool-subset", type=int, default=1000)
    parser.add_argument("--skip-pool", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        work = Path(tmp)
        paths = Paths(
            collections=str(work / "collections"),
            indexes=str(work / "indexes"),
            retrieval=str(work / "retrieval"),
            dense=str(work / "dense"),
        )
        prepare.run("scifact", CollectionConfig(source=str(SCIFACT)), PrepareConfig(), paths)
        bench_indexing(paths, work)
        bench_search(paths, work)
        bench_effectiveness(paths)
        if not args.skip_pool:
            bench_pool(paths, args.pool_queries, args.pool_subset)


if __name__ == "__main__":
    main()
