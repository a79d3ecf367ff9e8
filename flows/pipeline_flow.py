"""The Prefect flow that runs the DVC pipeline: it orchestrates, it never computes.

DVC stays the single record of lineage (``dvc.lock``): the flow reads the stage graph, in DAG order, from DVC
itself and runs every stage as its own Prefect task, ``dvc repro --single-item <stage>`` in a subprocess, so
that a stage whose dependencies did not change is skipped by DVC exactly as with a plain ``dvc repro``. Each
stage's task waits for (``wait_for``) the tasks of its DVC upstream stages, so the Prefect flow-run graph draws
DVC's edges (``dvc dag``). Each stage's output is streamed into the Prefect run logs, its JSON summary as one
record. At the end the evaluation (``<paths.metrics>/eval.json``, the teachers' figures) is published as a
markdown artifact: the tables ``distillrank report`` prints.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import opaque

ARTIFACT_KEY = "distillrank-eval"
STAGE_RETRIES = 2
STAGE_RETRY_DELAY_SECONDS = 10.0
STDERR_TAIL_LINES = 30
PROJECT_FILE = "dvc.yaml"

Outcome = Literal["ran", "skipped", "restored"]


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited with an error; the message names the stage and ends with stderr."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    outcome: Outcome


@dataclass(frozen=True, eq=False)
class StageGraph:
    """The stages to run, upstream first, and each stage's direct upstream stages (DVC's edges, ``dvc dag``)."""

    order: tuple[str, ...]
    upstreams: Mapping[str, tuple[str, ...]]

    @property
    def sinks(self) -> tuple[str, ...]:
        """The stages no other stage depends on, in run order."""
        depended_on = {up for ups in self.upstreams.values() for up in ups}
        return tuple(stage for stage in self.order if stage not in depended_on)


# --- pure helpers -------------------------------------------------------------------------------------


def execution_order(stages: Sequence[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """Stages in an order where every stage comes after the stages it depends on.

    ``edges`` are ``(upstream, downstream)`` pairs; among the stages that are ready at the same time, the one
    declared first in ``stages`` (dvc.yaml order) goes first, so the order is stable.

    >>> execution_order(["prepare@a", "prepare@b", "index@a", "index@b", "evaluate"],
    ...                 [("prepare@a", "index@a"), ("prepare@b", "index@b"),
    ...                  ("index@a", "evaluate"), ("index@b", "evaluate")])
    ['prepare@a', 'prepare@b', 'index@a', 'index@b', 'evaluate']
    >>> execution_order(["evaluate", "prepare"], [("prepare", "evaluate")])
    ['prepare', 'evaluate']
    """
    import networkx as nx  # DVC's own graph library

    position = {name: i for i, name in enumerate(stages)}
    graph = nx.DiGraph()
    graph.add_nodes_from(stages)
    graph.add_edges_from(edges)
    try:
        return list(nx.lexicographical_topological_sort(graph, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = sorted({node for edge in nx.find_cycle(graph) for node in edge[:2]})
        raise ValueError(f"the stage graph has a cycle through {cycle}") from None


def stage_graph(stages: Sequence[str], edges: Iterable[tuple[str, str]]) -> StageGraph:
    """The :class:`StageGraph` of ``stages`` and their ``(upstream, downstream)`` edges: the run order of
    :func:`execution_order`, and each stage's upstreams in that order.

    >>> graph = stage_graph(["evaluate", "index@a", "prepare@a"],
    ...                     [("prepare@a", "index@a"), ("index@a", "evaluate"), ("prepare@a", "evaluate")])
    >>> graph.order
    ('prepare@a', 'index@a', 'evaluate')
    >>> dict(graph.upstreams)
    {'prepare@a': (), 'index@a': ('prepare@a',), 'evaluate': ('prepare@a', 'index@a')}
    >>> graph.sinks
    ('evaluate',)
    """
    edges = list(edges)
    order = execution_order(stages, edges)
    position = {stage: i for i, stage in enumerate(order)}
    upstreams: dict[str, set[str]] = {stage: set() for stage in order}
    for up, down in edges:
        upstreams[down].add(up)
    return StageGraph(
        order=tuple(order),
        upstreams={stage: tuple(sorted(ups, key=position.__getitem__)) for stage, ups in upstreams.items()},
    )


class LogRecords:
    """Groups a stage's stdout lines into log records: a JSON object printed over several lines (the stage's
    summary, ``json.dumps(..., indent=2)``: ``{`` and ``}`` alone on their lines) is one record; every other
    line is a record of its own, and so is every line of a block that is not JSON after all.

    >>> records = LogRecords()
    >>> [r for line in ["Running stage 'x':", "{", '  "stage": "x",', '  "n": 1', "}", "done"]
    ...  for r in records.feed(line)]
    ["Running stage 'x':", '{\\n  "stage": "x",\\n  "n": 1\\n}', 'done']
    >>> records.feed("{"), records.feed("not json"), records.feed("}")
    ([], [], ['{', 'not json', '}'])
    >>> records.feed("{"), records.feed('  "cut": "short"'), records.flush()
    ([], [], ['{', '  "cut": "short"'])
    """

    def __init__(self) -> None:
        self._block: list[str] = []

    def feed(self, line: str) -> list[str]:
        """The records that ``line`` completes (none while a JSON block is still open)."""
        if self._block:
            self._block.append(line)
            return self._close() if line == "}" else []
        if line == "{":
            self._block = [line]
            return []
        return [line]

    def flush(self) -> list[str]:
        """The lines of a block left open when the output ended, one record each."""
        lines, self._block = self._block, []
        return lines

    def _close(self) -> list[str]:
        lines, self._block = self._block, []
        text = "\n".join(lines)
        try:
            json.loads(text)
        except ValueError:
            return lines
        return [text]


def stage_outcome(stage: str, output: str) -> Outcome:
    """What ``dvc repro --single-item <stage>`` did, from its output.

    >>> stage_outcome("index@a", "Stage 'index@a' didn't change, skipping\\nData and pipelines are up to date.")
    'skipped'
    >>> stage_outcome("index@a", "Stage 'index@a' is cached - skipping run, checking out outputs")
    'restored'
    >>> stage_outcome("index@a", "Running stage 'index@a':\\n> distillrank stage index a")
    'ran'
    """
    quoted = re.escape(f"'{stage}'")
    if re.search(rf"Stage {quoted} didn't change, skipping", output):
        return "skipped"
    if re.search(rf"Stage {quoted} is cached - skipping run", output):
        return "restored"
    return "ran"


def repro_command(dvc: str, stage: str, force: bool) -> list[str]:
    """The ``dvc repro`` command line for one stage (never its upstream stages: the flow runs those).

    >>> repro_command("dvc", "prepare@scifact", force=True)
    ['dvc', 'repro', '--single-item', '--force', 'prepare@scifact']
    """
    return [dvc, "repro", "--single-item", *(["--force"] if force else []), stage]


def stderr_level(line: str) -> int:
    """The log level of a stderr line: DVC's ``ERROR:``/``WARNING:`` lines keep theirs; the rest (progress
    bars, library chatter) is information.

    >>> [logging.getLevelName(stderr_level(x)) for x in ["ERROR: failed", "WARNING: x", "bm25: 100%"]]
    ['ERROR', 'WARNING', 'INFO']
    """
    if line.startswith("ERROR"):
        return logging.ERROR
    if line.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


def failure_message(stage: str, returncode: int, stderr_tail: Sequence[str]) -> str:
    """The error a failed stage raises: the stage, the exit status and the end of its stderr.

    >>> print(failure_message("prepare@a", 255, ["ERROR: failed to reproduce 'prepare@a': boom"]))
    stage 'prepare@a' failed (dvc repro exited with 255); end of stderr:
    ERROR: failed to reproduce 'prepare@a': boom
    """
    tail = "\n".join(stderr_tail) if stderr_tail else "(stderr was empty)"
    return f"stage {stage!r} failed (dvc repro exited with {returncode}); end of stderr:\n{tail}"


def metrics_markdown(
    metrics: Mapping[str, Mapping],
    measures: Sequence[str] = (),
    teachers: Mapping[str, Mapping] | None = None,
    students: set[str] | None = None,
) -> str:
    """The markdown artifact: the tables ``distillrank report`` prints (:mod:`pipeline.report`), with the same
    figures in the same order: each collection's runs (measures in ``measures`` order, then the delta against its
    baseline with p and W/L/T), on the whole split and on the held-out queries; the teachers
    (``metrics/teacher/<target>.json``); the students' fidelity. No heading without a table, no blank cell.

    >>> print(metrics_markdown({"tiny": {"queries": 4, "baseline": "bm25",
    ...                                  "runs": {"bm25": {"R@100": 1.0, "nDCG@10": 0.81234}}}},
    ...                        measures=["nDCG@10", "R@100"]))
    # distillrank evaluation
    <BLANKLINE>
    ## tiny: all 4 queries (against bm25)
    <BLANKLINE>
    | run | nDCG@10 | R@100 | Δ nDCG@10 | p | W/L/T |
    |---|---:|---:|---|---|---|
    | bm25 | 0.8123 | 1.0000 | baseline | - | - |
    <BLANKLINE>
    Δ: the run's nDCG@10 minus the baseline's, the mean over the queries; p: paired t-test; W/L/T: ...
    """
    from pipeline import report

    return report.render_markdown(report.tables(metrics, measures, students, teachers))


# --- DVC ----------------------------------------------------------------------------------------------


def _address(stage: object) -> str:
    """The name ``dvc repro`` takes for a stage, relative to the repository root.

    (``Stage.addressing`` is relative to the *current directory*, which need not be the repository.)
    """
    from dvc.stage import PipelineStage

    path = Path(stage.path_in_repo).as_posix()  # type: ignore[attr-defined]
    if isinstance(stage, PipelineStage):
        return stage.name if path == PROJECT_FILE else f"{path}:{stage.name}"
    return path


def dvc_stage_graph(repo_dir: Path) -> StageGraph:
    """Every stage of the repository's DAG (foreach expansions included), upstream stages first, with each
    stage's direct upstream stages.

    Read from DVC's own index (``Repo.index.graph``, the graph ``dvc dag`` draws), so it is the DAG that
    ``dvc repro`` runs. Data files tracked with ``dvc add`` are not stages to run and are left out.
    """
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        index = repo.index
        stages = [s for s in index.stages if not (s.is_data_source and not s.is_import)]
        names = [_address(s) for s in stages]
        keep = set(names)
        # DVC's graph points from a stage to the stages it depends on.
        edges = [
            (_address(up), _address(down))
            for down, up in index.graph.edges
            if _address(up) in keep and _address(down) in keep
        ]
    return stage_graph(names, edges)


def dag_stages(repo_dir: Path) -> list[str]:
    """Every stage of the repository's DAG (foreach expansions included), upstream stages first."""
    return list(dvc_stage_graph(repo_dir).order)


def _dvc_executable() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def _stage_env() -> dict[str, str]:
    """The environment of ``dvc repro``: this interpreter's bin first on PATH (stage commands call
    ``distillrank``), unbuffered output so lines stream as they come, and no analytics."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _pump(stream: IO[str], name: str, lines: queue.Queue[tuple[str, str | None]]) -> None:
    for line in stream:
        lines.put((name, line.rstrip("\r\n")))
    lines.put((name, None))


def stream_command(command: Sequence[str], cwd: Path) -> Iterator[tuple[str, str]]:
    """Run ``command`` and yield ``("stdout" | "stderr", line)`` as lines arrive; the exit status is the
    generator's return value (``StopIteration.value``)."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=_stage_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    assert process.stdout is not None and process.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(process.stdout, "stdout", lines), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, "stderr", lines), daemon=True),
    ]
    for reader in readers:
        reader.start()
    open_streams = len(readers)
    try:
        while open_streams:
            name, line = lines.get()
            if line is None:
                open_streams -= 1
            elif line.strip():
                yield name, line
    finally:
        if process.poll() is None and open_streams:  # the consumer stopped early
            process.kill()
        for reader in readers:
            reader.join()
    return process.wait()


# --- tasks and flow -----------------------------------------------------------------------------------


@task(name="dag-stages", cache_policy=NO_CACHE)
def read_stage_graph(repo_dir: str) -> StageGraph:
    """The DAG's stages, upstream first, and their edges, as DVC sees them."""
    graph = dvc_stage_graph(Path(repo_dir))
    edges = sum(len(ups) for ups in graph.upstreams.values())
    get_run_logger().info("DVC pipeline: %d stages, %d edges: %s", len(graph.order), edges, ", ".join(graph.order))
    return graph


@task(
    name="dvc-repro",
    task_run_name="dvc repro {stage}",
    retries=STAGE_RETRIES,
    retry_delay_seconds=STAGE_RETRY_DELAY_SECONDS,
    cache_policy=NO_CACHE,
)
def repro_stage(repo_dir: str, stage: str, force: bool = False) -> StageResult:
    """``dvc repro --single-item <stage>``; its output, stdout and stderr, goes to the run logs as it comes (the
    stage's JSON summary as one record)."""
    logger = get_run_logger()
    command = repro_command(_dvc_executable(), stage, force)
    logger.info("$ %s", " ".join(command))
    stdout: list[str] = []
    records = LogRecords()
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    lines = stream_command(command, Path(repo_dir))
    while True:
        try:
            name, line = next(lines)
        except StopIteration as done:
            returncode = done.value
            for record in records.flush():
                logger.info(record)
            break
        if name == "stdout":
            stdout.append(line)
            for record in records.feed(line):
                logger.info(record)
        else:
            stderr_tail.append(line)
            logger.log(stderr_level(line), line)
    if returncode != 0:
        raise StageFailed(failure_message(stage, returncode, list(stderr_tail)))
    outcome = stage_outcome(stage, "\n".join(stdout))
    logger.info("stage %s: %s", stage, outcome)
    return StageResult(stage, outcome)


def metrics_file(repo_dir: Path, params_file: str) -> Path:
    """``<paths.metrics>/eval.json`` of the repository, from its params file."""
    from pipeline.config import load_params
    from pipeline.stages.evaluate import EVAL_METRICS_FILE

    params_path = repo_dir / params_file
    metrics_dir = Path(load_params(params_path).paths.metrics)
    return (metrics_dir if metrics_dir.is_absolute() else repo_dir / metrics_dir) / EVAL_METRICS_FILE


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(repo_dir: str, params_file: str) -> dict:
    """Publish ``eval.json`` and the teachers' figures as the markdown artifact ``distillrank-eval``, the tables
    of ``distillrank report``; returns the metrics."""
    from pipeline.config import load_params
    from pipeline.report import read_teachers

    logger = get_run_logger()
    path = metrics_file(Path(repo_dir), params_file)
    if not path.is_file():
        logger.warning("no metrics at %s: nothing to publish", path)
        return {}
    metrics = json.loads(path.read_text(encoding="utf-8"))
    params = load_params(Path(repo_dir) / params_file)
    teachers = read_teachers(path.parent)
    markdown = metrics_markdown(metrics, params.evaluate.measures, teachers, set(params.students))
    create_markdown_artifact(
        markdown=markdown,
        key=ARTIFACT_KEY,
        description=f"Evaluation metrics ({path.name}) of the distillrank pipeline",
    )
    logger.info("published %s as artifact %r", path, ARTIFACT_KEY)
    return metrics


@flow(name="distillrank-pipeline")
def distillrank_pipeline(
    repo_dir: str = ".",
    params_file: str = "params.yaml",
    force: bool = False,
    retries: int = STAGE_RETRIES,
    retry_delay_seconds: float = STAGE_RETRY_DELAY_SECONDS,
) -> dict:
    """Run every stage of the DVC pipeline in ``repo_dir`` (``dvc repro --single-item``, one task per stage,
    upstream first; ``force`` re-runs unchanged stages too), then publish the evaluation metrics.

    Each stage's task waits for the tasks of its DVC upstream stages (a stage without one, for ``dag-stages``),
    and ``publish-metrics`` for the stages nothing depends on: the flow-run graph is DVC's DAG. The stages run
    one at a time, in order: ``dvc repro`` holds the repository's lock. (``opaque``: a task's upstreams are the
    tasks that returned those results, not whichever earlier task returned a string inside them.)

    With ``orchestration.train_pool`` set in ``params_file``, each ``train@<student>`` stage runs instead as a flow
    run of the training deployment on that work pool (flows/train_job.py), which this flow waits for; its
    downstream stages wait for it as for any stage.

    Returns ``{"stages_run": [...], "stages_skipped": [...], "stages_restored": [...], "metrics": {...}}``;
    a failed stage fails the flow with an error that names it.
    """
    # flows.train_job imports this module: imported here, not at the top
    from flows.train_job import dispatch_train, pooled_stages
    from pipeline.config import load_params

    repo = str(Path(repo_dir).resolve())
    orchestration = load_params(Path(repo) / params_file).orchestration
    run_stage = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    run_on_pool = dispatch_train.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    graph = read_stage_graph(repo)
    on_pool = set(pooled_stages(graph.order, orchestration.train_pool))
    done: dict[str, StageResult] = {}
    for stage in graph.order:
        upstream = [opaque(done[up]) for up in graph.upstreams[stage]] or [opaque(graph)]
        if stage in on_pool:
            done[stage] = run_on_pool(repo, stage, orchestration, force, wait_for=upstream)
        else:
            done[stage] = run_stage(repo, stage, force, wait_for=upstream)
    sinks = [opaque(done[stage]) for stage in graph.sinks] or [opaque(graph)]
    metrics = publish_metrics(repo, params_file, wait_for=sinks)
    results = list(done.values())
    return {
        "stages_run": [r.stage for r in results if r.outcome == "ran"],
        "stages_skipped": [r.stage for r in results if r.outcome == "skipped"],
        "stages_restored": [r.stage for r in results if r.outcome == "restored"],
        "metrics": metrics,
    }
