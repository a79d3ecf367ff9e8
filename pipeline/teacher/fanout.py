"""Teacher fan-out: a teach target's queries split into shards, each shard a Prefect task run by a Prefect task
runner, so that several threads, processes or machines share the calls (``teacher.fan_out``).

Why it is safe to split: every call's cache key holds the query and its passages, so two shards never ask the
same call (unless two queries have the same text and candidates, which the unsharded run pays twice too, once
per concurrent query). Each shard's task opens the call cache itself (``TeacherCache``: its own JSONL shard file
in the one cache folder, written with fsync per call) and has its own ``CachedTeacher``, so a shard that fails
or is killed keeps every call it was paid for, and the re-run pays only the rest.

What a limit means across shards:

- ``teacher.budget``: each shard may spend ``1/shards`` of each limit (``share_budget``), so the shards together
  never exceed it; a shard that finishes under its share does not lend the rest to another. (A shared counter
  would need a lock every worker reaches, a Dask ``Lock`` or an API; a split needs nothing and is exact.)
- ``teacher.breaker``: per shard. A dead endpoint trips each shard's own breaker, so at most ``shards x
  consecutive_failures`` calls fail before every shard stops.
- concurrency: each shard runs up to ``endpoint.max_concurrency`` calls at once, so ``workers x max_concurrency``
  are in flight together: set them for the server (a vLLM server batches hundreds).

The outcomes merge into exactly what one shard writes: the shards are contiguous runs of the pool's queries in
its order, so their rankings, windows and rationales concatenated are the unsharded rows in the unsharded order;
the summary figures are sums (``merge_stats``) and the call counters too.

Memory: the stage holds the target's candidates as ids and ranks only; each shard reads its own queries'
passages from the corpus (``candidates.with_passages``: a pyarrow filter, never the whole corpus) and frees them
with its walks, ``scale.chunk_queries`` queries at a time (``teach_in_chunks``), writing each chunk's rows to the
stage's spill folder (``spill_chunk``) rather than keeping them. So the passages and prompts in memory are those
of the chunks running, and the rows are on disk until the stage copies them into its tables.

``shards: 1`` (the default) runs the one shard in the stage's own process, without Prefect: today's behaviour.
More shards run in a Prefect flow (``teach-fan-out``) whose task runner is ``ThreadPoolTaskRunner`` or
prefect-dask's ``DaskTaskRunner`` (a ``LocalCluster`` on 127.0.0.1, or an existing cluster's scheduler); the flow
reports to ``PREFECT_API_URL``, or to a temporary local Prefect server when none is set (it takes seconds to start).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.config import Budget, EndpointConfig, FanOutConfig, TeacherConfig
from pipeline.io import release_freed_memory, write_table
from pipeline.teacher import listwise, pointwise, rationales
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.candidates import with_passages
from pipeline.teacher.client import CachedTeacher, TeacherCallError, TeacherCounters
from pipeline.teacher.outcome import RANKING_COLUMNS, LabelTables, Pool, Provenance, TeachOutcome, calling_tables

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

Method = Callable[[Pool, CachedTeacher, TeacherConfig], TeachOutcome]
# the methods that call the LLM (``imported`` calls no one)
CALLING_METHODS: dict[str, Method] = {
    "listwise": listwise.teach,
    "pointwise": pointwise.teach,
    "rationales": rationales.teach,
}
# figures of a method's summary that are ratios of two sums: recomputed after the merge, never added up
RATIOS: dict[str, tuple[str, str]] = {"identity_share": ("identity_windows", "windows")}


class ShardFailed(TeacherCallError):
    """A shard stopped on a failed teacher call; its message says what the shard paid for (all of it cached).
    A message only, so that it pickles back from a Dask worker whole."""


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of at most ``shards`` contiguous, non-empty shards of ``n`` items, sizes within one.

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    >>> shard_bounds(2, 4), shard_bounds(0, 3), shard_bounds(5, 1)
    ([(0, 1), (1, 2)], [], [(0, 5)])
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1 (got {shards})")
    count = min(shards, n)
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def split_pool(pool: Pool, shards: int) -> list[Pool]:
    """``pool`` as at most ``shards`` pools of contiguous queries, in the order its candidates list them.

    >>> pool = Pool(pd.DataFrame({"query_id": ["a", "b", "c"], "text": ["x", "y", "z"]}),
    ...             pd.DataFrame({"query_id": ["a", "a", "b", "c"], "doc_id": ["1", "2", "1", "3"],
    ...                           "rank": [1, 2, 1, 1], "passage": ""}))
    >>> [(p.queries.query_id.tolist(), p.candidates.doc_id.tolist()) for p in split_pool(pool, 2)]
    [(['a'], ['1', '2']), (['b', 'c'], ['1', '3'])]
    """
    return list(iter_parts(pool, shards))


def iter_parts(pool: Pool, parts: int) -> Iterator[Pool]:
    """``split_pool``'s parts one at a time, each made when it is asked for: a shard's chunks are never all in
    memory beside the shard's pool (each is a copy of its rows).

    >>> pool = Pool(pd.DataFrame({"query_id": ["a", "b"], "text": ["x", "y"]}),
    ...             pd.DataFrame({"query_id": ["a", "b"], "doc_id": ["1", "2"], "rank": [1, 1]}))
    >>> [p.queries.query_id.tolist() for p in iter_parts(pool, 2)]
    [['a'], ['b']]
    """
    if parts == 1:
        yield pool
        return
    query_ids = pool.candidates.query_id.unique()
    for start, end in shard_bounds(len(query_ids), parts):
        wanted = set(query_ids[start:end])
        yield Pool(
            queries=pool.queries[pool.queries.query_id.isin(wanted)].reset_index(drop=True),
            candidates=pool.candidates[pool.candidates.query_id.isin(wanted)],
            origin=pool.origin,
        )


def share_budget(budget: Budget, shards: int) -> Budget:
    """One shard's share of ``budget``: each limit divided by ``shards`` (tokens rounded down, so that the shares
    never add up to more than the budget); prices unchanged.

    >>> share = share_budget(Budget(max_prompt_tokens=100, max_cost_usd=1.0, price_per_1k_prompt=0.15), 3)
    >>> share.max_prompt_tokens, share.max_completion_tokens, round(share.max_cost_usd, 4), share.price_per_1k_prompt
    (33, None, 0.3333, 0.15)
    """
    if shards == 1:
        return budget
    return dataclasses.replace(
        budget,
        max_prompt_tokens=None if budget.max_prompt_tokens is None else budget.max_prompt_tokens // shards,
        max_completion_tokens=None if budget.max_completion_tokens is None else budget.max_completion_tokens // shards,
        max_cost_usd=None if budget.max_cost_usd is None else budget.max_cost_usd / shards,
    )


def _merge_value(key: str, values: list[Any]) -> Any:
    if all(isinstance(v, Mapping) for v in values):
        return merge_stats(values)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(v == values[0] for v in values):  # a template's name, a flag: the same in every shard
        return values[0]
    raise ValueError(f"the shards' figure {key!r} differs and cannot be added up: {values}")


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary figures of several shards as one run's: counts added up (nested too), ratios (``RATIOS``)
    recomputed from the merged counts, every other figure the same in every shard, keys in first-seen order.

    >>> merge_stats([{"windows": 2, "identity_windows": 1, "identity_share": 0.5, "parse": {"ok": 2},
    ...               "template": "t@v1"},
    ...              {"windows": 2, "identity_windows": 0, "identity_share": 0.0, "parse": {"ok": 1, "failed": 1},
    ...               "template": "t@v1"}])
    {'windows': 4, 'identity_windows': 1, 'identity_share': 0.25, 'parse': {'ok': 3, 'failed': 1}, 'template': 't@v1'}
    """
    keys = list(dict.fromkeys(key for part in parts for key in part))
    merged: dict[str, Any] = {}
    for key in keys:
        values = [part[key] for part in parts if key in part]
        if key in RATIOS:
            merged[key] = None  # placed now, so that the key keeps its position; computed below
            continue
        merged[key] = _merge_value(key, values)
    for key, (numerator, denominator) in RATIOS.items():
        if key in merged:
            total = merged.get(denominator) or 0
            merged[key] = round(merged.get(numerator, 0) / total, 4) if total else None
    return merged


def add_counters(parts: Sequence[TeacherCounters]) -> TeacherCounters:
    """The shards' call counters added up.

    >>> add_counters([TeacherCounters(calls=2, cached=1), TeacherCounters(calls=3, prompt_tokens=7)])
    TeacherCounters(calls=5, cached=1, errors=0, unusable=0, prompt_tokens=7, completion_tokens=0, cost_usd=0.0)
    """
    names = [f.name for f in dataclasses.fields(TeacherCounters)]
    return TeacherCounters(**{name: sum(getattr(part, name) for part in parts) for name in names})


@dataclass(frozen=True)
class ShardJob:
    """What one shard's task needs, all of it picklable (it travels to a Dask worker): its queries, the teacher,
    the endpoint to call (resolved in the stage: a local server's URL), the cache folder (absolute: a worker
    elsewhere sees it on shared storage at the same path) and the run's provenance. ``corpus``: where the shard
    reads its passages (None: the pool has them), so that only the running shards' passages are ever in memory."""

    index: int
    shards: int
    pool: Pool
    teacher: TeacherConfig
    endpoint: EndpointConfig
    cache_dir: Path
    template_hash: str
    run_id: str
    corpus: Path | None = None
    chunk_queries: int | None = None
    # where each chunk's rows go as soon as they are labelled (``spill_chunk``; absolute, on storage every worker
    # sees, as the cache folder), with the columns the stage adds to them; None: they come back in the outcome
    spill_dir: Path | None = None
    provenance: Provenance | None = None


@dataclass(frozen=True)
class ShardResult:
    """A shard's outcome (without rows when they were spilled: its figures and budget stop only), its call
    counters and its spilled chunks in order (``spill_chunk``'s names)."""

    index: int
    outcome: TeachOutcome
    counters: TeacherCounters
    chunks: tuple[Path, ...] = ()


# a spilled chunk's tables: the stage's three and the chunk's candidates (for the first stage's figures)
SPILL_SCHEMAS: dict[str, pa.Schema] = {
    "teacher_rankings": schemas.TABLES["teacher_rankings"].schema,
    "teacher_windows": schemas.TABLES["teacher_windows"].schema,
    "rationales": schemas.TABLES["rationales"].schema,
    "candidates": pa.schema([schemas.CANDIDATES.field(name) for name in ("query_id", "doc_id", "rank")]),
}


def spill_paths(chunk: Path) -> dict[str, Path]:
    """The files of the spilled chunk ``chunk``, by table.

    >>> spill_paths(Path("/s/shard-00000-chunk-000001"))["rationales"]
    PosixPath('/s/shard-00000-chunk-000001.rationales.parquet')
    """
    return {table: chunk.with_name(f"{chunk.name}.{table}.parquet") for table in SPILL_SCHEMAS}


def spill_chunk(tables: LabelTables, spill_dir: Path, shard: int, chunk: int) -> Path:
    """Write one chunk's tables to ``spill_dir`` (each file atomically: a killed shard leaves no half a chunk),
    named so that shard then chunk order is their names' order; returns the chunk's name (``spill_paths``)."""
    name = spill_dir / f"shard-{shard:05d}-chunk-{chunk:06d}"
    frames = tables.by_table()
    for table, path in spill_paths(name).items():
        write_table(frames[table], SPILL_SCHEMAS[table], path)
    return name


def read_spilled(chunk: Path) -> dict[str, pa.Table]:
    """A spilled chunk's tables, by table, as they were written."""
    return {table: pq.read_table(path) for table, path in spill_paths(chunk).items()}


def spilled_schemas(chunks: Sequence[Path]) -> dict[str, pa.Schema]:
    """Each table's schema with the pandas metadata (extension dtypes such as ``Int32``) of the first of
    ``chunks`` that has rows of it (else of the first chunk): the metadata the table written at once had, so that
    pandas reads the streamed table back with the same dtypes. Reads the files' footers only."""
    found: dict[str, pa.Schema] = {}
    for table, schema in SPILL_SCHEMAS.items():
        files = [spill_paths(chunk)[table] for chunk in chunks]
        with_rows = [path for path in files if pq.ParquetFile(path).metadata.num_rows]
        source = (with_rows or files)[:1]
        found[table] = schema.with_metadata(pq.read_schema(source[0]).metadata) if source else schema
    return found


def shard_jobs(
    pool: Pool,
    teacher: TeacherConfig,
    endpoint: EndpointConfig,
    cache_dir: Path,
    template_hash: str,
    run_id: str,
    corpus: Path | None = None,
    chunk_queries: int | None = None,
    spill_dir: Path | None = None,
    provenance: Provenance | None = None,
) -> list[ShardJob]:
    """One job per shard of ``pool`` (``teacher.fan_out.shards`` of them, fewer for fewer queries); a pool without
    passages needs the ``corpus`` to read them from. Each shard labels ``chunk_queries`` (``scale.chunk_queries``)
    of its queries at a time (None: all at once), and writes each chunk's rows with ``provenance`` to
    ``spill_dir`` (None: returns them)."""
    if corpus is None and "passage" not in pool.candidates:
        raise ValueError("a pool without passages needs the corpus to read them from")
    if (spill_dir is None) != (provenance is None):
        raise ValueError("spilled rows need their provenance (and provenance a spill folder)")
    corpus = None if corpus is None else Path(corpus).resolve()
    cache_dir = Path(cache_dir).resolve()
    spill_dir = None if spill_dir is None else Path(spill_dir).resolve()
    parts = split_pool(pool, teacher.fan_out.shards)
    return [
        ShardJob(
            i,
            len(parts),
            part,
            teacher,
            endpoint,
            cache_dir,
            template_hash,
            run_id,
            corpus,
            chunk_queries,
            spill_dir,
            provenance,
        )
        for i, part in enumerate(parts)
    ]


def teach_shard(job: ShardJob) -> ShardResult:
    """Label one shard's queries with its own client and cache writer (its own JSONL file in the cache folder).

    With more than one shard a failed call stops the shard as ``ShardFailed``, saying what it paid for; alone,
    the method's own error is raised as it is (the unsharded stage's behaviour)."""
    teacher = job.teacher
    with TeacherCache(job.cache_dir) as cache:
        client = CachedTeacher(
            job.endpoint,
            teacher.sampling,
            cache,
            job.template_hash,
            run_id=job.run_id,
            budget=share_budget(teacher.budget, job.shards),
            max_unusable_tries=teacher.max_unusable_tries,
            breaker=teacher.breaker,
        )
        try:
            outcome, chunks = teach_in_chunks(job, client)
        except TeacherCallError as err:
            if job.shards == 1:
                raise
            spent = client.counters
            raise ShardFailed(
                f"teach shard {job.index + 1}/{job.shards} ({len(job.pool.queries)} queries) stopped after paying "
                f"{spent.calls} calls and serving {spent.cached} from the cache (all kept there): {err}"
            ) from None
    return ShardResult(job.index, outcome, client.counters, chunks)


def chunk_count(queries: int, chunk_queries: int | None) -> int:
    """How many chunks of at most ``chunk_queries`` queries ``queries`` queries make (None: one).

    >>> chunk_count(2500, 1000), chunk_count(1000, 1000), chunk_count(3, None), chunk_count(0, 10)
    (3, 1, 1, 1)
    """
    return 1 if chunk_queries is None or queries == 0 else -(-queries // chunk_queries)


def teach_in_chunks(job: ShardJob, client: CachedTeacher) -> tuple[TeachOutcome, tuple[Path, ...]]:
    """The method over the shard's queries, ``job.chunk_queries`` at a time, with one client (so the budget, the
    breaker and the counters are the shard's, as if it ran at once), each chunk's passages read for it alone and
    dropped with its walks when it is done. With a spill folder each chunk's rows are written there as soon as
    they are labelled (``spill_chunk``; the names come back, in order) and the outcome keeps only the figures, so
    that what the shard holds does not grow with its queries; without one the outcome holds every row. The chunks
    are contiguous in the pool's order, so the rows are the one-chunk run's rows (as shards' are,
    ``merge_results``); a budget stop ends a chunk, and every later chunk stops at once as the rest of the
    one-chunk run would have (only the first stop is reported)."""
    method = CALLING_METHODS[job.teacher.method]
    parts = iter_parts(job.pool, chunk_count(job.pool.candidates.query_id.nunique(), job.chunk_queries))
    outcomes, chunks = [], []
    for number, part in enumerate(parts):
        pool = part if job.corpus is None else with_passages(part, job.corpus)
        outcome = method(pool, client, job.teacher)
        del pool
        if job.spill_dir is not None:
            assert job.provenance is not None  # shard_jobs gives both or neither
            tables = calling_tables(outcome, part.candidates, job.provenance)
            chunks.append(spill_chunk(tables, job.spill_dir, job.index, number))
            # the figures only: the rows are on disk
            outcome = TeachOutcome(pd.DataFrame(columns=RANKING_COLUMNS), outcome.stats, outcome.stopped)
            del tables
        outcomes.append(outcome)
        del part
        release_freed_memory()
    merged = merge_outcomes(outcomes, stopped=next((o.stopped for o in outcomes if o.stopped), None))
    return merged, tuple(chunks)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    # an empty shard's frame has object columns: left out, so that the others' dtypes stand
    kept = [frame for frame in frames if len(frame)]
    return pd.concat(kept, ignore_index=True) if kept else frames[0]


def merge_results(results: Sequence[ShardResult]) -> tuple[TeachOutcome, TeacherCounters]:
    """The shards' outcomes (in shard order) as one: rows concatenated, figures and counters added up, and the
    shards' budget stops (``shard i/n: ...``) joined."""
    results = sorted(results, key=lambda r: r.index)
    if len(results) == 1:
        return results[0].outcome, results[0].counters
    stops = [f"shard {r.index + 1}/{len(results)}: {r.outcome.stopped}" for r in results if r.outcome.stopped]
    merged = merge_outcomes([r.outcome for r in results], stopped="; ".join(stops) or None)
    return merged, add_counters([r.counters for r in results])


def merge_outcomes(outcomes: Sequence[TeachOutcome], stopped: str | None) -> TeachOutcome:
    """Consecutive parts' outcomes as one: rows concatenated in order, figures added up (``merge_stats``)."""
    if len(outcomes) == 1:
        return dataclasses.replace(outcomes[0], stopped=stopped)
    return TeachOutcome(
        rankings=_concat([o.rankings for o in outcomes]),
        stats=merge_stats([o.stats for o in outcomes]),
        stopped=stopped,
        windows=_concat([o.windows for o in outcomes]),
        rationales=_concat([o.rationales for o in outcomes]),
    )


def task_runner(fan_out: FanOutConfig) -> TaskRunner:
    """The Prefect task runner ``fan_out`` names: threads here, a Dask ``LocalCluster`` on 127.0.0.1 (processes,
    or threads when ``processes`` is false), or the Dask cluster at ``dask_address``."""
    if fan_out.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=fan_out.workers)
    from prefect_dask import DaskTaskRunner

    if fan_out.dask_address is not None:
        return DaskTaskRunner(address=fan_out.dask_address)
    cluster: dict[str, Any] = {
        "n_workers": fan_out.workers,
        "threads_per_worker": 1,  # one shard per worker at a time: the shard's own threads make its calls
        "processes": fan_out.processes,
        "dashboard_address": None,  # no web dashboard: nothing listens but the scheduler
    }
    if fan_out.processes:  # worker processes talk TCP: on 127.0.0.1 only (threads talk in-process, no socket)
        cluster["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=cluster)


def _run_in_prefect(jobs: Sequence[ShardJob], fan_out: FanOutConfig) -> list[ShardResult]:
    """Every job as a task of a ``teach-fan-out`` flow on ``fan_out``'s task runner; all of them finish (a failed
    shard does not cancel the others, whose calls are paid and kept), then the first failure is raised."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import wait
    from prefect.states import State

    # no result caching (the call cache is the cache) and no retries (a re-run of the stage is the retry: it pays
    # only for what is missing)
    shard_task = task(teach_shard, name="teach-shard", cache_policy=NO_CACHE, retries=0)

    # the jobs reach the flow by closure, not as parameters: a flow run's parameters are sent to the API
    @flow(name="teach-fan-out", task_runner=task_runner(fan_out), validate_parameters=False)
    def teach_fan_out() -> list[State]:
        # the job goes as it is: an annotation (quote, opaque) reaches a Dask worker as a bare tuple; Prefect walks
        # the dataclasses for futures but not into the frames, and finds none
        futures = [
            shard_task.with_options(task_run_name=f"shard-{job.index + 1}-of-{job.shards}").submit(job) for job in jobs
        ]
        wait(futures)
        return [future.state for future in futures]

    states = teach_fan_out()
    results: list[ShardResult] = []
    failures: list[BaseException] = []
    for state in states:
        value = state.result(raise_on_failure=False)
        if isinstance(value, BaseException):
            failures.append(value)
        else:
            results.append(value)
    if failures:
        first = failures[0]
        if not isinstance(first, TeacherCallError):
            raise first  # a bug, not the teacher's: as it is
        raise TeacherCallError(
            f"{len(failures)} of {len(jobs)} teach shards failed; the calls of every shard are kept in the cache, so "
            f"a re-run pays only for the rest. " + " | ".join(str(err) for err in failures)
        ) from first
    return results


def run_shards(jobs: Sequence[ShardJob], fan_out: FanOutConfig) -> list[ShardResult]:
    """The jobs' results: one job in this process without Prefect, several through ``fan_out``'s task runner."""
    if len(jobs) == 1:
        return [teach_shard(jobs[0])]
    return _run_in_prefect(jobs, fan_out)


def without_passages(pool: Pool) -> Pool:
    """``pool`` without its passage texts (what the stage needs once the shards have them).

    >>> pool = Pool(pd.DataFrame({"query_id": ["q"], "text": ["x"]}),
    ...             pd.DataFrame({"query_id": "q", "doc_id": ["a"], "rank": [1], "passage": "long text"}))
    >>> without_passages(pool).candidates.columns.tolist()
    ['query_id', 'doc_id', 'rank']
    """
    return dataclasses.replace(pool, candidates=pool.candidates.drop(columns="passage", errors="ignore"))
