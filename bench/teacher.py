"""Teacher bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/teacher.py [--queries 43] [--methods listwise,pointwise-yes-no,pointwise-graded]
                                      [--skip-embedded]

1. The embedded teacher's nDCG@10 per method/prompt on TREC-DL 2019, reranking the shipped BM25 top-20
   (passages cut to --max-words), next to BM25's on the same queries; seconds per call on this machine.
   Calls go through a call cache under data/bench/ (a re-run of the bench pays nothing).
2. Calls per query of this stage's sliding window (RankGPT's windows, every position seen), for a first run and
   a re-run (the cache makes the re-run free; an uncached RankGPT pays for every window again).
3. Throughput of the cached client with 1, 4 and 16 concurrent calls against the local test server with an
   artificial latency.
4. ``--embedded-options``: llama.cpp's speed options for the embedded pointwise teacher (threads, flash attention,
   batch sizes, parallel slots), each on the same ``--option-pairs`` DL19 (query, BM25 passage) prompts, in
   calls/s, with the largest change of the yes/no log-odds against the default options (an option is usable only
   if it leaves the answers unchanged: 1e-3). No cache: every call is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

from pipeline.config import EndpointConfig, SamplingConfig, TeacherConfig  # noqa: E402
from pipeline.io import read_trec_run  # noqa: E402
from pipeline.lucene import document_contents  # noqa: E402
from pipeline.metrics import evaluate_run  # noqa: E402
from pipeline.sources import load_beir_folder  # noqa: E402
from pipeline.teacher import listwise, pointwise  # noqa: E402
from pipeline.teacher.cache import TeacherCache  # noqa: E402
from pipeline.teacher.chat_server import OpenAIServer  # noqa: E402
from pipeline.teacher.client import CachedTeacher  # noqa: E402
from pipeline.teacher.embedded import ServerOptions  # noqa: E402
from pipeline.teacher.endpoint import teacher_endpoint  # noqa: E402
from pipeline.teacher.listwise import sliding_windows  # noqa: E402
from pipeline.teacher.outcome import Pool  # noqa: E402
from pipeline.teacher.templates import load_template  # noqa: E402

DL19 = REPO.parent / "shared" / "data" / "trec-dl-2019"


def dl19_pool(queries: int, depth: int) -> tuple[Pool, pd.DataFrame]:
    collection = load_beir_folder(DL19, "trec-dl-2019")
    run = read_trec_run(DL19 / "runs" / "bm25.trec")
    run = run[run["rank"] <= depth]
    chosen = sorted(run.query_id.unique())[:queries]
    run = run[run.query_id.isin(chosen)]
    corpus = collection.corpus.set_index("doc_id")
    passages = [document_contents(corpus.title[d], corpus.text[d]) for d in run.doc_id]
    candidates = run.assign(passage=passages)[["query_id", "doc_id", "rank", "passage"]]
    texts = collection.queries.set_index("query_id").text
    pool = Pool(queries=pd.DataFrame({"query_id": chosen, "text": [texts[q] for q in chosen]}), candidates=candidates)
    return pool, collection.qrels


def ndcg(qrels: pd.DataFrame, run: pd.DataFrame) -> float:
    return evaluate_run(qrels, run, ("nDCG@10",), 2).aggregate["nDCG@10"]


def bench_embedded(args: argparse.Namespace) -> None:
    pool, qrels = dl19_pool(args.queries, args.depth)
    qrels = qrels[qrels.query_id.isin(set(pool.queries.query_id))]
    bm25 = pool.candidates.assign(score=lambda c: -c["rank"].astype(float))
    print(f"## Embedded teacher on TREC-DL 2019, BM25 top-{args.depth}, {len(pool.queries)} queries")
    print(f"BM25 nDCG@10 on these queries: {ndcg(qrels, bm25):.4f}")
    print("| method | prompt | nDCG@10 | calls | s/call | identity / degenerate |")
    print("|---|---|---|---|---|---|")
    paths = dataclasses.replace(_paths(), models=str(REPO / "data" / "models"))
    for method in args.methods.split(","):
        kind = "listwise" if method == "listwise" else "pointwise"
        teacher = TeacherConfig(
            backend="embedded",
            method=kind,
            sampling=SamplingConfig(temperature=0.0, max_tokens=160, seed=0),
            listwise={"window": args.depth, "step": 10, "max_words": args.max_words},
            pointwise={"template": method if kind == "pointwise" else "pointwise-yes-no", "max_words": args.max_words},
        )
        template = load_template("rankgpt-listwise" if kind == "listwise" else method)
        with (
            teacher_endpoint(teacher, paths) as endpoint,
            TeacherCache(REPO / "data" / "bench" / "teacher_cache" / method) as cache,
        ):
            client = CachedTeacher(endpoint, teacher.sampling, cache, template.sha256)
            started = time.perf_counter()
            outcome = (listwise.teach if kind == "listwise" else pointwise.teach)(pool, client, teacher)
            wall = time.perf_counter() - started
            counters = client.counters
        ranked = outcome.rankings.assign(score=lambda r: -r.teacher_rank.astype(float))
        per_call = wall / counters.calls if counters.calls else float("nan")
        degenerate = (
            f"{outcome.stats['identity_windows']}/{outcome.stats['windows']} identity"
            if kind == "listwise"
            else f"{outcome.stats['no_answer_token']}/{outcome.stats['pairs']} no answer token"
        )
        print(
            f"| {kind} | {template.name} | {ndcg(qrels, ranked):.4f} | {counters.calls} new, {counters.cached} cached "
            f"| {per_call:.2f} | {degenerate} |"
        )


OPTION_SETS = {
    "default (flash auto, 1 slot, ubatch 512)": (2, ServerOptions()),
    "flash attention off": (2, ServerOptions(flash_attention="off")),
    "ubatch 128": (2, ServerOptions(batch=128, ubatch=128)),
    "2 slots, unified KV, 2 concurrent": (2, ServerOptions(parallel=2, kv_unified=True)),
    "4 slots, unified KV, 4 concurrent": (2, ServerOptions(parallel=4, kv_unified=True)),
}


def bench_embedded_options(pairs: int, max_words: int) -> None:
    """calls/s of the embedded pointwise teacher under each of ``OPTION_SETS``, and whether its answers change."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import openai

    from pipeline.teacher.embedded import assemble_model, embedded_server
    from pipeline.teacher.pointwise import pointwise_messages, yes_no_score

    pool, _ = dl19_pool(max(1, pairs // 10), 10)
    texts = pool.queries.set_index("query_id").text
    template = load_template("pointwise-yes-no")
    prompts = [
        pointwise_messages(template, texts[q], passage, max_words)
        for q, passage in zip(pool.candidates.query_id, pool.candidates.passage, strict=True)
    ][:pairs]
    model_file = assemble_model(REPO / "data" / "models")

    def ask(client: openai.OpenAI, messages: list[dict[str, str]]) -> float:
        reply = client.chat.completions.create(
            model="embedded", messages=messages, max_tokens=1, temperature=0.0, seed=0, logprobs=True, top_logprobs=20
        )
        top = reply.choices[0].logprobs.content[0].top_logprobs
        return yes_no_score([{"token": t.token, "logprob": t.logprob} for t in top]).score

    print(f"\n## Embedded pointwise teacher: llama.cpp options, {len(prompts)} DL19 prompts, no cache")
    print("| options | threads | calls/s | s/call | x default | max abs change of the yes/no log-odds |")
    print("|---|---|---|---|---|---|")
    reference, base_rate = None, None
    for name, (threads, options) in OPTION_SETS.items():
        with embedded_server(model_file, 4096, threads, options) as base_url:
            client = openai.OpenAI(base_url=base_url, api_key="unused")
            ask(client, prompts[0])  # model warm-up, not timed
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=options.parallel) as executor:
                scores = np.array(list(executor.map(ask, [client] * len(prompts), prompts)))
            wall = time.perf_counter() - started
        reference = scores if reference is None else reference
        rate = len(prompts) / wall
        base_rate = base_rate or rate
        change = float(np.abs(scores - reference).max())
        per_call = wall / len(prompts)
        print(f"| {name} | {threads} | {rate:.3f} | {per_call:.2f} | {rate / base_rate:.2f} | {change:.1e} |")


def _paths():
    from pipeline.config import Paths

    return Paths()


def bench_calls() -> None:
    print("\n## Calls per query of the sliding window (window 20, step 10)")
    print("| candidates | first run | re-run |")
    print("|---|---|---|")
    for n in (20, 30, 100):
        print(f"| {n} | {len(sliding_windows(n, 20, 10))} | 0 (cache) |")


def bench_throughput(calls: int, latency: float) -> None:
    print(f"\n## Cached client throughput: {calls} distinct calls, test server latency {latency:.2f} s")
    print("| concurrency | wall s | calls/s | speed-up vs 1 |")
    print("|---|---|---|---|")
    base = None
    for concurrency in (1, 4, 16):
        with OpenAIServer(latency_s=latency) as server, tempfile.TemporaryDirectory() as folder:
            endpoint = EndpointConfig(
                base_url=server.base_url, model="bench", api_key_env=None, max_concurrency=concurrency
            )
            with TeacherCache(folder) as cache:
                client = CachedTeacher(endpoint, SamplingConfig(), cache, "bench", progress=False)
                batch = [[{"role": "user", "content": f"call {i}"}] for i in range(calls)]
                started = time.perf_counter()
                client.complete_many(batch)
                wall = time.perf_counter() - started
        base = base or wall
        print(f"| {concurrency} | {wall:.2f} | {calls / wall:.1f} | {base / wall:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=43)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--methods", default="listwise,pointwise-yes-no,pointwise-graded")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--throughput-calls", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--embedded-options", action="store_true", help="only section 4 (llama.cpp's options)")
    parser.add_argument("--option-pairs", type=int, default=50)
    args = parser.parse_args()
    if args.embedded_options:
        bench_embedded_options(args.option_pairs, args.max_words)
        return
    bench_calls()
    bench_throughput(args.throughput_calls, args.latency)
    if not args.skip_embedded:
        bench_embedded(args)


if __name__ == "__main__":
    main()
