"""GPU student training as a Prefect work-pool job: one ``train@<student>`` stage, run where a worker runs.

    python -m flows.train_job deploy [--params params.yaml] [--repo-dir DIR]   # register the deployment
    prefect worker start --pool gpu                                             # on the GPU machine

``train_student`` is the flow a worker of the pool named by ``orchestration.train_pool`` runs: ``dvc repro
--single-item train@<student>`` in its checkout, as a subprocess (it orchestrates, it never computes). When the pool
is set, the pipeline flow (flows/pipeline_flow.py) sends every ``train@<student>`` stage there with
``run_deployment`` and waits for it; the rest of the DAG runs where the pipeline flow runs.

How the trained student and its ``dvc.lock`` entry come back (``orchestration.storage``):

- ``shared``: the worker sees the same checkout (an NFS/shared-disk path, ``train_repo_dir``): the job writes the
  student, the metrics and ``dvc.lock`` where the main side reads them; nothing travels.
- ``dvc-remote``: the worker has its own clone at the same git commit. Before the job the main side pushes the
  train stage's upstream outputs (``dvc push <upstreams>``) and hands over its ``dvc.yaml``, ``params.yaml`` and
  ``dvc.lock`` (they may be uncommitted); the job writes them, pulls the inputs (``dvc pull <upstreams>``), trains,
  pushes the stage's cached outputs (``dvc push train@<student>``) and hands back, in its final state's message, the
  stage's ``dvc.lock`` entry and its uncached outputs (metrics JSON, training curve and chart: ``cache: false``, so
  no remote holds them). The main side writes those, merges the entry into its ``dvc.lock`` and pulls the stage's
  outputs (``dvc pull train@<student>``), after which ``dvc status`` there is clean.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows.pipeline_flow import (
    STDERR_TAIL_LINES,
    StageFailed,
    StageResult,
    _dvc_executable,
    _stage_env,
    read_stage_graph,
    repro_stage,
    stderr_level,
    stream_command,
)
from pipeline.config import DEFAULT_PARAMS_FILE, OrchestrationConfig, load_params

TRAIN_FLOW_NAME = "distillrank-train"
TRAIN_STAGE_PREFIX = "train@"
LOCK_FILE = "dvc.lock"
# What the main side hands over with a DVC remote: the pipeline's definition and lineage, which may be uncommitted.
HANDOFF_FILES = ("dvc.yaml", "params.yaml", LOCK_FILE)
UP_TO_DATE = "Data and pipelines are up to date."

Storage = Literal["shared", "dvc-remote"]


@dataclass(frozen=True)
class Handback:
    """What a training job reports back in its final state's message: the stage, what ``dvc repro`` did, the
    stage's ``dvc.lock`` entry and its uncached outputs (base64, by path in the repository) with a DVC remote."""

    stage: str
    outcome: Literal["ran", "skipped", "restored"]
    lock: Mapping | None = None
    files: Mapping[str, str] = field(default_factory=dict)

    def to_message(self) -> str:
        """The JSON text of the state message.

        >>> Handback("train@s", "ran").to_message()
        '{"stage": "train@s", "outcome": "ran", "lock": null, "files": {}}'
        """
        return json.dumps(
            {"stage": self.stage, "outcome": self.outcome, "lock": self.lock, "files": dict(self.files)},
            sort_keys=False,
        )

    @classmethod
    def from_message(cls, message: str | None, stage: str) -> Handback:
        """The handback in a job's state message; the error names the stage when the message is not one.

        >>> Handback.from_message('{"stage": "train@s", "outcome": "skipped", "lock": null, "files": {}}', "train@s")
        Handback(stage='train@s', outcome='skipped', lock=None, files={})
        >>> Handback.from_message("All states completed.", "train@s")
        Traceback (most recent call last):
        ...
        ValueError: the training job of 'train@s' did not hand back its result (state message: 'All states completed.')
        """
        try:
            data = json.loads(message or "")
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("stage") != stage:
            raise ValueError(f"the training job of {stage!r} did not hand back its result (state message: {message!r})")
        return cls(stage=stage, outcome=data["outcome"], lock=data.get("lock"), files=data.get("files") or {})


# --- pure helpers -------------------------------------------------------------------------------------


def is_train_stage(stage: str) -> bool:
    """Whether ``stage`` is one of the root dvc.yaml's ``train@<student>`` stages.

    >>> [is_train_stage(s) for s in ["train@minilm-bi", "rerank@minilm-bi", "sub/dvc.yaml:train@x", "train"]]
    [True, False, False, False]
    """
    return stage.startswith(TRAIN_STAGE_PREFIX) and len(stage) > len(TRAIN_STAGE_PREFIX)


def pooled_stages(order: Sequence[str], train_pool: str | None) -> tuple[str, ...]:
    """The stages the pipeline flow sends to the work pool: every ``train@<student>`` when a pool is set, none
    otherwise (today's behaviour: every stage in the flow's own process).

    >>> order = ["build-collection@t", "train@a", "rerank@a", "train@b", "evaluate"]
    >>> pooled_stages(order, "gpu")
    ('train@a', 'train@b')
    >>> pooled_stages(order, None)
    ()
    """
    return tuple(stage for stage in order if is_train_stage(stage)) if train_pool else ()


def student_of(stage: str) -> str:
    """The student a ``train@<student>`` stage trains.

    >>> student_of("train@minilm-bi")
    'minilm-bi'
    >>> student_of("rerank@minilm-bi")
    Traceback (most recent call last):
    ...
    ValueError: 'rerank@minilm-bi' is not a train@<student> stage
    """
    if not is_train_stage(stage):
        raise ValueError(f"{stage!r} is not a train@<student> stage")
    return stage.removeprefix(TRAIN_STAGE_PREFIX)


def deployment_name(config: OrchestrationConfig) -> str:
    """The ``<flow>/<deployment>`` name ``run_deployment`` takes.

    >>> deployment_name(OrchestrationConfig(train_pool="gpu"))
    'distillrank-train/train-student'
    """
    return f"{TRAIN_FLOW_NAME}/{config.train_deployment}"


def job_parameters(
    student: str, repo_dir: str, config: OrchestrationConfig, force: bool, handoff: Mapping | None = None
) -> dict:
    """The parameters of one training run: the worker's checkout is ``train_repo_dir`` (null: the main side's path,
    shared storage).

    >>> job_parameters("s", "/main/repo", OrchestrationConfig(train_pool="gpu", train_repo_dir="/gpu/repo"), False)
    {'student': 's', 'repo_dir': '/gpu/repo', 'storage': 'shared', 'dvc_remote': None, 'force': False, 'handoff': None}
    """
    return {
        "student": student,
        "repo_dir": config.train_repo_dir or repo_dir,
        "storage": config.storage,
        "dvc_remote": config.dvc_remote,
        "force": force,
        "handoff": dict(handoff) if handoff is not None else None,
    }


def transfer_command(dvc: str, verb: Literal["pull", "push"], stages: Sequence[str], remote: str | None) -> list[str]:
    """``dvc pull`` / ``dvc push`` of the outputs of ``stages`` (not their upstreams'), from/to ``remote``.

    >>> transfer_command("dvc", "pull", ["build-collection@t", "teach-collection@t"], "backup")
    ['dvc', 'pull', '-r', 'backup', 'build-collection@t', 'teach-collection@t']
    >>> transfer_command("dvc", "push", ["train@s"], None)
    ['dvc', 'push', 'train@s']
    """
    return [dvc, verb, *(["-r", remote] if remote else []), *stages]


def merge_lock_entry(lock_text: str | None, stage: str, entry: Mapping) -> dict:
    """The ``dvc.lock`` contents with ``stage``'s entry replaced by ``entry`` (the other stages' kept).

    >>> merge_lock_entry("schema: '2.0'\\nstages:\\n  a:\\n    cmd: x\\n", "train@s", {"cmd": "y"})
    {'schema': '2.0', 'stages': {'a': {'cmd': 'x'}, 'train@s': {'cmd': 'y'}}}
    >>> merge_lock_entry(None, "train@s", {"cmd": "y"})
    {'schema': '2.0', 'stages': {'train@s': {'cmd': 'y'}}}
    """
    import yaml

    lock = yaml.safe_load(lock_text) if lock_text else None
    lock = lock if isinstance(lock, dict) else {}
    lock.setdefault("schema", "2.0")
    lock["stages"] = {**(lock.get("stages") or {}), stage: dict(entry)}
    return lock


def encode_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def safe_relative(repo: Path, name: str) -> Path:
    """``name`` inside ``repo``; a handed-back path that leaves the repository is refused, naming it.

    >>> safe_relative(Path("/r"), "metrics/students/s.json").as_posix()
    '/r/metrics/students/s.json'
    >>> safe_relative(Path("/r"), "../etc/passwd")
    Traceback (most recent call last):
    ...
    ValueError: handed-back path '../etc/passwd' is outside the repository /r
    """
    target = (repo / name).resolve()
    if not target.is_relative_to(repo.resolve()):
        raise ValueError(f"handed-back path {name!r} is outside the repository {repo}")
    return target


# --- DVC ----------------------------------------------------------------------------------------------


def lock_entry(repo: Path, stage: str) -> dict:
    """``stage``'s entry in the repository's ``dvc.lock``."""
    import yaml

    path = repo / LOCK_FILE
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {}) if path.is_file() else {}
    if stage not in stages:
        raise StageFailed(f"{path}: no entry for stage {stage!r} after it ran")
    return stages[stage]


def uncached_outputs(repo: Path, stage: str) -> dict[str, str]:
    """The stage's ``cache: false`` outputs (metrics, plots), base64 by path relative to the repository: no DVC
    remote holds them, so the job hands them back itself."""
    from dvc.repo import Repo

    files: dict[str, str] = {}
    with Repo(str(repo)) as dvc_repo:
        (found,) = dvc_repo.stage.collect(stage)
        for out in found.outs:
            if out.use_cache:
                continue
            path = Path(out.fs_path)
            if path.is_dir():
                raise StageFailed(f"stage {stage!r}: uncached output {path} is a folder; only files are handed back")
            if path.is_file():
                files[path.relative_to(repo.resolve()).as_posix()] = encode_file(path)
    return files


def git_head(repo: Path) -> str:
    """The commit the checkout is at (the error names the folder)."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StageFailed(f"{repo}: not a git checkout with a commit ({result.stderr.strip()})")
    return result.stdout.strip()


def stage_changes(repo: Path, stage: str) -> str:
    """What ``dvc status <stage>`` reports changed in the checkout ("" when it is up to date)."""
    command = [_dvc_executable(), "status", stage]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False, env=_stage_env())
    if result.returncode != 0:
        raise StageFailed(f"{' '.join(command)} failed in {repo}: {result.stderr.strip()[-2000:]}")
    return "" if UP_TO_DATE in result.stdout else result.stdout.strip()


@task(name="dvc-transfer", task_run_name="dvc {verb} {stages}", cache_policy=NO_CACHE)
def dvc_transfer(repo_dir: str, verb: Literal["pull", "push"], stages: list[str], remote: str | None) -> None:
    """``dvc pull`` / ``dvc push`` of the stages' outputs, its output in the run logs."""
    logger = get_run_logger()
    command = transfer_command(_dvc_executable(), verb, stages, remote)
    logger.info("$ %s", " ".join(command))
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    lines = stream_command(command, Path(repo_dir))
    while True:
        try:
            name, line = next(lines)
        except StopIteration as done:
            returncode = done.value
            break
        if name == "stderr":
            tail.append(line)
        logger.log(stderr_level(line) if name == "stderr" else logging.INFO, line)
    if returncode != 0:
        end = "\n".join(tail) or "(stderr was empty)"
        raise StageFailed(f"dvc {verb} {' '.join(stages)} failed in {repo_dir} (exit {returncode}):\n{end}")


def write_handoff(repo: Path, files: Mapping[str, str]) -> None:
    """Write the main side's pipeline files into the worker's clone."""
    from pipeline.io import write_text

    for name, text in files.items():
        if name not in HANDOFF_FILES:
            raise ValueError(f"handoff: {name!r} is not one of {HANDOFF_FILES}")
        write_text(text, repo / name)


def read_handoff(repo: Path) -> dict:
    """What the main side hands over with a DVC remote: its commit and its pipeline files."""
    files = {name: (repo / name).read_text(encoding="utf-8") for name in HANDOFF_FILES if (repo / name).is_file()}
    return {"commit": git_head(repo), "files": files}


def apply_handback(repo: Path, handback: Handback) -> None:
    """The main side, with a DVC remote: the job's uncached outputs written, its ``dvc.lock`` entry merged."""
    import yaml

    from pipeline.io import atomic_path, write_text

    if handback.lock is None:
        raise StageFailed(f"the training job of {handback.stage!r} handed back no dvc.lock entry")
    targets = {name: safe_relative(repo, name) for name in handback.files}  # every path checked before any write
    for name, data in handback.files.items():
        target = targets[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(base64.b64decode(data))
    lock_path = repo / LOCK_FILE
    current = lock_path.read_text(encoding="utf-8") if lock_path.is_file() else None
    write_text(yaml.safe_dump(merge_lock_entry(current, handback.stage, handback.lock), sort_keys=False), lock_path)


# --- the main side -----------------------------------------------------------------------------------


@task(name="train-on-pool", task_run_name="{stage} on the work pool", cache_policy=NO_CACHE)
def dispatch_train(repo_dir: str, stage: str, config: OrchestrationConfig, force: bool = False) -> StageResult:
    """Run ``stage`` (``train@<student>``) as a flow run of the training deployment on ``config.train_pool`` and
    wait for it; a failed or crashed run fails the task with an error that names the stage, the flow run and the
    pool. With a DVC remote, the inputs are pushed first and the outputs pulled after (see the module's
    docstring)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    repo = Path(repo_dir)
    handoff = None
    if config.storage == "dvc-remote":
        upstreams = list(read_stage_graph.fn(repo_dir).upstreams[stage])
        if upstreams:
            dvc_transfer.fn(repo_dir, "push", upstreams, config.dvc_remote)
        handoff = read_handoff(repo)
    name = deployment_name(config)
    logger.info("%s: a run of %s on work pool %r", stage, name, config.train_pool)
    flow_run = run_deployment(
        name=name,
        parameters=job_parameters(student_of(stage), repo_dir, config, force, handoff),
        flow_run_name=f"{stage}",
        timeout=None,  # wait as long as the training takes
        poll_interval=config.poll_seconds,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        kind = state.type.value if state is not None else "no state"
        raise StageFailed(
            f"stage {stage!r} failed on work pool {config.train_pool!r} (flow run {flow_run.name}, {flow_run.id}): "
            f"{kind}: {state.message if state is not None else ''}"
        )
    handback = Handback.from_message(state.message, stage)
    if config.storage == "dvc-remote":
        apply_handback(repo, handback)
        dvc_transfer.fn(repo_dir, "pull", [stage], config.dvc_remote)
        # the clone's lock entry holds its hashes of the stage's code and inputs: a checkout that differs from the
        # commit it was handed (uncommitted code) would record a student trained on other code
        changed = stage_changes(repo, stage)
        if changed:
            message = f"stage {stage!r}: trained on the work pool, but `dvc status {stage}` here says:\n{changed}"
            raise StageFailed(message)
    logger.info("stage %s: %s on work pool %r (flow run %s)", stage, handback.outcome, config.train_pool, flow_run.name)
    return StageResult(stage, handback.outcome)


# --- the job ------------------------------------------------------------------------------------------


@flow(name=TRAIN_FLOW_NAME, flow_run_name="train {student}")
def train_student(
    student: str,
    repo_dir: str = ".",
    storage: Storage = "shared",
    dvc_remote: str | None = None,
    force: bool = False,
    handoff: dict | None = None,
) -> State:
    """Run ``train@<student>`` in the checkout ``repo_dir`` of the machine this flow runs on; with a DVC remote,
    pull its inputs first and push its outputs after (see the module's docstring). The final state's message is
    the :class:`Handback` JSON the pipeline flow reads."""
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    stage = f"{TRAIN_STAGE_PREFIX}{student}"
    if storage == "dvc-remote":
        if handoff is None:
            raise ValueError("storage 'dvc-remote' needs the main side's handoff (its commit and pipeline files)")
        head = git_head(repo)
        if head != handoff["commit"]:
            raise StageFailed(
                f"{repo} is at commit {head[:12]}, the pipeline at {handoff['commit'][:12]}: "
                "check out the same commit on the worker machine"
            )
        write_handoff(repo, handoff["files"])
        upstreams = list(read_stage_graph(str(repo)).upstreams[stage])
        if upstreams:
            dvc_transfer(str(repo), "pull", upstreams, dvc_remote)
    # no retry here: the pipeline flow's dispatch retries (its `retries`), as it would the stage run in place
    result: StageResult = repro_stage.with_options(retries=0)(str(repo), stage, force)
    handback = Handback(stage=stage, outcome=result.outcome)
    if storage == "dvc-remote":
        dvc_transfer(str(repo), "push", [stage], dvc_remote)
        handback = Handback(stage, result.outcome, lock_entry(repo, stage), uncached_outputs(repo, stage))
    logger.info("stage %s: %s in %s", stage, result.outcome, repo)
    return Completed(message=handback.to_message())


# --- the deployment -----------------------------------------------------------------------------------


def deployment_arguments(config: OrchestrationConfig, repo_dir: Path | str) -> dict:
    """The keyword arguments of ``train_student.to_deployment``: the pool and deployment of ``config``, and the
    process a worker starts for a run: in the worker's checkout (``repo_dir``), which is where ``flows`` is
    imported from (a module path, not a file relative to the deploying directory)."""
    from prefect.types.entrypoint import EntrypointType

    if not config.train_pool:
        raise ValueError("orchestration.train_pool is null: name the work pool that runs the training (e.g. gpu)")
    repo = str(Path(repo_dir).resolve()) if config.train_repo_dir is None else config.train_repo_dir
    return {
        "name": config.train_deployment,
        "work_pool_name": config.train_pool,
        "job_variables": {"working_dir": repo, "env": {"PYTHONPATH": repo, "DVC_NO_ANALYTICS": "1"}},
        "parameters": {"repo_dir": repo, "storage": config.storage, "dvc_remote": config.dvc_remote},
        "description": f"dvc repro --single-item train@<student> in {repo} ({config.storage} storage)",
        "tags": ["distillrank", "dvc", "train"],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def deploy(config: OrchestrationConfig, repo_dir: Path | str) -> str:
    """Register (or update) the training deployment with the Prefect API; returns its id."""
    arguments = deployment_arguments(config, repo_dir)
    deployment = train_student.to_deployment(**arguments)
    return str(deployment.apply(work_pool_name=config.train_pool))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.train_job", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    deploy_parser = commands.add_parser("deploy", help="register the training deployment on orchestration.train_pool")
    deploy_parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="params file (orchestration)")
    deploy_parser.add_argument(
        "--repo-dir", type=Path, default=Path("."), help="this checkout (the worker's is orchestration.train_repo_dir)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_params(args.params).orchestration
    deployment_id = deploy(config, args.repo_dir)
    print(f"deployment {deployment_name(config)} ({deployment_id}) on work pool {config.train_pool!r}")


if __name__ == "__main__":
    main()
