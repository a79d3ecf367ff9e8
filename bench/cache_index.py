"""Call-cache index bench: run on demand, prints one JSON line (not a test).

    .venv/bin/python bench/cache_index.py [--calls 60000]

Writes ``--calls`` synthetic pointwise records into one shard of a temporary cache folder (each: a prompt of a
query and an 80-word passage drawn from SciFact's words, a one-token answer with 20 top log-probabilities, as the
pointwise teacher stores them), then opens ``TeacherCache`` on it under ``tracemalloc``: the memory the open cache
holds is its index. Prints the shard's size, the index's size and the bytes per call.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.teacher.cache import CallRecord, TeacherCache, call_key  # noqa: E402

SEED_CORPUS = REPO.parent / "shared" / "data" / "scifact" / "corpus.jsonl"


def synthetic_record(index: int, words: list[str], rng: random.Random) -> CallRecord:
    """One pointwise call as the teacher stores it: a query, an 80-word passage, a one-token answer."""
    prompt = f"Query: query {index}\nPassage: {' '.join(rng.choices(words, k=80))}\nIs the passage relevant? yes/no"
    messages = [{"role": "user", "content": prompt}]
    sampling = {"temperature": 0, "max_tokens": 1, "seed": 0, "logprobs": True, "top_logprobs": 20}
    top = [{"token": f"t{j}", "logprob": -0.5 * j} for j in range(20)]
    return CallRecord(
        key=call_key("model", "template", messages, sampling),
        model="model",
        template_hash="template",
        request={"messages": messages, "sampling": sampling},
        response_text="yes",
        logprobs=[{"token": "yes", "logprob": -0.1, "top_logprobs": top}],
        prompt_tokens=150,
        completion_tokens=1,
        latency_s=2.5,
        status="ok",
        error=None,
        timestamp="2026-01-01T00:00:00+00:00",
        run_id="bench",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60000)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    words = SEED_CORPUS.read_text(encoding="utf-8").split()[:50000]
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "calls-20260101T000000000000Z-1-bench.jsonl"
        with shard.open("w", encoding="utf-8") as out:
            for index in range(args.calls):
                out.write(synthetic_record(index, words, rng).to_json() + "\n")
        tracemalloc.start()
        cache = TeacherCache(tmp)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(cache) == args.calls and next(iter(cache)).ok
        figures = {
            "calls": args.calls,
            "shard_mib": round(shard.stat().st_size / 2**20, 1),
            "index_mib": round(held / 2**20, 1),
            "bytes_per_call": round(held / args.calls),
            "peak_while_opening_mib": round(peak / 2**20, 1),
        }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
