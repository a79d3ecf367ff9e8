"""GPU student training as a Prefect work-pool job (flows/train_job.py): the pure parts (which stages go to the pool,
the deployment, the hand-back), then the pipeline flow on a tiny DVC project against a real Prefect API server with a
process work pool and a worker subprocess, on shared storage: train@<student> runs in the worker's flow run, the rest
of the DAG in the pipeline flow's own process, and `dvc status` is clean afterwards."""

from __future__ import annotations

import base64
import doctest
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import flows.train_job as train_job
from conftest import BIN, REPO, make_repo_copy, run_cli, save_tiny_cross_encoder, tiny_params, tool_env
from flows.pipeline_flow import StageFailed, StageResult, dvc_stage_graph
from flows.train_job import (
    TRAIN_FLOW_NAME,
    Handback,
    apply_handback,
    deployment_arguments,
    dispatch_train,
    job_parameters,
    pooled_stages,
    train_student,
)
from pipeline.config import ConfigError, OrchestrationConfig, load_params, parse_params

STUDENT = "tiny-ce"
POOL = "test-gpu"
HARNESS_STARTUP_SECONDS = 90
WORKER_LOG = "worker.log"


# --- pure parts ---------------------------------------------------------------------------------------


def test_docstring_examples() -> None:
    result = doctest.testmod(train_job, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_repositorys_params_keep_training_in_the_flows_process() -> None:
    orchestration = load_params(REPO / "params.yaml").orchestration
    assert orchestration.train_pool is None  # today's behaviour: no stage leaves the flow's process
    assert pooled_stages(dvc_stage_graph(REPO).order, orchestration.train_pool) == ()


def test_with_a_pool_every_train_stage_of_the_dag_goes_there_and_nothing_else() -> None:
    order = dvc_stage_graph(REPO).order
    pooled = pooled_stages(order, "gpu")
    students = load_params(REPO / "params.yaml").students
    assert pooled == tuple(f"train@{name}" for name in students)
    assert all(order.index(f"train@{name}") < order.index(f"rerank@{name}") for name in students)


def test_orchestration_is_typed_and_its_typos_are_named() -> None:
    params = parse_params(tiny_params(orchestration={"train_pool": "gpu", "storage": "dvc-remote"}))
    assert (params.orchestration.train_pool, params.orchestration.storage) == ("gpu", "dvc-remote")
    with pytest.raises(ConfigError, match=r"orchestration.train_pol.*train_pool"):
        parse_params(tiny_params(orchestration={"train_pol": "gpu"}))
    with pytest.raises(ConfigError, match=r"orchestration.storage"):
        parse_params(tiny_params(orchestration={"storage": "nfs"}))
    with pytest.raises(ConfigError, match=r"orchestration.train_pool"):
        parse_params(tiny_params(orchestration={"train_pool": " "}))


def test_the_deployment_sends_runs_to_the_pool_in_the_workers_checkout(tmp_path: Path) -> None:
    shared = OrchestrationConfig(train_pool="gpu")
    arguments = deployment_arguments(shared, tmp_path)
    deployment = train_student.to_deployment(**arguments)
    assert deployment.entrypoint == "flows.train_job.train_student"  # imported from the worker's checkout
    assert (deployment.name, deployment.work_pool_name) == ("train-student", "gpu")
    assert deployment.job_variables["working_dir"] == str(tmp_path.resolve())
    assert deployment.job_variables["env"]["PYTHONPATH"] == str(tmp_path.resolve())
    elsewhere = OrchestrationConfig(train_pool="gpu", train_repo_dir="/gpu/distillrank", storage="dvc-remote")
    assert deployment_arguments(elsewhere, tmp_path)["job_variables"]["working_dir"] == "/gpu/distillrank"
    assert job_parameters("s", str(tmp_path), elsewhere, True)["repo_dir"] == "/gpu/distillrank"
    with pytest.raises(ValueError, match=r"orchestration\.train_pool is null"):
        deployment_arguments(OrchestrationConfig(), tmp_path)


def test_the_handback_writes_the_uncached_outputs_and_merges_the_lock_entry(tmp_path: Path) -> None:
    lock = {"schema": "2.0", "stages": {"build-collection@t": {"cmd": "build"}, "train@s": {"cmd": "old"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    png = bytes(range(256))  # binary files survive the JSON message
    files = {"metrics/students/s.json": b'{"dev": 1}', "plots/training/s.png": png}
    entry = {"cmd": "bin/distillrank stage train s", "outs": [{"path": "data/students/s", "md5": "abc.dir"}]}
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    handback = Handback.from_message(Handback("train@s", "ran", entry, encoded).to_message(), "train@s")
    apply_handback(tmp_path, handback)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    merged = yaml.safe_load((tmp_path / "dvc.lock").read_text(encoding="utf-8"))
    assert merged["stages"] == {"build-collection@t": {"cmd": "build"}, "train@s": entry}
    with pytest.raises(ValueError, match="outside the repository"):
        escaping = {"../escape.txt": encoded["metrics/students/s.json"]}
        apply_handback(tmp_path, Handback("train@s", "ran", entry, escaping))
    assert not (tmp_path.parent / "escape.txt").exists()


# --- the flow against a real Prefect server, a process work pool and a worker --------------------------


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_SECONDS):
        api = PREFECT_API_URL.value()
        assert api.startswith("http://127.0.0.1:"), api
        yield api


def create_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


@pytest.fixture(scope="module")
def worker(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`prefect worker start --pool <pool> --type process` as a subprocess of its own (its log in a file)."""
    create_process_pool(POOL)
    home = tmp_path_factory.mktemp("worker-home")
    log_path = home / WORKER_LOG
    env = tool_env(
        PREFECT_API_URL=prefect_api,
        PREFECT_HOME=str(home),
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_HEARTBEAT_SECONDS="5",
        TRANSFORMERS_OFFLINE="1",
    )
    command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"]
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pooled_params(backbone: Path, base_url: str) -> dict:
    """The tiny collection taught by the local test server (listwise) and one tiny cross-encoder student trained
    for 2 steps; training goes to the pool."""
    params = tiny_params()
    params["teacher"] = {
        "backend": "openai",
        "method": "listwise",
        "endpoint": {"base_url": base_url, "model": "pool-teacher", "api_key_env": None, "max_retries": 0},
        "listwise": {"window": 3, "step": 2},
    }
    params["teach"] = {"collection": {"tiny": {"split": "train", "depth": 4}}, "synthetic": {}}
    params["students"] = {
        STUDENT: {
            "kind": "cross-encoder",
            "backbone": str(backbone),
            "labels": "tiny",
            "max_length": 64,
            "max_steps": 2,
            "eval_every": 1,
        }
    }
    params["rerank"] = {"depth": 10, "first_stage": "bm25"}
    params["orchestration"] = {"train_pool": POOL, "train_deployment": "train-test", "poll_seconds": 1.0}
    return params


def flow_runs_of_deployment(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(messages)
        ):
            messages += [log.message for log in page]
    return messages


@pytest.mark.slow
def test_the_pipeline_flow_trains_on_the_work_pool_with_shared_storage(
    prefect_api: str, worker: Path, tmp_path: Path
) -> None:
    from pipeline.teacher.chat_server import OpenAIServer

    backbone = save_tiny_cross_encoder(tmp_path / "backbone")
    with OpenAIServer() as server:
        params = pooled_params(backbone, server.base_url)
        repo = make_repo_copy(tmp_path / "repo", params)
        # the worker's checkout is this one (shared storage): it imports the job's flow from its flows/
        shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        config = load_params(repo / "params.yaml").orchestration
        deployment_id = train_job.deploy(config, repo)

        started = time.perf_counter()
        state = train_job_pipeline(repo)
        seconds = time.perf_counter() - started
        assert server.served_ok > 0
    assert state.is_completed(), (state.message, worker.read_text(encoding="utf-8")[-3000:])
    summary = state.result()
    print(f"pipeline flow with training on the pool: {seconds:.1f} s")
    stages = [
        "prepare@tiny", "index@tiny", "encode@tiny", "retrieve@tiny", "teach-collection@tiny",
        "build-collection@tiny", f"train@{STUDENT}", f"rerank@{STUDENT}", "evaluate",
    ]  # fmt: skip
    assert summary["stages_run"] == stages
    assert STUDENT in summary["metrics"]["tiny"]["runs"]  # the student trained on the pool reranked downstream

    # train@<student> ran in one flow run of the deployment, which the worker started, on the pool ...
    (job,) = flow_runs_of_deployment(deployment_id)
    assert job.state.is_completed() and job.work_pool_name == POOL
    assert job.infrastructure_pid  # a process the worker started, not this one
    assert job.parameters["student"] == STUDENT and job.parameters["repo_dir"] == str(repo)
    assert Handback.from_message(job.state.message, f"train@{STUDENT}").outcome == "ran"
    job_logs = "\n".join(run_logs(job.id))
    assert f"Running stage 'train@{STUDENT}'" in job_logs
    assert str(job.id) in worker.read_text(encoding="utf-8")
    # ... and no other stage did; the pipeline flow's own process ran none of the training
    assert "Running stage 'rerank@" not in job_logs and "Running stage 'build-" not in job_logs
    pipeline_logs = "\n".join(run_logs(state.state_details.flow_run_id))
    assert f"Running stage 'train@{STUDENT}'" not in pipeline_logs
    assert f"Running stage 'rerank@{STUDENT}'" in pipeline_logs

    # the outputs are where DVC expects them, and DVC agrees everything is up to date
    assert (repo / f"data/students/{STUDENT}").is_dir() and any((repo / f"data/students/{STUDENT}").iterdir())
    assert (repo / f"metrics/students/{STUDENT}.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    assert set(stages) <= set(lock["stages"])
    status = run_cli([str(BIN / "dvc"), "status"], cwd=repo, timeout=300)
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout

    # sent again, the stage is skipped by DVC in the worker's run, and reported as such
    again = dispatch_train(str(repo), f"train@{STUDENT}", config)
    assert again == StageResult(f"train@{STUDENT}", "skipped")
    assert len(flow_runs_of_deployment(deployment_id)) == 2
    # a training run that fails on the pool fails the stage with an error naming it, the pool and the flow run
    with pytest.raises(StageFailed, match=rf"stage 'train@no-such-student' failed on work pool '{POOL}' \(flow run"):
        dispatch_train(str(repo), "train@no-such-student", config)


def train_job_pipeline(repo: Path):
    from flows.pipeline_flow import distillrank_pipeline

    return distillrank_pipeline(repo_dir=str(repo), retries=0, retry_delay_seconds=0, return_state=True)


def test_the_job_flow_is_named_for_the_deployment() -> None:
    assert train_student.name == TRAIN_FLOW_NAME


def files_under(folder: Path) -> list[Path]:
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


def git(repo: Path, *args: str) -> None:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    subprocess.run(command, cwd=repo, env=tool_env(), check=True, capture_output=True)


@pytest.mark.slow
def test_with_a_dvc_remote_the_worker_trains_in_its_own_clone_and_hands_back_the_lock_entry(
    prefect_api: str, worker: Path, tmp_path: Path
) -> None:
    """The worker's checkout is a clone of its own: the inputs go through the DVC remote, the trained student comes
    back through it, the lock entry and the uncached outputs through the job's final state; the main checkout ends
    up to date for DVC, with the student the worker trained."""
    from pipeline.teacher.chat_server import OpenAIServer

    backbone = save_tiny_cross_encoder(tmp_path / "backbone")
    clone = tmp_path / "gpu-clone"
    remote = tmp_path / "remote"
    with OpenAIServer() as server:
        params = pooled_params(backbone, server.base_url)
        params["orchestration"] = {
            "train_pool": POOL,
            "train_deployment": "train-remote",
            "train_repo_dir": str(clone),
            "storage": "dvc-remote",
            "dvc_remote": "backup",
            "poll_seconds": 1.0,
        }
        repo = make_repo_copy(tmp_path / "repo", params)
        shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        for key in ("synthetic", "pool", "teacher", "reranked", "training"):  # committed, as in the repository
            (repo / "data" / key / "README.md").write_text(f"{key}\n", encoding="utf-8")
        (repo / "metrics/students/README.md").write_text("students\n", encoding="utf-8")
        assert run_cli([str(BIN / "dvc"), "remote", "add", "--default", "backup", str(remote)], repo).returncode == 0
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "pipeline")
        git(tmp_path, "clone", "-q", str(repo), str(clone))
        config = load_params(repo / "params.yaml").orchestration
        deployment_id = train_job.deploy(config, repo)

        state = train_job_pipeline(repo)
    assert state.is_completed(), (state.message, worker.read_text(encoding="utf-8")[-3000:])
    summary = state.result()
    assert f"train@{STUDENT}" in summary["stages_run"] and f"rerank@{STUDENT}" in summary["stages_run"]

    (job,) = flow_runs_of_deployment(deployment_id)
    assert job.state.is_completed() and job.parameters["repo_dir"] == str(clone)
    job_logs = "\n".join(run_logs(job.id))
    assert f"Running stage 'train@{STUDENT}'" in job_logs
    # the clone trained: its student, metrics and lock entry are the ones the main checkout now has
    student = f"data/students/{STUDENT}"
    trained = files_under(clone / student)
    assert trained and trained == files_under(repo / student)
    for name in trained:
        assert (repo / student / name).read_bytes() == (clone / student / name).read_bytes()
    metrics = f"metrics/students/{STUDENT}.json"
    assert (repo / metrics).read_bytes() == (clone / metrics).read_bytes()
    main_lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"][f"train@{STUDENT}"]
    clone_lock = yaml.safe_load((clone / "dvc.lock").read_text(encoding="utf-8"))["stages"][f"train@{STUDENT}"]
    assert main_lock == clone_lock
    # the main checkout never trained: it has no trained-here log line, and DVC sees everything up to date
    assert f"Running stage 'train@{STUDENT}'" not in "\n".join(run_logs(state.state_details.flow_run_id))
    status = run_cli([str(BIN / "dvc"), "status"], cwd=repo, timeout=300)
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
