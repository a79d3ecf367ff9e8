"""Apply a student: rerank the top ``depth`` of any first-stage run, as a library function and as a command.

    distillrank rerank --model DIR --collection FOLDER --run RUN.trec --out OUT.trec [--depth 100]
                       [--batch-size 32] [--split test] [--device cpu|cuda] [--precision auto|fp32|bf16|int8]

Documents below ``depth`` are kept, in their first-stage order, after the reranked ones. That is what rank_llm
does (its sliding window permutes ``candidates[rank_start:rank_end]`` and leaves the rest in place) and what
pygaggle's MS MARCO scripts amount to (they pass the whole first-stage list to the reranker, so nothing is
dropped): a reranked run keeps the first stage's recall beyond ``depth``, and R@1000-style measures of the
reranked run stay comparable with the first stage's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd

from pipeline.config import ScoringPrecision
from pipeline.students.base import Student

log = logging.getLogger(__name__)

RERANKED_COLUMNS = ["query_id", "doc_id", "rank", "score", "first_stage_rank"]


class RerankInputError(ValueError):
    """A run, a collection or a depth that cannot be reranked; the message names the file or the argument."""


def first_stage_order(run: pd.DataFrame) -> pd.DataFrame:
    """Each query's documents in first-stage order, with ``first_stage_rank`` renumbered 1, 2, ...

    The order is the run's ``rank`` (ties broken by higher score); a (query, doc) pair listed twice keeps its
    best place. Renumbering makes the depth cut exact even for runs whose ranks skip or start at 0.

    >>> run = pd.DataFrame({"query_id": ["q", "q", "q"], "doc_id": ["a", "b", "a"], "rank": [0, 1, 5],
    ...                     "score": [3.0, 2.0, 1.0]})
    >>> first_stage_order(run)[["doc_id", "first_stage_rank"]].values.tolist()
    [['a', 1], ['b', 2]]
    """
    ordered = (
        run.assign(_neg_score=-run["score"].astype(float))
        .sort_values(["query_id", "rank", "_neg_score"], kind="stable")
        .drop(columns="_neg_score")
        .drop_duplicates(["query_id", "doc_id"], keep="first")
        .reset_index(drop=True)
    )
    ordered["first_stage_rank"] = ordered.groupby("query_id", sort=False).cumcount() + 1
    return ordered


def rerank_run(
    student: Student,
    queries: dict[str, str],
    passages: dict[str, str],
    run: pd.DataFrame,
    depth: int,
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Rerank the top ``depth`` documents of each query of ``run`` (query_id, doc_id, rank, score) with ``student``.

    All (query, passage) pairs go to ``student.score_pairs`` in one call, so the student's length sorting works
    over the whole run rather than one query at a time. Returns (query_id, doc_id, rank, score,
    first_stage_rank), sorted by query and new rank. The documents below ``depth`` follow the reranked ones in
    their first-stage order, with scores below every reranked score of their query (evaluation tools sort by
    score, not by rank): ``min(reranked scores) - (first_stage_rank - depth)``.

    ``queries`` and ``passages`` map ids to text; an id of the run missing from them is an error (filter the
    run first: see ``main``).
    """
    if depth < 1:
        raise RerankInputError(f"depth must be at least 1, got {depth}")
    missing_queries = sorted(set(run["query_id"]) - set(queries))
    if missing_queries:
        raise RerankInputError(f"{len(missing_queries)} queries of the run have no text (e.g. {missing_queries[0]!r})")
    missing_docs = sorted(set(run["doc_id"]) - set(passages))
    if missing_docs:
        raise RerankInputError(f"{len(missing_docs)} documents of the run have no passage (e.g. {missing_docs[0]!r})")
    if run.empty:
        return pd.DataFrame({name: [] for name in RERANKED_COLUMNS})
    ordered = first_stage_order(run[["query_id", "doc_id", "rank", "score"]])
    in_head = ordered["first_stage_rank"] <= depth
    head = ordered[in_head].copy()
    tail = ordered[~in_head].copy()
    scores = np.asarray(
        student.score_pairs(
            [queries[q] for q in head["query_id"]],
            [passages[d] for d in head["doc_id"]],
            batch_size=batch_size,
            progress=progress,
        ),
        dtype=np.float64,
    ).reshape(-1)
    if len(scores) != len(head):
        raise RuntimeError(f"the student returned {len(scores)} scores for {len(head)} pairs")
    head["score"] = scores
    # ties keep the first-stage order (a constant-score student leaves the run as it was)
    head = head.sort_values(["query_id", "score", "first_stage_rank"], ascending=[True, False, True], kind="stable")
    floor = head.groupby("query_id")["score"].min()
    # astype: mapping an empty tail gives a string column under pandas' string dtype
    tail["score"] = tail["query_id"].map(floor).astype(np.float64) - (tail["first_stage_rank"] - depth).astype(
        np.float64
    )
    out = pd.concat([head, tail], ignore_index=True).sort_values(
        ["query_id", "score", "first_stage_rank"], ascending=[True, False, True], kind="stable"
    )
    out["rank"] = out.groupby("query_id", sort=False).cumcount() + 1
    out = out.reset_index(drop=True)[RERANKED_COLUMNS]
    return out.astype({"rank": np.int32, "first_stage_rank": np.int32, "score": np.float64})


@dataclass(frozen=True)
class RerankTiming:
    """What one rerank cost: queries, (query, passage) pairs scored, wall seconds."""

    queries: int
    pairs: int
    seconds: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("inf")


def timed_rerank(
    student: Student,
    queries: dict[str, str],
    passages: dict[str, str],
    run: pd.DataFrame,
    depth: int,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[pd.DataFrame, RerankTiming]:
    """``rerank_run`` and what it cost."""
    start = time.perf_counter()
    reranked = rerank_run(student, queries, passages, run, depth, batch_size, progress)
    seconds = time.perf_counter() - start
    pairs = int((reranked["first_stage_rank"] <= depth).sum())
    return reranked, RerankTiming(queries=int(reranked["query_id"].nunique()), pairs=pairs, seconds=seconds)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillrank rerank",
        description="Rerank the top DEPTH of a first-stage TREC run of a BEIR-layout collection with a student.",
    )
    parser.add_argument("--model", type=Path, required=True, help="a trained student's folder")
    parser.add_argument(
        "--collection", type=Path, required=True, help="BEIR-layout folder (corpus.jsonl, queries.jsonl)"
    )
    parser.add_argument("--run", type=Path, required=True, help="first-stage run, TREC format")
    parser.add_argument("--out", type=Path, required=True, help="the reranked run (TREC format, tag = model name)")
    parser.add_argument("--depth", type=_positive_int, default=100, help="documents reranked per query (100)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--split", default="test", help="qrels split for nDCG@10 before/after (qrels/SPLIT.tsv)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: CUDA when present")
    parser.add_argument(
        "--precision",
        choices=get_args(ScoringPrecision),
        default="auto",
        help="auto: the student's training precision here (bf16 where the CPU/GPU has it); int8: CPU only",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _ndcg_before_after(
    qrels: pd.DataFrame, before: pd.DataFrame, after: pd.DataFrame, split: str
) -> tuple[float, float, int] | None:
    """nDCG@10 of both runs on the run's queries judged in ``split``; None when none is."""
    from pipeline.metrics import evaluate_run

    judged = qrels[(qrels["split"] == split) & qrels["query_id"].isin(set(after["query_id"]))]
    if judged.empty:
        return None
    first = evaluate_run(judged, before, ("nDCG@10",))
    second = evaluate_run(judged, after, ("nDCG@10",))
    return first.aggregate["nDCG@10"], second.aggregate["nDCG@10"], first.queries


def main(argv: list[str] | None = None) -> int:
    """``distillrank rerank``: exit code 0, or 2 with one line naming the file for a problem the user can fix."""
    from pipeline.io import RunFormatError, read_trec_run, write_trec_run
    from pipeline.lucene import document_contents
    from pipeline.sources import CollectionError, load_beir_folder
    from pipeline.students.base import StudentLoadError, read_student_info
    from pipeline.students.registry import load_student

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rerank %(levelname)s %(message)s")
    # cheap checks first: a wrong path should not wait for a corpus or a model to load
    try:
        read_student_info(args.model)
    except StudentLoadError as err:
        return _fail(str(err))
    if not args.run.is_file():
        return _fail(f"{args.run}: run file not found")
    # never a folder made on the user's behalf: a mistyped --out would hide the run somewhere unexpected
    if args.out.is_dir():
        return _fail(f"--out {args.out}: is a directory; give the reranked run's file name, e.g. {args.out}/run.trec")
    if not args.out.parent.is_dir():
        return _fail(f"--out {args.out}: directory {args.out.parent} does not exist (create it, or write elsewhere)")
    try:
        run = read_trec_run(args.run)
    except RunFormatError as err:
        return _fail(str(err))
    if run.empty:
        return _fail(f"{args.run}: the run is empty")
    try:
        collection = load_beir_folder(args.collection, args.collection.name)
    except CollectionError as err:
        return _fail(str(err))

    known_docs = set(collection.corpus["doc_id"])
    unknown_docs = ~run["doc_id"].isin(known_docs)
    if unknown_docs.all():
        return _fail(
            f"{args.run}: none of its {run['doc_id'].nunique()} doc ids is in {args.collection / 'corpus.jsonl'} "
            f"(e.g. {run['doc_id'].iloc[0]!r}): is it a run of this collection?"
        )
    if unknown_docs.any():
        log.warning(
            "%s: %d of %d rows name documents not in %s; dropped (they cannot be scored)",
            args.run,
            int(unknown_docs.sum()),
            len(run),
            args.collection / "corpus.jsonl",
        )
    query_text = dict(zip(collection.queries["query_id"], collection.queries["text"], strict=True))
    unknown_queries = ~run["query_id"].isin(set(query_text))
    if unknown_queries.all():
        return _fail(f"{args.run}: none of its query ids is in {args.collection / 'queries.jsonl'}")
    if unknown_queries.any():
        log.warning(
            "%s: %d queries are not in %s; dropped",
            args.run,
            run.loc[unknown_queries, "query_id"].nunique(),
            args.collection / "queries.jsonl",
        )
    run = run[~unknown_docs & ~unknown_queries].reset_index(drop=True)
    corpus = collection.corpus[collection.corpus["doc_id"].isin(set(run["doc_id"]))]
    passages = {
        d: document_contents(t, x) for d, t, x in zip(corpus["doc_id"], corpus["title"], corpus["text"], strict=True)
    }

    try:
        student = load_student(args.model, device=args.device, precision=args.precision)
    except StudentLoadError as err:
        return _fail(str(err))
    reranked, timing = timed_rerank(
        student, query_text, passages, run, args.depth, args.batch_size, progress=not args.no_progress
    )
    tag = args.model.resolve().name
    write_trec_run(reranked, args.out, tag=tag)
    line = (
        f"{tag}: reranked {timing.queries} queries, {timing.pairs} pairs in {timing.seconds:.1f} s "
        f"({timing.pairs_per_s:.1f} pairs/s, {getattr(student, 'precision', 'fp32')}) -> {args.out}"
    )
    figures = _ndcg_before_after(collection.qrels, run, reranked, args.split)
    if figures is not None:
        before, after, judged = figures
        line += f"; nDCG@10 {before:.4f} -> {after:.4f} ({judged} queries judged in {args.split})"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
