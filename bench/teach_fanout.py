"""Teach-stage fan-out bench: run on demand, prints figures (not a test).

    .venv/bin/python bench/teach_fanout.py [--queries 200 1000 4000] [--shards 1 16] [--workers 2] [--depth 20]

For each number of queries, a workspace with SciFact's real passages (a seeded draw of ``--depth`` candidates per
query from its corpus, its real query texts in turn) and the stage itself (``bin/distillrank stage teach bench``)
as a child process against the test chat server on 127.0.0.1 (a listwise teacher that reverses each window, so
what is measured is the pipeline's own cost per call, not an LLM's). Each (queries, shards) runs twice: paying
every call, then again, serving every one from the cache. Per run: wall time, calls paid / cached, calls per
second, and the child's peak RSS (``wait4``). With shards > 1 the flow reports to one Prefect server started here
for the whole bench (so its memory is not the stage's). Results go to ``bench/results/teach-fanout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from pipeline import schemas
from pipeline.io import write_table
from pipeline.sources import load_beir_folder
from pipeline.teacher.chat_server import PASSAGE_MARK, OpenAIServer

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
NAME = "bench"
FOLDERS = ("collections", "retrieval", "teacher", "teacher_cache", "metrics")


def reverse_responder(body: dict) -> str:
    """A listwise teacher that reverses every window (cheap, deterministic, always parseable)."""
    text = " ".join(str(m.get("content") or "") for m in body["messages"])
    return " > ".join(f"[{n}]" for n in sorted({int(n) for n in PASSAGE_MARK.findall(text)}, reverse=True))


def workspace(root: Path, queries: int, depth: int, seed: int = 0) -> Path:
    """A collection ``bench`` of SciFact's passages and ``queries`` queries (SciFact's texts, numbered, so every
    prompt differs), each with ``depth`` candidates drawn from the corpus, as the teach stage reads them."""
    beir = load_beir_folder(SCIFACT, NAME)
    corpus = beir.corpus.assign(collection=NAME)
    texts = beir.queries.text.tolist()
    rng = random.Random(seed)
    doc_ids = corpus.doc_id.tolist()
    query_rows, candidate_rows, qrel_rows = [], [], []
    for i in range(queries):
        query_id = f"b{i:06d}"
        query_rows.append((NAME, query_id, f"{texts[i % len(texts)]} ({i})", "train", "collection", None))
        for rank, doc_id in enumerate(rng.sample(doc_ids, depth), start=1):
            candidate_rows.append((NAME, query_id, doc_id, "bm25", rank, float(depth - rank)))
            if rank == 1:
                qrel_rows.append((NAME, query_id, doc_id, 1, "train"))
    folder = root / "data/collections" / NAME
    write_table(corpus[["collection", "doc_id", "title", "text"]], schemas.CORPUS, folder / "corpus.parquet")
    write_table(pd.DataFrame(query_rows, columns=schemas.QUERIES.names), schemas.QUERIES, folder / "queries.parquet")
    write_table(pd.DataFrame(qrel_rows, columns=schemas.QRELS.names), schemas.QRELS, folder / "qrels.parquet")
    write_table(
        pd.DataFrame(candidate_rows, columns=schemas.CANDIDATES.names),
        schemas.CANDIDATES,
        root / "data/retrieval" / NAME / "candidates.parquet",
    )
    return root


def params(root: Path, base_url: str, depth: int, shards: int, workers: int) -> Path:
    data = {
        "paths": {key: str(root / "data" / key) for key in FOLDERS},
        "collections": {NAME: {"source": str(SCIFACT)}},
        "train": {"collection": NAME, "split": "train"},
        "evaluation": {},
        "teacher": {
            "backend": "openai",
            "method": "listwise",
            "endpoint": {"base_url": base_url, "model": "bench", "api_key_env": None, "max_concurrency": 8},
            "listwise": {"window": depth, "step": depth // 2, "max_words": 80},
            "fan_out": {"shards": shards, "task_runner": "thread", "workers": min(workers, shards)},
        },
        "teach": {"collection": {NAME: {"split": "train", "depth": depth, "candidates": "bm25"}}},
    }
    data["paths"]["metrics"] = str(root / "metrics")
    path = root / f"params-{shards}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# The stage runs as a grandchild, forked by this small wrapper: Linux carries a process's peak RSS across fork and
# exec (``signal->maxrss``), so a child forked from the bench would report at least the bench's own size.
WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"MAXRSS_KIB {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(params_file: Path, env: dict[str, str], log: Path) -> dict:
    """The teach stage as a process of its own: its summary, wall time and peak RSS."""
    started = time.perf_counter()
    command = [str(REPO / "bin/distillrank"), "stage", "teach", NAME, "--params", str(params_file)]
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-c", WRAPPER, *command],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"teach stage failed ({params_file}), see {log}: {done.stdout[-2000:]}")
    peak_kib = int(re.findall(r"MAXRSS_KIB (\d+)", log.read_text())[-1])
    summary = json.loads(done.stdout)
    calls = summary["calls"]
    return {
        "wall_s": round(wall, 1),
        "paid": calls["paid"],
        "cached": calls["cached"],
        "calls_per_s": round((calls["paid"] + calls["cached"]) / wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "labelled": summary["queries"]["labelled"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, nargs="+", default=[200, 1000, 4000])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="threads running shards at once (shards > 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/teach-fanout.json")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    rows = []
    server = OpenAIServer(reverse_responder, keep_requests=False)
    with prefect_test_harness(server_startup_timeout=120), server:
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        for queries in args.queries:
            with tempfile.TemporaryDirectory(prefix="teach-fanout-") as tmp:
                root = workspace(Path(tmp), queries, args.depth)
                for shards in args.shards:
                    cache = root / "data/teacher_cache" / NAME
                    if cache.exists():  # every setting pays its own calls
                        for shard in cache.iterdir():
                            shard.unlink()
                    file = params(root, server.base_url, args.depth, shards, args.workers)
                    for attempt in ("paid", "cached"):
                        log = root / f"stage-{shards}-{attempt}.log"
                        row = {"queries": queries, "shards": shards, "run": attempt, **run_stage(file, env, log)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
