"""The Prefect flow (flows/pipeline_flow.py) that runs the DVC DAG stage by stage, and `make serve`'s
deployment (flows/serve.py): pure helpers, then the real flow against a temporary Prefect server on a
throw-away copy of the repository."""

from __future__ import annotations

import doctest
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import flows.pipeline_flow as pipeline_flow
import flows.serve as serve_module
from conftest import REPO, make_repo_copy, tiny_params, write_params
from flows.pipeline_flow import (
    ARTIFACT_KEY,
    distillrank_pipeline,
    execution_order,
    metrics_markdown,
    stage_outcome,
)
from flows.serve import parse_args, serve_arguments

TINY_STAGES = ["prepare@tiny", "index@tiny", "encode@tiny", "retrieve@tiny", "evaluate"]
HARNESS_STARTUP_SECONDS = 90


# --- pure helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [pipeline_flow, serve_module], ids=lambda m: m.__name__)
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_execution_order_puts_upstream_first_and_keeps_declaration_order() -> None:
    stages = ["evaluate", "retrieve@b", "retrieve@a", "index@a", "index@b", "prepare@a", "prepare@b"]
    edges = [
        ("prepare@a", "index@a"),
        ("prepare@b", "index@b"),
        ("index@a", "retrieve@a"),
        ("index@b", "retrieve@b"),
        ("retrieve@a", "evaluate"),
        ("retrieve@b", "evaluate"),
        ("prepare@a", "evaluate"),
    ]
    order = execution_order(stages, edges)
    assert sorted(order) == sorted(stages)
    for up, down in edges:
        assert order.index(up) < order.index(down)
    # Among ready stages, the one declared first goes first.
    assert order == ["prepare@a", "index@a", "retrieve@a", "prepare@b", "index@b", "retrieve@b", "evaluate"]


def test_execution_order_rejects_a_cycle() -> None:
    with pytest.raises(ValueError, match="cycle"):
        execution_order(["a", "b", "c"], [("a", "b"), ("b", "a")])


def test_stage_outcome_only_matches_its_own_stage() -> None:
    other = "Stage 'prepare@tiny' didn't change, skipping"
    assert stage_outcome("index@tiny", other) == "ran"
    assert stage_outcome("prepare@tiny", other) == "skipped"


EVAL = {
    "tiny": {
        "queries": 4,
        "runs": {
            "bm25": {"R@100": 1.0, "RR@10": 0.875, "nDCG@10": 0.8123},
            "shipped-weak": {"R@100": 0.75, "RR@10": 0.5, "nDCG@10": 0.45567},
        },
        "vs_bm25": {
            "shipped-weak": {"measure": "nDCG@10", "delta": -0.3566, "wins": 0, "losses": 4, "ties": 0,
                             "p_value": 0.00773},
        },
    },
    "other": {"queries": 2, "runs": {"bm25": {"nDCG@10": 0.5}}, "vs_bm25": {}},
}  # fmt: skip


def test_metrics_markdown_has_a_table_per_collection_with_measures_in_params_order() -> None:
    text = metrics_markdown(EVAL, measures=["nDCG@10", "RR@10", "R@100"])
    lines = text.splitlines()
    assert lines[0] == "# distillrank evaluation"
    assert "## tiny (4 queries)" in lines and "## other (2 queries)" in lines
    assert "| run | nDCG@10 | RR@10 | R@100 | Δ nDCG@10 vs bm25 | p-value | W/T/L |" in lines
    assert "| bm25 | 0.8123 | 0.8750 | 1.0000 |  |  |  |" in lines
    assert "| shipped-weak | 0.4557 | 0.5000 | 0.7500 | -0.3566 | 0.00773 | 0/0/4 |" in lines
    # No comparison for a collection without one: no extra columns.
    assert "| run | nDCG@10 |" in lines and "| bm25 | 0.5000 |" in lines
    # Every table row has as many cells as its header.
    for block in text.split("\n\n"):
        rows = [row for row in block.splitlines() if row.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, block


def test_metrics_markdown_without_measure_order_keeps_the_files_order() -> None:
    text = metrics_markdown({"c": {"runs": {"bm25": {"R@100": 0.5, "nDCG@10": 0.25}}}})
    assert "| run | R@100 | nDCG@10 |" in text.splitlines()
    assert "## c" in text.splitlines()


def test_metrics_markdown_of_no_metrics_says_so() -> None:
    assert "No metrics" in metrics_markdown({})


# --- DVC's DAG ----------------------------------------------------------------------------------------


def test_dag_stages_of_the_repository_in_dependency_order(tmp_path: Path, monkeypatch) -> None:
    # From another directory: DVC's own stage names are relative to the current directory.
    monkeypatch.chdir(tmp_path)
    stages = pipeline_flow.dag_stages(REPO)
    assert stages[-1] == "evaluate"
    for name in ("scifact", "trec-dl-2019"):
        chain = [f"prepare@{name}", f"index@{name}", f"retrieve@{name}", "evaluate"]
        positions = [stages.index(stage) for stage in chain]
        assert positions == sorted(positions), stages


# --- make serve ---------------------------------------------------------------------------------------


def test_serve_builds_the_deployment_from_params(tmp_path: Path) -> None:
    params = write_params(
        tmp_path / "params.yaml", tiny_params(schedule={"cron": "30 2 * * 1-5", "timezone": "Europe/Paris"})
    )
    arguments = serve_arguments(params, tmp_path, name="nightly")
    assert arguments["name"] == "nightly"
    assert arguments["schedule"].cron == "30 2 * * 1-5"
    assert arguments["schedule"].timezone == "Europe/Paris"
    assert arguments["parameters"] == {"repo_dir": str(tmp_path.resolve()), "params_file": str(params.resolve())}
    # The same arguments make a deployment, without any server.
    deployment = distillrank_pipeline.to_deployment(**arguments)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 2 * * 1-5", "Europe/Paris")
    assert deployment.parameters == arguments["parameters"]
    assert deployment.entrypoint == "flows.pipeline_flow.distillrank_pipeline"


def test_serve_command_line_defaults() -> None:
    args = parse_args([])
    assert (args.params, args.port, args.no_server) == (Path("params.yaml"), 4200, False)
    assert parse_args(["--no-server", "--port", "4300"]).port == 4300


# --- the flow against a temporary Prefect server ------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=HARNESS_STARTUP_SECONDS):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo_copy(tmp_path_factory.mktemp("flow") / "repo", tiny_params())


@pytest.fixture(scope="module")
def first_run(prefect_server: None, repo: Path):
    state = distillrank_pipeline(repo_dir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    return state


def read_artifact(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    assert len(artifacts) == 1, artifacts
    assert artifacts[0].type == "markdown"
    return artifacts[0].data


def test_first_run_reproduces_every_stage_and_publishes_the_metrics(first_run, repo: Path) -> None:
    summary = first_run.result()
    assert summary["stages_run"] == TINY_STAGES
    assert summary["stages_skipped"] == summary["stages_restored"] == []
    assert (repo / "dvc.lock").is_file() and (repo / "metrics/eval.json").is_file()
    bm25 = summary["metrics"]["tiny"]["runs"]["bm25"]["nDCG@10"]
    assert 0.5 < bm25 <= 1.0

    markdown = read_artifact(first_run.state_details.flow_run_id)
    assert "## tiny (4 queries)" in markdown
    assert "| run | nDCG@10 | RR@10 | R@100 |" in markdown
    assert f"| bm25 | {bm25:.4f} |" in markdown
    assert "| shipped-weak |" in markdown


def test_second_run_skips_every_stage(first_run, repo: Path) -> None:
    summary = distillrank_pipeline(repo_dir=str(repo))
    assert summary["stages_skipped"] == TINY_STAGES
    assert summary["stages_run"] == []
    assert summary["metrics"] == first_run.result()["metrics"]


def test_failing_stage_fails_the_flow_naming_the_stage(prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    missing = tmp_path / "no-such-collection"
    repo = make_repo_copy(tmp_path / "repo", tiny_params(collections={"tiny": {"source": str(missing)}}))
    state = distillrank_pipeline(repo_dir=str(repo), retries=1, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(pipeline_flow.StageFailed) as failure:
        state.result()
    message = str(failure.value)
    assert "stage 'prepare@tiny' failed" in message
    assert "failed to reproduce 'prepare@tiny'" in message and str(missing) in message  # the stderr tail

    # The stage was tried twice (one retry); the stages after it never ran.
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    by_name = {run.name: run for run in task_runs}
    assert by_name["dvc repro prepare@tiny"].run_count == 2
    assert not any(name.startswith("dvc repro index") for name in by_name)
