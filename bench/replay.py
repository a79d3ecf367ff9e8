"""Replaying-teacher bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/replay.py [--queries 43] [--fault-queries 20] [--fault-rate 0.35]

1. Our window walk against the real teacher's: the replaying teacher (``teacher.backend: replay``) answers our
   sliding window (window 20, step 10) over TREC-DL 2019's shipped BM25 top 100 with GPT-3.5's recorded decisions
   (``teachers/rankgpt-gpt-3.5-turbo.bm25.trec``, which RankGPT's own walk of the same windows wrote). Our labels'
   nDCG@10 must come within ±0.01 of the recorded run's, in the calls RankGPT makes (9 windows a query).
2. A fault run in the teacher-hardening issue's setting: 20 of DL19's queries, listwise, ``--fault-rate`` of the
   replies broken (truncated JSON, an HTML page under a 200, a 500, an empty answer), then a clean re-run. Faults
   injected, calls paid, usable answers paid twice (must be 0), runs needed (must be 1).
3. The time a dead endpoint (accepts connections, never answers) takes to fail at the default settings.

Every call goes through the real ``openai`` client and a call cache in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline.config import BreakerConfig, EndpointConfig, ReplayConfig, SamplingConfig, TeacherConfig
from pipeline.io import read_trec_run
from pipeline.lucene import document_contents
from pipeline.metrics import evaluate_run
from pipeline.sources import load_beir_folder
from pipeline.teacher import listwise
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.chat_server import HangingServer
from pipeline.teacher.client import CachedTeacher, EndpointDown
from pipeline.teacher.outcome import Pool
from pipeline.teacher.replay import replay_server
from pipeline.teacher.templates import load_template

REPO = Path(__file__).resolve().parents[1]
DL19 = REPO.parent / "shared" / "data" / "trec-dl-2019"
RECORDED = DL19 / "teachers" / "rankgpt-gpt-3.5-turbo.bm25.trec"
MIN_RELEVANCE = 2  # TREC-DL's binary threshold (nDCG@10 uses the grades)


def bm25_pool(queries: int, depth: int) -> tuple[Pool, pd.DataFrame]:
    """DL19's shipped BM25 top ``depth`` for the first ``queries`` queries (by id), with passages, and the qrels."""
    collection = load_beir_folder(DL19, "trec-dl-2019")
    run = read_trec_run(DL19 / "runs" / "bm25.trec")
    chosen = sorted(run.query_id.unique())[:queries]
    run = run[(run["rank"] <= depth) & run.query_id.isin(chosen)].sort_values(["query_id", "rank"])
    corpus = collection.corpus.set_index("doc_id")
    passages = [document_contents(corpus.title[d], corpus.text[d]) for d in run.doc_id]
    texts = collection.queries.set_index("query_id").text
    pool = Pool(
        queries=pd.DataFrame({"query_id": chosen, "text": [texts[q] for q in chosen]}),
        candidates=run.assign(passage=passages)[["query_id", "doc_id", "rank", "passage"]],
    )
    return pool, collection.qrels[collection.qrels.query_id.isin(set(chosen))]


def ndcg10(qrels: pd.DataFrame, run: pd.DataFrame) -> float:
    return evaluate_run(qrels, run, ("nDCG@10",), MIN_RELEVANCE).aggregate["nDCG@10"]


def replay_teacher(fault_rate: float, seed: int) -> TeacherConfig:
    return TeacherConfig(
        backend="replay",
        method="listwise",
        replay=ReplayConfig(path=str(RECORDED), fault_rate=fault_rate, seed=seed),
        sampling=SamplingConfig(temperature=0.0, max_tokens=256, seed=0),
        listwise={"window": 20, "step": 10, "max_words": 300},  # RankGPT's
    )


def teach_once(pool: Pool, teacher: TeacherConfig, cache_dir: Path) -> tuple[pd.DataFrame, dict, float]:
    """One teach run through the replay server; the labels, the figures and the wall time."""
    template = load_template(teacher.listwise.template)
    started = time.perf_counter()
    with (
        replay_server(teacher.replay, template, pool) as replay,
        TeacherCache(cache_dir) as cache,
    ):
        client = CachedTeacher(
            replay.endpoint(), teacher.sampling, cache, template.sha256, breaker=teacher.breaker, max_unusable_tries=3
        )
        outcome = listwise.teach(pool, client, teacher)
        counters = client.counters
        usable_repaid = sum(n - 1 for n in replay.server.usable.values() if n > 1)
        figures = {
            **replay.summary(),
            "paid": counters.calls,
            "cached": counters.cached,
            "errors": counters.errors,
            "unusable": counters.unusable,
            "usable_answers_paid_twice": usable_repaid,
            "parse": outcome.stats["parse"],
            "stopped": outcome.stopped,
        }
    return outcome.rankings, figures, time.perf_counter() - started


def bench_fidelity(queries: int) -> None:
    pool, qrels = bm25_pool(queries, depth=100)
    bm25 = pool.candidates.assign(score=lambda c: -c["rank"].astype(float))
    recorded = read_trec_run(RECORDED)
    recorded = recorded[recorded.query_id.isin(set(pool.queries.query_id))]
    with tempfile.TemporaryDirectory() as tmp:
        labels, figures, wall = teach_once(pool, replay_teacher(0.0, 0), Path(tmp))
    ours = labels.assign(score=lambda r: -r.teacher_rank.astype(float))
    rankgpt_calls = sum(len(listwise.sliding_windows(len(g), 20, 10)) for g in pool.by_query().values())
    ours_ndcg, recorded_ndcg = ndcg10(qrels, ours), ndcg10(qrels, recorded)
    print(f"## 1. Our window walk over GPT-3.5's replayed decisions (DL19, BM25 top 100, {len(pool.queries)} queries)")
    print("| run | nDCG@10 | calls |")
    print("|---|---|---|")
    print(f"| BM25 (shipped run, top 100) | {ndcg10(qrels, bm25):.4f} | |")
    print(f"| recorded RankGPT gpt-3.5-turbo run | {recorded_ndcg:.4f} | {rankgpt_calls} (RankGPT's windows) |")
    print(f"| our sliding window, replayed teacher | {ours_ndcg:.4f} | {figures['paid']} paid in {wall:.1f} s |")
    print(
        f"difference {ours_ndcg - recorded_ndcg:+.4f} (target within ±0.01); "
        f"replay: {figures['windows']} windows, {figures['unknown_passages']} passages matched no candidate, "
        f"{figures['unranked_passages']} candidates the recording did not rank"
    )


def bench_faults(queries: int, fault_rate: float, seed: int) -> None:
    pool, _ = bm25_pool(queries, depth=100)
    print(f"\n## 2. A fault run: {len(pool.queries)} DL19 queries, listwise over BM25 top 100, {fault_rate:.0%} faults")
    print("| run | requests | faults injected | paid | cached | unusable | errors | usable paid twice | finished |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, rate in (("faulty", fault_rate), ("clean re-run", 0.0), ("unchanged re-run", 0.0)):
            _, figures, wall = teach_once(pool, replay_teacher(rate, seed), Path(tmp))
            faults = ", ".join(f"{n} {kind}" for kind, n in figures["faults_injected"].items()) or "0"
            print(
                f"| {label} | {figures['requests']} | {faults} | {figures['paid']} | {figures['cached']} | "
                f"{figures['unusable']} | {figures['errors']} | {figures['usable_answers_paid_twice']} | "
                f"{'no: ' + figures['stopped'] if figures['stopped'] else 'yes'} in {wall:.1f} s |"
            )


def bench_dead_endpoint() -> None:
    pool, _ = bm25_pool(20, depth=100)
    breaker = BreakerConfig()
    with HangingServer() as dead, tempfile.TemporaryDirectory() as tmp, TeacherCache(Path(tmp)) as cache:
        endpoint = EndpointConfig(base_url=dead.base_url, model="dead", api_key_env=None)  # default timeout/retries
        teacher = TeacherConfig(backend="openai", method="listwise", endpoint=endpoint, breaker=breaker)
        client = CachedTeacher(endpoint, teacher.sampling, cache, "bench", breaker=breaker)
        started = time.perf_counter()
        try:
            listwise.teach(pool, client, teacher)
            outcome = "did not fail"
        except EndpointDown as err:
            outcome = f"EndpointDown: {str(err)[:90]}..."
        wall = time.perf_counter() - started
    print(f"\n## 3. A dead endpoint at the default settings ({breaker})")
    print(f"failed in {wall:.1f} s after {dead.connections} connection(s): {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=43)
    parser.add_argument("--fault-queries", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench_fidelity(args.queries)
    bench_faults(args.fault_queries, args.fault_rate, args.seed)
    bench_dead_endpoint()


if __name__ == "__main__":
    main()
