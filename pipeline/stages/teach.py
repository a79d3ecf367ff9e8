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

Memory does not grow with the queries' labels: each shard writes each chunk's rows (with their provenance and
first-stage ranks) to a spill folder beside the tables (``.spill-<run_id>``, removed after, also on failure) as
soon as they are labelled; the stage then copies the chunks, in shard and chunk order, into the tables (one row
group each) and computes the quality figures chunk by chunk from per-query values (``pipeline/teacher/quality.py``).
Imported labels (a file read whole) are written the same way, as one chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from pipeline import schemas
from pipeline.config import ConfigError, Params, Paths, TeacherConfig, TeachTarget, teach_key, teacher_for
from pipeline.io import ParquetChunkWriter, to_arrow, write_json
from pipeline.stages.common import split_queries
from pipeline.teacher import imported
from pipeline.teacher.candidates import corpus_path, load_pool, synthetic_queries
from pipeline.teacher.embedded import SERVER_LOG_NAME
from pipeline.teacher.endpoint import teacher_endpoint
from pipeline.teacher.fanout import (
    SPILL_SCHEMAS,
    merge_results,
    read_spilled,
    run_shards,
    shard_jobs,
    spilled_schemas,
    without_passages,
)
from pipeline.teacher.outcome import LabelTables, Provenance, calls_summary, label_tables
from pipeline.teacher.quality import SourceDocQuality, TeacherQuality, split_qrels
from pipeline.teacher.templates import load_template

TEACHER_METRICS_FOLDER = "teacher"
# the tables the stage writes, and the label columns its quality figures read
TABLES = ("teacher_rankings", "teacher_windows", "rationales")
QUALITY_COLUMNS = ["query_id", "doc_id", "teacher_rank", "model", "first_stage"]


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
    folder = paths.teacher_dir(name)
    if pool.origin == "collection":
        quality: TeacherQuality | SourceDocQuality = TeacherQuality(
            split_qrels(name, paths, target.split), min_relevance
        )
    else:
        quality = SourceDocQuality(pool.queries)
    if teacher.method == "imported":
        outcome = imported.teach(pool, None, teacher)
        model = ", ".join(sorted(outcome.rankings.model.unique())) if len(outcome.rankings) else "imported"
        template_hash = ", ".join(f["sha256"] for f in outcome.stats["files"])
        provenance = outcome.rankings[imported.PROVENANCE_COLUMNS]
        labels = dataclasses.replace(outcome, rankings=outcome.rankings.drop(columns=imported.PROVENANCE_COLUMNS))
        tables = label_tables(labels, pool.candidates, name, teacher.method, run_id, provenance, model, template_hash)
        # imported labels are held whole (a file's rows, read at once): written as one chunk
        chunk = arrow_tables(tables)
        labelled = write_labels(folder, [chunk], {table: data.schema for table, data in chunk.items()}, quality)
        del chunk
        del labels, tables, provenance
    else:
        template_name = {
            "listwise": teacher.listwise.template,
            "pointwise": teacher.pointwise.template,
            "rationales": teacher.rationales.template,
        }[teacher.method]
        template = load_template(template_name)
        # only the replaying teacher's server reads the pool (its passages); given to no other, no one else holds it
        replayed = pool if teacher.backend == "replay" else None
        log = folder / SERVER_LOG_NAME
        # each chunk's rows go to a folder of their own beside the tables as soon as they are labelled, and from
        # there into the tables, so that no one holds every query's rows; gone after, whatever happens
        spill_dir = folder / f".spill-{run_id}"
        spill_dir.mkdir(parents=True)
        try:
            with teacher_endpoint(teacher, paths, replayed, served, server_log=log) as endpoint:
                # the queries in teacher.fan_out.shards shards (1: here, as one), each with its own client and cache
                corpus = corpus_path(paths, name) if in_shards else None
                provenance = Provenance(
                    name, target.candidates, endpoint.model, template.sha256, teacher.method, run_id
                )
                jobs = shard_jobs(
                    pool,
                    teacher,
                    endpoint,
                    paths.teacher_cache_dir(name),
                    template.sha256,
                    run_id,
                    corpus,
                    chunk_queries,
                    spill_dir,
                    provenance,
                )
                # the shards hold (or read) the passages and the candidates; what the stage does after needs none
                pool = dataclasses.replace(without_passages(pool), candidates=pool.candidates.iloc[:0])
                del replayed
                results = run_shards(jobs, teacher.fan_out)
                del jobs
            outcome, counters = merge_results(results)
            chunks = [chunk for result in sorted(results, key=lambda r: r.index) for chunk in result.chunks]
            del results
            model, template_hash = endpoint.model, template.sha256
            spilled = (read_spilled(chunk) for chunk in chunks)
            labelled = write_labels(folder, spilled, spilled_schemas(chunks), quality)
        finally:
            shutil.rmtree(spill_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    summary = {
        "collection": name,
        "method": teacher.method,
        "model": model,
        "template_hash": template_hash[:12] if teacher.method != "imported" else template_hash,
        "run_id": run_id,
        "queries": {"labelled": labelled, "selected": len(pool.queries)},
        "stopped_early": outcome.stopped,
        "wall_seconds": round(wall, 1),
        "queries_from": pool.origin,
        **outcome.stats,
        # nDCG against qrels for the collection's queries; synthesized ones have no qrels (see source_doc)
        "quality": quality.result() if pool.origin == "collection" else {},
    }
    if pool.origin == "synthetic":
        summary["source_doc"] = quality.result()
    summary.update(served)
    if counters is not None:
        summary["calls"] = {
            **calls_summary(counters),
            "seconds_per_call": round(wall / counters.calls, 2) if counters.calls else None,
        }
    write_json(summary, Path(paths.metrics) / TEACHER_METRICS_FOLDER / f"{name}.json")
    return summary


def arrow_tables(tables: LabelTables) -> dict[str, pa.Table]:
    """``tables`` as the spilled chunks hold them (``fanout.SPILL_SCHEMAS``)."""
    frames = tables.by_table()
    return {table: to_arrow(frames[table], schema) for table, schema in SPILL_SCHEMAS.items()}


def write_labels(
    folder: Path,
    chunks: Iterable[dict[str, pa.Table]],
    table_schemas: dict[str, pa.Schema],
    quality: TeacherQuality | SourceDocQuality,
) -> int:
    """Write the chunks' rows, in order, into ``folder``'s three tables with ``table_schemas`` (the tables' own,
    with the pandas metadata the chunks were written with; one row group per chunk, all three atomically: a
    failure leaves none of them new), adding each chunk to ``quality``; returns how many queries have labels (a
    query's labels are in one chunk)."""
    labelled = 0
    with contextlib.ExitStack() as stack:
        writers = {
            table: stack.enter_context(
                ParquetChunkWriter(folder / schemas.TABLES[table].filename, table_schemas[table])
            )
            for table in TABLES
        }
        for chunk in chunks:
            for table, writer in writers.items():
                writer.write(chunk[table])
            rankings = chunk["teacher_rankings"].select(QUALITY_COLUMNS).to_pandas()
            quality.add(chunk["candidates"].to_pandas(), rankings)
            labelled += rankings.query_id.nunique()
            del chunk, rankings
    return int(labelled)


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
