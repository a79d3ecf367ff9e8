"""teach: the LLM teacher ranks each query's candidates → ``teacher_rankings``, ``teacher_windows``,
``rationales`` and ``metrics/teacher/<name>.json``.

Methods (each a ``teach(pool, client, teacher)`` in ``pipeline/teacher/``): ``listwise`` (RankGPT's sliding
window), ``pointwise`` (yes/no or graded relevance from the first token's log-probabilities), ``rationales``
(Reason-to-Rank: windows ranked with a direct and a comparative reason for every passage, as JSON) and
``imported`` (rankings from a TREC run or rank_llm output; an R2R teacher file gives its rationales too).

The queries are the collection's own (``teach.<name>.queries: collection``) or the synthesized ones
(``synthetic``); ``pipeline.teacher.candidates`` says which candidates go with them. Every LLM call goes
through the durable call cache (``paths.teacher_cache``): a re-run pays for nothing twice, a killed run loses at
most the calls in flight, and a budget stops the stage cleanly with everything done so far kept.

``teacher.fan_out`` splits the queries into shards run as Prefect tasks, on threads, a local Dask cluster or a
remote one (``pipeline/teacher/fanout.py``); the shards' outcomes merge into the tables one shard writes.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, Params, Paths, TeacherConfig, TeachTarget, teach_key, teacher_for
from pipeline.io import write_json, write_table
from pipeline.stages.common import split_queries
from pipeline.teacher import imported
from pipeline.teacher.candidates import corpus_path, load_pool, synthetic_queries
from pipeline.teacher.embedded import SERVER_LOG_NAME
from pipeline.teacher.endpoint import teacher_endpoint
from pipeline.teacher.fanout import merge_results, run_shards, shard_jobs, without_passages
from pipeline.teacher.outcome import calls_summary
from pipeline.teacher.quality import source_doc_quality, teacher_quality
from pipeline.teacher.templates import load_template

TEACHER_METRICS_FOLDER = "teacher"


def run(
    name: str,
    target: TeachTarget,
    teacher: TeacherConfig,
    paths: Paths,
    min_relevance: int = 1,
    chunk_queries: int | None = None,
) -> dict:
    """Label ``name``'s target; each shard labels ``chunk_queries`` queries at a time (``scale.chunk_queries``;
    None: all at once), which bounds the passages and prompts in memory and changes no row."""
    started = time.perf_counter()
    if target.queries == "synthetic":
        queries = synthetic_queries(paths, name, target.split)
    else:
        queries = split_queries(paths, name, target.split, f"{teach_key(name, target)}.split")
    # the passages: read by each teach shard for its own queries (bounded memory), but here for the replaying
    # teacher (its server answers from them) and for imported labels
    in_shards = teacher.method != "imported" and teacher.backend != "replay"
    pool = load_pool(name, target, paths, queries, passages=not in_shards)
    # the cache folder is a DVC output: it exists even when imported labels make no call
    paths.teacher_cache_dir(name).mkdir(parents=True, exist_ok=True)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    counters = None
    served: dict = {}  # what a local teacher server (replay) reports it served
    if teacher.method == "imported":
        outcome = imported.teach(pool, None, teacher)
        model = ", ".join(sorted(outcome.rankings.model.unique())) if len(outcome.rankings) else "imported"
        template_hash = ", ".join(f["sha256"] for f in outcome.stats["files"])
        provenance = outcome.rankings[imported.PROVENANCE_COLUMNS]
        labels = outcome.rankings.drop(columns=imported.PROVENANCE_COLUMNS)
    else:
        template_name = {
            "listwise": teacher.listwise.template,
            "pointwise": teacher.pointwise.template,
            "rationales": teacher.rationales.template,
        }[teacher.method]
        template = load_template(template_name)
        # only the replaying teacher's server reads the pool (its passages); given to no other, no one else holds it
        replayed = pool if teacher.backend == "replay" else None
        log = paths.teacher_dir(name) / SERVER_LOG_NAME
        with teacher_endpoint(teacher, paths, replayed, served, server_log=log) as endpoint:
            # the queries in teacher.fan_out.shards shards (1: here, as one), each with its own client and cache file
            corpus = corpus_path(paths, name) if in_shards else None
            jobs = shard_jobs(
                pool, teacher, endpoint, paths.teacher_cache_dir(name), template.sha256, run_id, corpus, chunk_queries
            )
            # the shards hold (or read) the passages; what the stage does after needs none
            pool = without_passages(pool)
            outcome, counters = merge_results(run_shards(jobs, teacher.fan_out))
            del jobs
        model, template_hash = endpoint.model, template.sha256
        labels = outcome.rankings
        provenance = pd.DataFrame(
            {"model": model, "first_stage": target.candidates, "template_hash": template_hash}, index=labels.index
        )

    first_stage = pool.candidates[["query_id", "doc_id", "rank"]].rename(columns={"rank": "first_stage_rank"})
    # imported labels may rank documents outside the pool: their first-stage rank is null
    rankings = (
        pd.concat([labels, provenance], axis=1)
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
    # per-window parse records (window methods; empty for the others, so the table always exists)
    windows_spec = schemas.TABLES["teacher_windows"]
    windows = outcome.windows.assign(collection=name, run_id=run_id)
    write_table(windows, windows_spec.schema, paths.teacher_dir(name) / windows_spec.filename)
    # Reason-to-Rank rationales (method "rationales" or an R2R file; empty for the others, so the table always exists)
    rationales_spec = schemas.TABLES["rationales"]
    reasons = outcome.rationales.assign(
        collection=name, window_rank=lambda r: r.window_rank.astype("Int32"), run_id=run_id
    )
    if "model" not in reasons:  # imported rationales carry their own file's provenance
        reasons = reasons.assign(model=model, template_hash=template_hash)
    write_table(reasons, rationales_spec.schema, paths.teacher_dir(name) / rationales_spec.filename)
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
    summary.update(served)
    if counters is not None:
        summary["calls"] = {
            **calls_summary(counters),
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
    teacher = teacher_for(params.teacher, target)
    return run(name, target, teacher, params.paths, collection.min_relevance, params.scale.chunk_queries)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("teach", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
