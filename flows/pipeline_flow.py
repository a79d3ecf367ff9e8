"""The Prefect flow that runs the DVC pipeline: it orchestrates, it never computes.

DVC stays the single record of lineage (``dvc.lock``): the flow reads the stage list, in DAG order, from DVC
itself and runs every stage as its own Prefect task, ``dvc repro --single-item <stage>`` in a subprocess, so
that a stage whose dependencies did not change is skipped by DVC exactly as with a plain ``dvc repro``. Each
stage's output is streamed into the Prefect run logs. At the end the evaluation metrics
(``<paths.metrics>/eval.json``) are published as a markdown artifact, one table per collection.
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


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_format_value(v) for v in row) + " |" for row in rows]
    return lines


def _measure_order(runs: Mapping[str, Mapping[str, float]], preferred: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(m for measures in runs.values() for m in measures))
    return [m for m in preferred if m in present] + [m for m in present if m not in preferred]


def collection_markdown(name: str, result: Mapping, measures: Sequence[str] = ()) -> str:
    """One collection's section of the artifact: a run × measure table, plus the comparison to the baseline
    (``vs_<baseline>``: headline delta, paired t-test p-value, per-query wins/ties/losses) when there is one.
    """
    runs: Mapping[str, Mapping[str, float]] = result.get("runs", {})
    columns = _measure_order(runs, measures)
    title = f"## {name}" + (f" ({result['queries']} queries)" if "queries" in result else "")
    comparisons = {k.removeprefix("vs_"): v for k, v in result.items() if k.startswith("vs_") and v}
    header = ["run", *columns]
    extra: dict[str, list[object]] = {run: [] for run in runs}
    for baseline, per_run in comparisons.items():
        measure = next(iter(per_run.values())).get("measure", "")
        header += [f"Δ {measure} vs {baseline}", "p-value", "W/T/L"]
        for run in runs:
            c = per_run.get(run)
            extra[run] += (
                [f"{c['delta']:+.4f}", f"{c['p_value']:.4g}", f"{c['wins']}/{c['ties']}/{c['losses']}"]
                if c
                else ["", "", ""]
            )
    rows = [[run, *(values.get(m) for m in columns), *extra[run]] for run, values in runs.items()]
    return "\n".join([title, "", *_table(header, rows)])


def teacher_markdown(teachers: Mapping[str, Mapping]) -> str:
    """The teacher's section of the artifact: one row per labelled collection (``metrics/teacher/<name>.json``).

    >>> print(teacher_markdown({"scifact": {"method": "listwise", "model": "m", "queries": {"labelled": 4},
    ...     "calls": {"paid": 4, "cached": 0}, "identity_share": 1.0,
    ...     "quality": {"teacher": 0.5, "first_stage": 0.5, "measure": "nDCG@10"}}}))
    ## teacher
    <BLANKLINE>
    | collection | method | model | queries | calls | cached | identity | teacher nDCG@10 | first-stage nDCG@10 |
    |---|---:|---:|---:|---:|---:|---:|---:|---:|
    | scifact | listwise | m | 4 | 4 | 0 | 1.0000 | 0.5000 | 0.5000 |
    """
    header = ["collection", "method", "model", "queries", "calls", "cached", "identity"]
    header += ["teacher nDCG@10", "first-stage nDCG@10"]
    rows = []
    for name, t in teachers.items():
        calls, quality = t.get("calls", {}), t.get("quality", {})
        rows.append(
            [
                name,
                t.get("method"),
                t.get("model"),
                t.get("queries", {}).get("labelled"),
                calls.get("paid"),
                calls.get("cached"),
                t.get("identity_share"),
                quality.get("teacher"),
                quality.get("first_stage"),
            ]
        )
    return "\n".join(["## teacher", "", *_table(header, rows)])


def metrics_markdown(metrics: Mapping[str, Mapping], measures: Sequence[str] = ()) -> str:
    """The markdown artifact for ``eval.json``: one table per collection, runs × measures.

    ``measures`` orders the columns (the headline first, as in params.yaml); measures it does not name follow.

    >>> print(metrics_markdown({"tiny": {"queries": 4, "runs": {"bm25": {"R@100": 1.0, "nDCG@10": 0.81234}}}},
    ...                        measures=["nDCG@10", "R@100"]))
    # distillrank evaluation
    <BLANKLINE>
    ## tiny (4 queries)
    <BLANKLINE>
    | run | nDCG@10 | R@100 |
    |---|---:|---:|
    | bm25 | 0.8123 | 1.0000 |
    """
    if not metrics:
        return "# distillrank evaluation\n\nNo metrics: no collection was evaluated."
    sections = [collection_markdown(name, result, measures) for name, result in metrics.items()]
    return "\n\n".join(["# distillrank evaluation", *sections])


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


def dag_stages(repo_dir: Path) -> list[str]:
    """Every stage of the repository's DAG (foreach expansions included), upstream stages first.

    Read from DVC's own index, so it is the DAG that ``dvc repro`` runs. Data files tracked with ``dvc add``
    are not stages to run and are left out.
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
    return execution_order(names, edges)


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
def list_stages(repo_dir: str) -> list[str]:
    """The DAG's stages, upstream first, as DVC sees them."""
    stages = dag_stages(Path(repo_dir))
    get_run_logger().info("DVC pipeline: %d stages: %s", len(stages), ", ".join(stages))
    return stages


@task(
    name="dvc-repro",
    task_run_name="dvc repro {stage}",
    retries=STAGE_RETRIES,
    retry_delay_seconds=STAGE_RETRY_DELAY_SECONDS,
    cache_policy=NO_CACHE,
)
def repro_stage(repo_dir: str, stage: str, force: bool = False) -> StageResult:
    """``dvc repro --single-item <stage>``; its output, stdout and stderr, goes to the run logs as it comes."""
    logger = get_run_logger()
    command = repro_command(_dvc_executable(), stage, force)
    logger.info("$ %s", " ".join(command))
    stdout: list[str] = []
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    lines = stream_command(command, Path(repo_dir))
    while True:
        try:
            name, line = next(lines)
        except StopIteration as done:
            returncode = done.value
            break
        if name == "stdout":
            stdout.append(line)
            logger.info(line)
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
    """Publish ``eval.json`` as the markdown artifact ``distillrank-eval``; returns the metrics."""
    from pipeline.config import load_params

    logger = get_run_logger()
    path = metrics_file(Path(repo_dir), params_file)
    if not path.is_file():
        logger.warning("no metrics at %s: nothing to publish", path)
        return {}
    metrics = json.loads(path.read_text(encoding="utf-8"))
    measures = load_params(Path(repo_dir) / params_file).evaluate.measures
    markdown = metrics_markdown(metrics, measures)
    teachers = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(path.parent.glob("teacher/*.json"))}
    if teachers:
        markdown += "\n\n" + teacher_markdown(teachers)
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

    Returns ``{"stages_run": [...], "stages_skipped": [...], "stages_restored": [...], "metrics": {...}}``;
    a failed stage fails the flow with an error that names it.
    """
    repo = str(Path(repo_dir).resolve())
    run_stage = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    results = [run_stage(repo, stage, force) for stage in list_stages(repo)]
    metrics = publish_metrics(repo, params_file)
    return {
        "stages_run": [r.stage for r in results if r.outcome == "ran"],
        "stages_skipped": [r.stage for r in results if r.outcome == "skipped"],
        "stages_restored": [r.stage for r in results if r.outcome == "restored"],
        "metrics": metrics,
    }
