"""teach: the LLM teacher ranks each query's candidates → ``teacher_rankings``, ``teacher_windows``,
``rationales`` and ``metrics/teacher/<name>.json``.

Methods: ``listwise`` (RankGPT's sliding window), ``pointwise`` (yes/no or graded relevance from the first
token's log-probabilities), ``rationales`` (Reason-to-Rank: windows ranked with a direct and a comparative reason
for every passage, as JSON) and ``imported`` (rankings from a TREC run or rank_llm output; an R2R teacher file
gives its rationales too).

The queries are the collection's own (``teach.<name>.queries: collection``, candidates from ``retrieve``) or the
synthesized ones (``synthetic``: ``paths.synthetic/<name>/queries.parquet``, candidates from the pool stage's
``paths.pool/<name>/candidates.parquet``, shown in the pool's order). Every LLM call goes
through the durable call cache (``paths.teacher_cache``): a re-run pays for nothing twice, a killed run loses at
most the calls in flight, and a budget stops the stage cleanly with everything done so far kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import schemas
from pipeline.config import (
    ConfigError,
    EndpointConfig,
    Params,
    Paths,
    SamplingConfig,
    TeacherConfig,
    TeachTarget,
    teacher_for,
)
from pipeline.io import read_table, write_json, write_table
from pipeline.lucene import document_contents
from pipeline.metrics import evaluate_run
from pipeline.sources import in_split
from pipeline.stages.common import split_queries
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.client import BudgetExceeded, CachedTeacher, result_from_record
from pipeline.teacher.listwise import ListwiseResult, rerank_sliding_window, sliding_windows
from pipeline.teacher.pointwise import graded_score, pointwise_messages, yes_no_score
from pipeline.teacher.rationales import RationaleResult, rank_with_rationales, rationale_response_format
from pipeline.teacher.templates import load_template

T = TypeVar("T")
TEACHER_METRICS_FOLDER = "teacher"
HEADLINE = "nDCG@10"


@dataclasses.dataclass(frozen=True)
class Pool:
    """What the teacher sees: queries (query_id, text; and source_doc_id for synthesized ones) and their
    top-``depth`` candidates with passage text."""

    queries: pd.DataFrame
    candidates: pd.DataFrame  # query_id, doc_id, rank, passage
    origin: str = "collection"  # "collection" or "synthetic" (TeachTarget.queries)


def select_queries(queries: pd.DataFrame, max_queries: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_queries`` queries, a seeded sample (stable across runs, so the cache keeps serving them).

    >>> q = pd.DataFrame({"query_id": [str(i) for i in range(10)]})
    >>> select_queries(q, 3, seed=0).query_id.tolist() == select_queries(q, 3, seed=0).query_id.tolist()
    True
    >>> len(select_queries(q, None, seed=0)), len(select_queries(q, 30, seed=0))
    (10, 10)
    """
    if max_queries is None or max_queries >= len(queries):
        return queries.sort_values("query_id").reset_index(drop=True)
    return queries.sample(n=max_queries, random_state=seed).sort_values("query_id").reset_index(drop=True)


def synthetic_queries(paths: Paths, name: str, split: str) -> pd.DataFrame:
    """The synthesized queries of ``split`` (the synthesize stage's "train" and "dev"; "train,dev": both, so that
    the dev queries the students are validated on have labels too)."""
    path = paths.synthetic_dir(name) / schemas.TABLES["synthetic_queries"].filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no synthesized queries (teach.{name}.queries is 'synthetic': run synthesize)")
    queries = read_table(path)
    wanted = [part.strip() for part in split.split(",") if part.strip()]
    selected = queries[np.logical_or.reduce([in_split(queries["split"], part) for part in wanted])]
    if selected.empty:
        known = sorted({s for joined in queries["split"] for s in joined.split(",")})
        raise ConfigError(f"teach.{name}.split: no synthesized queries in split {split!r} (splits here: {known})")
    return selected.reset_index(drop=True)


SHIPPED_UNION = "shipped-union"


def shipped_union(shipped: pd.DataFrame, depth: int) -> pd.DataFrame:
    """The union of every shipped run's top ``depth`` per query, in reciprocal-rank-fusion order (k = 60), as
    candidates of method ``shipped-union``: TWOLAR's pool of several first stages, for a collection that ships them.

    >>> runs = pd.DataFrame({"run": ["a", "a", "b", "b"], "query_id": "q", "doc_id": ["d1", "d2", "d2", "d3"],
    ...                      "rank": [1, 2, 1, 2], "score": 0.0})
    >>> shipped_union(runs, depth=2)[["doc_id", "rank"]].values.tolist()
    [['d2', 1], ['d1', 2], ['d3', 3]]
    """
    from pipeline.retrievers import rrf_fuse

    runs = [frame[frame["rank"] <= depth] for _, frame in shipped.groupby("run", sort=True)]
    return rrf_fuse(runs, k=60).assign(method=SHIPPED_UNION)


def load_pool(name: str, target: TeachTarget, paths: Paths) -> Pool:
    """The queries and candidates of ``target``: the collection's queries with a ``retrieve`` method's run, or
    the synthesized queries with their pool (``rank`` = the order the pool shows them in)."""
    if target.queries == "synthetic":
        queries = synthetic_queries(paths, name, target.split)
        candidates_path = paths.pool_dir(name) / schemas.TABLES["pool_candidates"].filename
        if not candidates_path.is_file():
            raise FileNotFoundError(
                f"{candidates_path}: no candidate pool (teach.{name}.queries is 'synthetic': run the pool stage)"
            )
    else:
        queries = split_queries(paths, name, target.split, f"teach.{name}.split")
        candidates_path = paths.retrieval_dir(name) / schemas.TABLES["candidates"].filename
    queries = select_queries(queries, target.max_queries, target.seed)
    if target.candidates == SHIPPED_UNION and target.queries == "collection":
        candidates_path = paths.collection_dir(name) / schemas.TABLES["shipped_runs"].filename
        candidates = shipped_union(read_table(candidates_path), target.depth)
    else:
        candidates = read_table(candidates_path)
    methods = sorted(candidates.method.unique())
    # the shipped union is already cut at ``depth`` per run: its own size bounds it
    within_depth = (candidates["rank"] <= target.depth) | (target.candidates == SHIPPED_UNION)
    candidates = candidates[(candidates.method == target.candidates) & within_depth]
    if candidates.empty:
        raise ConfigError(
            f"teach.{name}.candidates: no {target.candidates!r} candidates in {candidates_path} "
            f"(methods here: {methods})"
        )
    candidates = candidates[candidates.query_id.isin(set(queries.query_id))]
    corpus = read_table(paths.collection_dir(name) / schemas.TABLES["corpus"].filename)
    corpus = corpus[corpus.doc_id.isin(set(candidates.doc_id))]
    passages = pd.Series(
        [document_contents(t, x) for t, x in zip(corpus.title, corpus.text, strict=True)], index=corpus.doc_id
    )
    candidates = candidates.sort_values(["query_id", "rank"]).assign(passage=lambda c: c.doc_id.map(passages))
    queries = queries[queries.query_id.isin(set(candidates.query_id))].reset_index(drop=True)
    columns = ["query_id", "text"] + (["source_doc_id"] if target.queries == "synthetic" else [])
    return Pool(
        queries=queries[columns],
        candidates=candidates[["query_id", "doc_id", "rank", "passage"]],
        origin=target.queries,
    )


@contextlib.contextmanager
def teacher_endpoint(teacher: TeacherConfig, paths: Paths) -> Iterator[EndpointConfig]:
    """The endpoint to call: the configured one, or the embedded llama.cpp server for as long as it is needed."""
    if teacher.backend == "openai":
        assert teacher.endpoint is not None  # checked when params are read
        yield teacher.endpoint
        return
    from pipeline.teacher.embedded import assemble_model, embedded_server

    model_file = assemble_model(paths.models)
    with embedded_server(model_file, teacher.embedded.n_ctx, teacher.embedded.threads) as base_url:
        # one llama.cpp slot: concurrent requests would only queue up behind each other
        yield EndpointConfig(base_url=base_url, model=teacher.embedded.model_name, api_key_env=None, max_concurrency=1)


WINDOW_COLUMNS = [
    "query_id",
    "window_start",
    "window_end",
    "parse_status",
    "missing_ids",
    "duplicate_ids",
    "out_of_range_ids",
    "identity",
    "attempts",
    "response",
]


RATIONALE_COLUMNS = schemas.RATIONALE_ROW_COLUMNS


@dataclasses.dataclass
class TeachOutcome:
    rankings: pd.DataFrame  # query_id, doc_id, teacher_rank, score
    stats: dict
    stopped: str | None = None  # why the teacher stopped early (budget), if it did
    windows: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=WINDOW_COLUMNS))
    # rationale rows (method "rationales"; empty otherwise): RATIONALES' columns less model/template/run
    rationales: pd.DataFrame = dataclasses.field(default_factory=lambda: pd.DataFrame(columns=RATIONALE_COLUMNS))


def run_per_query(
    query_ids: list[str],
    one: Callable[[str], tuple[str, T]],
    client: CachedTeacher,
    desc: str,
    **postfix: object,
) -> tuple[dict[str, T], str | None]:
    """``one(query_id)`` for every query, concurrently up to the endpoint's limit, with a progress bar; a budget
    stop skips the queries it hits and is returned (with the results of the others) instead of raised."""
    results: dict[str, T] = {}
    stopped: str | None = None
    bar = tqdm(total=len(query_ids), desc=desc, unit=" queries")
    with ThreadPoolExecutor(max_workers=client.endpoint.max_concurrency) as pool_executor:
        futures = [pool_executor.submit(one, query_id) for query_id in query_ids]
        for future in futures:
            try:
                query_id, result = future.result()
            except BudgetExceeded as err:
                stopped = stopped or str(err)
                continue
            results[query_id] = result
            counters = client.counters
            bar.set_postfix(calls=counters.calls, cached=counters.cached, **postfix)
            bar.update(1)
    bar.close()
    return results, stopped


def teach_listwise(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """RankGPT's sliding window per query; queries run concurrently (windows of one query are sequential)."""
    cfg = teacher.listwise
    template = load_template(cfg.template)

    def ask(messages: list[dict[str, str]], attempt: int) -> str:
        override = None
        if attempt:  # a retry after an unparseable answer: sample, with a seed of its own (a new cache key)
            seed = (teacher.sampling.seed or 0) + attempt
            override = dataclasses.replace(teacher.sampling, temperature=cfg.retry_temperature, seed=seed)
        return client.complete(messages, sampling_override=override).text

    groups = {qid: group for qid, group in pool.candidates.groupby("query_id", sort=False)}
    texts = dict(zip(pool.queries.query_id, pool.queries.text, strict=True))
    windows = sum(len(sliding_windows(len(groups[q]), cfg.window, cfg.step)) for q in groups)

    def one(query_id: str) -> tuple[str, ListwiseResult]:
        group = groups[query_id]
        return query_id, rerank_sliding_window(
            texts[query_id],
            group.passage.tolist(),
            ask,
            cfg.window,
            cfg.step,
            cfg.max_words,
            template,
            cfg.parse_retries,
        )

    results, stopped = run_per_query(list(groups), one, client, "teacher (listwise)", windows=f"{windows}")

    rows = []
    for query_id, result in results.items():
        group = groups[query_id]
        for teacher_rank, index in enumerate(result.order, start=1):
            rows.append((query_id, group.doc_id.iloc[index], teacher_rank, float("nan")))
    calls = [call for result in results.values() for call in result.calls]
    status = Counter(call.parsed.status for call in calls)
    stats = {
        "windows": len(calls),
        "parse": {
            "ok": status["ok"],
            "repaired": status["repaired"],
            "failed": status["failed"],
            "missing_ids": sum(c.parsed.missing for c in calls),
            "duplicate_ids": sum(c.parsed.duplicates for c in calls),
            "out_of_range_ids": sum(c.parsed.out_of_range for c in calls),
            "retried_windows": sum(c.attempts > 1 for c in calls),
        },
        "identity_windows": sum(c.identity for c in calls),
        "identity_share": round(sum(c.identity for c in calls) / len(calls), 4) if calls else None,
        "template": f"{template.name}@v{template.version}",
    }
    frame = pd.DataFrame(rows, columns=["query_id", "doc_id", "teacher_rank", "score"])
    windows_table = pd.DataFrame(
        [
            (
                q,
                c.start,
                c.end,
                c.parsed.status,
                c.parsed.missing,
                c.parsed.duplicates,
                c.parsed.out_of_range,
                c.identity,
                c.attempts,
                c.response,
            )
            for q, result in results.items()
            for c in result.calls
        ],
        columns=WINDOW_COLUMNS,
    )
    return TeachOutcome(frame, stats, stopped, windows_table)


def teach_pointwise(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """One call per (query, passage); the ranking follows the score (ties keep the first-stage order)."""
    cfg = teacher.pointwise
    template = load_template(cfg.template)
    sampling = SamplingConfig(temperature=0.0, max_tokens=1, seed=teacher.sampling.seed, top_logprobs=cfg.top_logprobs)
    texts = dict(zip(pool.queries.query_id, pool.queries.text, strict=True))
    batch = [
        pointwise_messages(template, texts[q], passage, cfg.max_words)
        for q, passage in zip(pool.candidates.query_id, pool.candidates.passage, strict=True)
    ]
    stopped = None
    try:
        client.complete_many(batch, sampling_override=sampling, desc="teacher (pointwise)")
    except BudgetExceeded as err:
        stopped = str(err)
    # Read the answers back from the cache: after a budget stop only some pairs have one.
    scorer = graded_score if cfg.template == "pointwise-graded" else yes_no_score
    scores, flags = [], Counter()
    for messages in batch:
        record = client.cache.get(client.key(messages, sampling))
        if record is None:
            scores.append(None)
            continue
        result = result_from_record(record, cached=True)
        scored = scorer(result.logprobs or [{}])
        flags.update(scored.flags)
        scores.append(scored.score)
    candidates = pool.candidates.assign(score=scores)
    complete = candidates.groupby("query_id").score.transform(lambda s: s.notna().all())
    candidates = candidates[complete].sort_values(["query_id", "score", "rank"], ascending=[True, False, True])
    candidates["teacher_rank"] = candidates.groupby("query_id").cumcount() + 1
    stats = {
        "pairs": len(batch),
        "scored_pairs": int(sum(s is not None for s in scores)),
        "flags": dict(flags),
        "no_answer_token": flags.get("no_answer_token", 0),
        "template": f"{template.name}@v{template.version}",
    }
    frame = candidates[["query_id", "doc_id", "teacher_rank", "score"]].reset_index(drop=True)
    return TeachOutcome(frame, stats, stopped)


def teach_rationales(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """Reason-to-Rank: each query's candidates in windows (R2R: 5, not overlapping), each window ranked with a
    direct and a comparative reason for every passage. With non-overlapping windows the final ranking is every
    window's ranking, the windows concatenated in first-stage order (the teacher never compares passages of two
    windows, so no cross-window order is invented). Queries run concurrently, the windows of one in turn.

    The answer is constrained by a JSON schema (``response_format``) unless ``use_json_schema`` is off, and read
    forgivingly anyway (json_repair); a window with nothing usable is asked again with a new seed.
    """
    cfg = teacher.rationales
    template = load_template(cfg.template)
    base = dataclasses.replace(teacher.sampling, max_tokens=cfg.max_tokens)

    def ask(messages: list[dict[str, str]], n: int, attempt: int) -> tuple[str, str]:
        sampling = base
        if attempt:  # a retry after an unusable answer: sample, with a seed of its own (a new cache key)
            seed = (teacher.sampling.seed or 0) + attempt
            sampling = dataclasses.replace(base, temperature=cfg.retry_temperature, seed=seed)
        response_format = rationale_response_format(n) if cfg.use_json_schema else None
        result = client.complete(messages, sampling_override=sampling, response_format=response_format)
        return result.text, result.key

    groups = {qid: group for qid, group in pool.candidates.groupby("query_id", sort=False)}
    texts = dict(zip(pool.queries.query_id, pool.queries.text, strict=True))

    def one(query_id: str) -> tuple[str, RationaleResult]:
        passages = groups[query_id].passage.tolist()
        return query_id, rank_with_rationales(
            texts[query_id], passages, ask, cfg.window, cfg.step, cfg.max_words, template, cfg.parse_retries
        )

    results, stopped = run_per_query(list(groups), one, client, "teacher (rationales)")

    ranking_rows, rationale_rows, window_rows = [], [], []
    for query_id, result in results.items():
        doc_ids = groups[query_id].doc_id.tolist()
        for teacher_rank, index in enumerate(result.order, start=1):
            ranking_rows.append((query_id, doc_ids[index], teacher_rank, float("nan")))
        for call in result.calls:
            parsed = call.parsed
            ranked = call.ranked()
            window_docs = [doc_ids[index] for index, _, _ in ranked]  # the window, in the teacher's order
            for index, window_rank, reasons in ranked:
                if reasons is None:  # not explained: no rows (teacher_explained shows it with null reasons)
                    continue
                doc_id, others = doc_ids[index], [d for d in window_docs if d != doc_ids[index]]
                common = (window_rank, parsed.status, call.key)
                rationale_rows.append(
                    (query_id, doc_id, "direct", reasons.direct_reason, reasons.answer_sentence, [], *common)
                )
                rationale_rows.append(
                    (query_id, doc_id, "comparative", reasons.comparative_reason, None, others, *common)
                )
            window_rows.append(
                (
                    query_id,
                    call.start,
                    call.end,
                    parsed.status,
                    parsed.missing,
                    parsed.duplicates,
                    parsed.out_of_range,
                    call.identity,
                    call.attempts,
                    call.response,
                )
            )
    calls = [call for result in results.values() for call in result.calls]
    parsed_all = [call.parsed for call in calls]
    status, json_status = Counter(p.status for p in parsed_all), Counter(p.json_status for p in parsed_all)
    explained = sum(len(p.rationales) for p in parsed_all)
    stats = {
        "windows": len(calls),
        "parse": {
            "ok": status["ok"],
            "repaired": status["repaired"],
            "failed": status["failed"],
            "json_ok": json_status["ok"],
            "json_repaired": json_status["repaired"],
            "json_failed": json_status["failed"],
            "missing_ids": sum(p.missing for p in parsed_all),
            "duplicate_ids": sum(p.duplicates for p in parsed_all),
            "out_of_range_ids": sum(p.out_of_range for p in parsed_all),
            "ranking_from_passages": sum(p.ranking_from_passages for p in parsed_all),
            "retried_windows": sum(c.attempts > 1 for c in calls),
        },
        "rationales": {
            "passages_explained": explained,
            "passages_unexplained": sum(p.missing_rationales for p in parsed_all),
            "dropped_entries": sum(p.dropped_entries for p in parsed_all),
            "missing_fields": sum(p.missing_fields for p in parsed_all),
            "empty_reasons": sum(p.empty_reasons for p in parsed_all),
            "answer_sentences": sum(p.answer_sentences for p in parsed_all),
        },
        "identity_windows": sum(c.identity for c in calls),
        "identity_share": round(sum(c.identity for c in calls) / len(calls), 4) if calls else None,
        "template": f"{template.name}@v{template.version}",
        "json_schema": cfg.use_json_schema,
    }
    return TeachOutcome(
        pd.DataFrame(ranking_rows, columns=["query_id", "doc_id", "teacher_rank", "score"]),
        stats,
        stopped,
        pd.DataFrame(window_rows, columns=WINDOW_COLUMNS),
        pd.DataFrame(rationale_rows, columns=RATIONALE_COLUMNS),
    )


def teach_imported(pool: Pool, teacher: TeacherConfig) -> TeachOutcome:
    """Every imported file's rankings of the pool's queries (documents outside the pool are kept: they are labels),
    with each file's provenance columns (model, first_stage, template_hash), and an R2R file's rationales (with
    their file's model and template_hash)."""
    from pipeline.teacher.imported import import_files

    labels = import_files(teacher.imported)
    rankings, files = labels.rankings, labels.files
    wanted = set(pool.queries.query_id)
    covered = rankings[rankings.query_id.isin(wanted)]
    stats: dict = {"files": files, "queries_in_files": int(rankings.query_id.nunique()), "rows_in_files": len(rankings)}
    if teacher.imported.scope == "pool":
        covered = pd.concat(
            [rank_within_pool(frame, pool.candidates) for _, frame in covered.groupby("template_hash", sort=False)],
            ignore_index=True,
        )
        stats["scope"] = "pool"
    rationales = pd.DataFrame(columns=[*RATIONALE_COLUMNS, "model", "template_hash"])
    if labels.rationales is not None:
        rationales = labels.rationales[labels.rationales.query_id.isin(wanted)].reset_index(drop=True)
    for summary in files:
        mine = covered[covered.template_hash == summary["sha256"]]
        summary.update(sha256=summary["sha256"][:12], queries_labelled=int(mine.query_id.nunique()))
    return TeachOutcome(covered.reset_index(drop=True), stats, rationales=rationales)


def rank_within_pool(rankings: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
    """The imported ranking restricted to each query's candidates; candidates it did not rank come last, in
    first-stage order (a reranker's output over the pool). Columns of ``rankings`` are kept; missing ones are
    null-scored.

    >>> r = pd.DataFrame({"query_id": "q", "doc_id": ["x", "b", "a"], "teacher_rank": [1, 2, 3], "score": [3., 2, 1]})
    >>> c = pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "c"], "rank": [1, 2, 3]})
    >>> rank_within_pool(r, c)[["doc_id", "teacher_rank"]].values.tolist()
    [['b', 1], ['a', 2], ['c', 3]]
    """
    merged = candidates[["query_id", "doc_id", "rank"]].merge(
        rankings.drop(columns=["rank"], errors="ignore"), on=["query_id", "doc_id"], how="left"
    )
    unranked = merged["teacher_rank"].isna()
    merged = merged.assign(_unranked=unranked).sort_values(
        ["query_id", "_unranked", "teacher_rank", "rank"], kind="stable"
    )
    merged["teacher_rank"] = merged.groupby("query_id", sort=False).cumcount() + 1
    # candidates the file did not rank carry its provenance too (one file at a time)
    for column in ("model", "first_stage", "template_hash"):
        if column in rankings and len(rankings):
            merged[column] = rankings[column].iloc[0]
    return merged.drop(columns=["rank", "_unranked"]).reset_index(drop=True)


def teacher_quality(name: str, paths: Paths, split: str, pool: Pool, rankings: pd.DataFrame, min_rel: int) -> dict:
    """Each ranked list's nDCG@10 (one per teacher and first stage) next to the target's first stage, on the same
    queries (those with qrels): the check a user makes before distilling a teacher."""
    from pipeline.teacher.imported import list_name

    qrels = read_table(paths.collection_dir(name) / schemas.TABLES["qrels"].filename)
    qrels = qrels[(qrels.split == split) & qrels.query_id.isin(set(rankings.query_id))]
    if qrels.empty or rankings.empty:
        return {}
    judged = set(qrels.query_id)
    measures = (HEADLINE,)
    first = pool.candidates[pool.candidates.query_id.isin(judged)].assign(score=lambda c: -c["rank"].astype(float))
    lists = {}
    for (model, first_stage), frame in rankings[rankings.query_id.isin(judged)].groupby(
        ["model", rankings.first_stage.fillna("")], sort=True
    ):
        run = frame.assign(score=-frame.teacher_rank.astype(float))
        mine = qrels[qrels.query_id.isin(set(run.query_id))]
        lists[list_name(model, first_stage or None)] = {
            "queries": int(mine.query_id.nunique()),
            HEADLINE: round(evaluate_run(mine, run, measures, min_rel).aggregate[HEADLINE], 4),
        }
    quality: dict = {
        "queries": len(judged),
        "first_stage": round(evaluate_run(qrels, first, measures, min_rel).aggregate[HEADLINE], 4),
        "measure": HEADLINE,
    }
    if len(lists) == 1:
        quality["teacher"] = next(iter(lists.values()))[HEADLINE]
    quality["lists"] = lists
    return quality


def source_doc_quality(pool: Pool, rankings: pd.DataFrame) -> dict:
    """For synthesized queries (no qrels): where the teacher puts each query's source document (the one it was
    cropped from or generated for), next to where the first stage had it: mean reciprocal rank and share at rank
    1, over the labelled queries with a source document (one outside the pool counts 0 for both). A sanity
    figure, not a relevance measure: other documents may answer a query as well as its source does.

    >>> pool = Pool(pd.DataFrame({"query_id": ["a", "b"], "text": ["", ""], "source_doc_id": ["d2", "d9"]}),
    ...             pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d1", "d2", "d1"], "rank": [1, 2, 1],
    ...                           "passage": ["", "", ""]}), origin="synthetic")
    >>> labels = pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d2", "d1", "d1"], "teacher_rank": [1, 2, 1]})
    >>> q = source_doc_quality(pool, labels)
    >>> q["queries"], q["source_in_pool"], q["teacher_mrr"], q["first_stage_mrr"], q["teacher_at_1"]
    (2, 0.5, 0.5, 0.25, 0.5)
    """
    queries = pool.queries.dropna(subset=["source_doc_id"])
    queries = queries[queries.query_id.isin(set(rankings.query_id))]
    if queries.empty:
        return {}
    source = dict(zip(queries.query_id, queries.source_doc_id, strict=True))

    def ranks(frame: pd.DataFrame, column: str) -> pd.Series:
        hits = frame[[source.get(q) == d for q, d in zip(frame.query_id, frame.doc_id, strict=True)]]
        return hits.set_index("query_id")[column].reindex(list(source)).astype(float)

    teacher_ranks, first_ranks = ranks(rankings, "teacher_rank"), ranks(pool.candidates, "rank")
    return {
        "queries": len(source),
        "source_in_pool": round(float(first_ranks.notna().mean()), 4),
        "teacher_mrr": round(float((1 / teacher_ranks).fillna(0).mean()), 4),
        "first_stage_mrr": round(float((1 / first_ranks).fillna(0).mean()), 4),
        "teacher_at_1": round(float((teacher_ranks == 1).mean()), 4),
        "first_stage_at_1": round(float((first_ranks == 1).mean()), 4),
    }


def run(name: str, target: TeachTarget, teacher: TeacherConfig, paths: Paths, min_relevance: int = 1) -> dict:
    started = time.perf_counter()
    pool = load_pool(name, target, paths)
    # the cache folder is a DVC output: it exists even when imported labels make no call
    paths.teacher_cache_dir(name).mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    counters = None
    if teacher.method == "imported":
        outcome = teach_imported(pool, teacher)
        model = ", ".join(sorted(outcome.rankings.model.unique())) if len(outcome.rankings) else "imported"
        template_hash = ", ".join(f["sha256"] for f in outcome.stats["files"])
        provenance = outcome.rankings[["model", "first_stage", "template_hash"]]
        outcome.rankings = outcome.rankings.drop(columns=["model", "first_stage", "template_hash"])
    else:
        template_name = {
            "listwise": teacher.listwise.template,
            "pointwise": teacher.pointwise.template,
            "rationales": teacher.rationales.template,
        }[teacher.method]
        template = load_template(template_name)
        with (
            teacher_endpoint(teacher, paths) as endpoint,
            TeacherCache(paths.teacher_cache_dir(name)) as cache,
        ):
            client = CachedTeacher(
                endpoint, teacher.sampling, cache, template.sha256, run_id=run_id, budget=teacher.budget
            )
            method = {"listwise": teach_listwise, "pointwise": teach_pointwise, "rationales": teach_rationales}[
                teacher.method
            ]
            outcome = method(pool, client, teacher)
            counters = client.counters
        model, template_hash = endpoint.model, template.sha256
        provenance = pd.DataFrame(
            {"model": model, "first_stage": target.candidates, "template_hash": template_hash},
            index=outcome.rankings.index,
        )

    first_stage = pool.candidates[["query_id", "doc_id", "rank"]].rename(columns={"rank": "first_stage_rank"})
    # imported labels may rank documents outside the pool: their first-stage rank is null
    rankings = (
        pd.concat([outcome.rankings, provenance], axis=1)
        .merge(first_stage, on=["query_id", "doc_id"], how="left")
        .assign(
            collection=name,
            first_stage_rank=lambda r: r.first_stage_rank.astype("Int32"),
            method=teacher.method,
            run_id=run_id,
        )
    )
    spec = schemas.TABLES["teacher_rankings"]
    write_table(rankings, spec.schema, paths.teacher_dir(name) / spec.filename)
    # per-window parse records (listwise; empty for the other methods, so the table always exists)
    windows_spec = schemas.TABLES["teacher_windows"]
    windows = outcome.windows.assign(collection=name, run_id=run_id)
    write_table(windows, windows_spec.schema, paths.teacher_dir(name) / windows_spec.filename)
    # Reason-to-Rank rationales (method "rationales"; empty for the others, so the table always exists)
    rationales_spec = schemas.TABLES["rationales"]
    rationales = outcome.rationales.assign(
        collection=name, window_rank=lambda r: r.window_rank.astype("Int32"), run_id=run_id
    )
    if "model" not in rationales:  # imported rationales carry their own file's provenance
        rationales = rationales.assign(model=model, template_hash=template_hash)
    write_table(rationales, rationales_spec.schema, paths.teacher_dir(name) / rationales_spec.filename)
    wall = time.perf_counter() - started
    summary = {
        "collection": name,
        "method": teacher.method,
        "model": model,
        "template_hash": template_hash[:12] if teacher.method != "imported" else template_hash,
        "run_id": run_id,
        "queries": {"labelled": int(rankings.query_id.nunique()), "selected": len(pool.queries)},
        "stopped_early": outcome.stopped,
        "wall_seconds": round(wall, 1),
        "queries_from": pool.origin,
        **outcome.stats,
        # nDCG against qrels for the collection's queries; synthesized ones have no qrels (see source_doc)
        "quality": teacher_quality(name, paths, target.split, pool, rankings, min_relevance)
        if pool.origin == "collection"
        else {},
    }
    if pool.origin == "synthetic":
        summary["source_doc"] = source_doc_quality(pool, rankings)
    if counters is not None:
        summary["calls"] = {
            "made": counters.calls,
            "from_cache": counters.cached,
            "errors": counters.errors,
            "prompt_tokens": counters.prompt_tokens,
            "completion_tokens": counters.completion_tokens,
            "estimated_cost_usd": round(counters.cost_usd, 6),
            "seconds_per_call": round(wall / counters.calls, 2) if counters.calls else None,
        }
    write_json(summary, Path(paths.metrics) / TEACHER_METRICS_FOLDER / f"{name}.json")
    return summary


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.teach:
        raise ConfigError(f"teach.{name}: not a teach target in params.yaml (targets: {sorted(params.teach)})")
    collection = params.collection(name)
    target = params.teach[name]
    return run(name, target, teacher_for(params.teacher, target), params.paths, collection.min_relevance)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("teach", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
