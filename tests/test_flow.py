"""The Prefect flow (flows/pipeline_flow.py) that runs the DVC DAG stage by stage, and `make serve`'s
deployment (flows/serve.py): pure helpers, then the real flow against a temporary Prefect server on a
throw-away copy of the repository."""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import flows.pipeline_flow as pipeline_flow
import flows.serve as serve_module
from conftest import BIN, REPO, make_repo_copy, run_cli, tiny_params, write_params
from flows.pipeline_flow import (
    ARTIFACT_KEY,
    LogRecords,
    distillrank_pipeline,
    execution_order,
    metrics_markdown,
    stage_graph,
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


def test_stage_graph_keeps_every_stage_and_each_stages_direct_upstreams_in_run_order() -> None:
    stages = ["evaluate", "retrieve@a", "index@a", "prepare@a", "prepare@b"]
    edges = [("prepare@a", "index@a"), ("index@a", "retrieve@a"), ("prepare@a", "retrieve@a")]
    edges += [("retrieve@a", "evaluate"), ("prepare@b", "evaluate")]
    graph = stage_graph(stages, edges)
    assert graph.order == ("prepare@a", "index@a", "retrieve@a", "prepare@b", "evaluate")
    assert dict(graph.upstreams) == {
        "prepare@a": (),
        "index@a": ("prepare@a",),
        "retrieve@a": ("prepare@a", "index@a"),  # direct edges only, transitive ones kept as DVC has them
        "prepare@b": (),
        "evaluate": ("retrieve@a", "prepare@b"),
    }
    assert graph.sinks == ("evaluate",)
    assert stage_graph(["a", "b"], []).sinks == ("a", "b")


def test_log_records_make_a_multi_line_json_summary_one_record() -> None:
    summary = json.dumps({"stage": "prepare", "collection": "tiny", "tables": {"corpus": 5}}, indent=2)
    lines = ["Running stage 'prepare@tiny':", "> distillrank stage prepare tiny", *summary.splitlines()]
    lines += ["Updating lock file 'dvc.lock'"]
    records = LogRecords()
    out = [record for line in lines for record in records.feed(line)] + records.flush()
    assert out == [lines[0], lines[1], summary, lines[-1]]
    assert json.loads(out[2])["tables"] == {"corpus": 5}
    # A brace-delimited block that is not JSON is logged line by line, like any other output.
    records = LogRecords()
    block = ["{", "  not: json", "}"]
    assert [record for line in block for record in records.feed(line)] == block


def test_stage_outcome_only_matches_its_own_stage() -> None:
    other = "Stage 'prepare@tiny' didn't change, skipping"
    assert stage_outcome("index@tiny", other) == "ran"
    assert stage_outcome("prepare@tiny", other) == "skipped"


EVAL = {
    "tiny": {
        "queries": 4,
        "baseline": "bm25",
        "runs": {
            "bm25": {"R@100": 1.0, "RR@10": 0.875, "nDCG@10": 0.8123},
            "shipped-weak": {"R@100": 0.75, "RR@10": 0.5, "nDCG@10": 0.45567},
        },
        "vs_bm25": {
            "shipped-weak": {"measure": "nDCG@10", "delta": -0.3566, "wins": 0, "losses": 4, "ties": 0,
                             "p_value": 0.00773, "queries": 4},
        },
    },
    "other": {"queries": 2, "baseline": "bm25", "runs": {"bm25": {"nDCG@10": 0.5}}, "vs_bm25": {}},
    "students": {"s": {"kind": "cross-encoder", "dev": {"nDCG@10": 0.5}}},
}  # fmt: skip
EMPTY_CELL = re.compile(r"\|\s*\|")


def test_metrics_markdown_has_a_table_per_collection_with_measures_in_params_order() -> None:
    text = metrics_markdown(EVAL, measures=["nDCG@10", "RR@10", "R@100"])
    lines = text.splitlines()
    assert lines[0] == "# distillrank evaluation"
    assert "## tiny: all 4 queries (against bm25)" in lines and "## other: all 2 queries (against bm25)" in lines
    assert "| run | nDCG@10 | RR@10 | R@100 | Δ nDCG@10 | p | W/L/T |" in lines
    assert "| bm25 | 0.8123 | 0.8750 | 1.0000 | baseline | - | - |" in lines
    assert "| shipped-weak | 0.4557 | 0.5000 | 0.7500 | -0.3566 | 0.00773 | 0/4/0 |" in lines
    assert "| bm25 | 0.5000 | baseline | - | - |" in lines  # the other collection measured nDCG@10 only
    assert "| s | cross-encoder | - | - | - | - | - | 0.5000 | - | - |" in lines  # the students: no blank cell
    # Every table row has as many cells as its header; no cell is blank; no heading without a table.
    for block in text.split("\n\n"):
        rows = [row for row in block.splitlines() if row.startswith("|")]
        assert len({row.count("|") for row in rows}) <= 1, block
        assert not any(EMPTY_CELL.search(row) for row in rows), block
    assert_every_heading_has_a_table(text)


def assert_every_heading_has_a_table(markdown: str) -> None:
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            assert lines[i + 1] == "" and lines[i + 2].startswith("| "), line


def test_metrics_markdown_without_measure_order_keeps_the_files_order() -> None:
    text = metrics_markdown({"c": {"runs": {"bm25": {"R@100": 0.5, "nDCG@10": 0.25}}}})
    assert "| run | R@100 | nDCG@10 | Δ R@100 | p | W/L/T |" in text.splitlines()
    assert "## c: all queries (no baseline)" in text.splitlines()


def test_the_artifact_of_the_committed_evaluation_is_the_reports_tables_without_a_blank() -> None:
    """The artifact had an empty "students" heading and a teacher table with blank identity and nDCG cells: now
    every heading is one of `distillrank report`'s tables, in its order, and every cell says something."""
    from pipeline import report
    from pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    metrics_dir = REPO / params.paths.metrics
    metrics = json.loads((metrics_dir / "eval.json").read_text(encoding="utf-8"))
    teachers = report.read_teachers(metrics_dir)
    markdown = metrics_markdown(metrics, params.evaluate.measures, teachers, set(params.students))
    tables = report.tables(metrics, params.evaluate.measures, set(params.students), teachers)
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == [t.title for t in tables]
    assert any(h.startswith("teachers") for h in headings) and any(h.startswith("students") for h in headings)
    assert "## students\n" not in markdown and "## teacher\n" not in markdown
    assert_every_heading_has_a_table(markdown)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == sum(1 + len(t.rows) for t in tables)
    assert not any(EMPTY_CELL.search(row) for row in rows)
    # the figures are the report's: the student on the held-out queries, as the terminal prints them
    held = metrics["trec-dl-2019"]["held_out"]
    versus = held[f"vs_{held['baseline']}"]["minilm-bi"]
    figures = " | ".join(f"{held['runs']['minilm-bi'][m]:.4f}" for m in params.evaluate.measures)
    expected = f"| minilm-bi | {figures} | {versus['delta']:+.4f} | {versus['p_value']:.3g} |"
    assert any(row.startswith(expected) for row in rows)
    text = report.render_text(tables)
    assert any(line.split()[:5] == expected.replace("|", " ").split()[:5] for line in text.splitlines())


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


def dvc_dag_edges(repo: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """The stages and ``(upstream, downstream)`` edges that ``dvc dag --dot`` prints, data files left out."""
    result = run_cli([str(BIN / "dvc"), "dag", "--dot"], cwd=repo, timeout=120)
    assert result.returncode == 0, result.stderr
    nodes = set(re.findall(r'^"([^"]+)";$', result.stdout, flags=re.MULTILINE))
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', result.stdout, flags=re.MULTILINE))
    assert nodes, result.stdout
    stage_nodes = {node for node in nodes if not node.endswith(".dvc")}
    return stage_nodes, {(up, down) for up, down in edges if up in stage_nodes and down in stage_nodes}


def graph_edges(graph) -> set[tuple[str, str]]:
    return {(up, stage) for stage, ups in graph.upstreams.items() for up in ups}


def test_stage_graph_of_the_repository_is_dvc_dag(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    graph = pipeline_flow.dvc_stage_graph(REPO)
    nodes, edges = dvc_dag_edges(REPO)
    assert set(graph.order) == nodes
    assert graph_edges(graph) == edges
    assert graph.sinks == ("evaluate",)


# A stage's summary as the stages print it (pipeline/stages/common.py): indented JSON, one key a line.
SUMMARY_COMMAND = 'python -c \'import json; print(json.dumps({"stage": "a", "copied": [1, 2]}, indent=2))\''
SMALL_UPSTREAMS = {"a": (), "b": ("a",), "c": ("a",), "d": ("a", "b", "c"), "lone": (), "sub/dvc.yaml:e": ("d",)}


@pytest.fixture(scope="module")
def small_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC project of its own: a diamond, a stage with no upstream, a stage in a sub-folder's dvc.yaml and a
    `dvc add`-ed data file (not a stage to run)."""
    repo = tmp_path_factory.mktemp("small") / "project"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert run_cli([str(BIN / "dvc"), "init", "-q"], cwd=repo).returncode == 0
    (repo / "raw.txt").write_text("raw\n", encoding="utf-8")
    added = run_cli([str(BIN / "dvc"), "add", "-q", "raw.txt"], cwd=repo)
    assert added.returncode == 0, added.stderr
    stages = {
        "a": {"cmd": f"cp raw.txt a.txt && {SUMMARY_COMMAND}", "deps": ["raw.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "cp a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "cp a.txt c.txt", "deps": ["a.txt"], "outs": ["c.txt"]},
        "d": {"cmd": "cat b.txt c.txt a.txt > d.txt", "deps": ["b.txt", "c.txt", "a.txt"], "outs": ["d.txt"]},
        "lone": {"cmd": "echo x > lone.txt", "outs": ["lone.txt"]},
    }
    write_params(repo / "dvc.yaml", {"stages": stages})
    sub = {"e": {"cmd": "cp ../d.txt e.txt", "deps": ["../d.txt"], "outs": ["e.txt"]}}
    write_params(repo / "sub" / "dvc.yaml", {"stages": sub})
    write_params(repo / "params.yaml", tiny_params())  # publish-metrics reads paths.metrics (no eval.json here)
    return repo


def test_stage_graph_of_a_small_project_is_dvc_dag(small_project: Path) -> None:
    graph = pipeline_flow.dvc_stage_graph(small_project)
    nodes, edges = dvc_dag_edges(small_project)
    assert set(graph.order) == nodes == set(SMALL_UPSTREAMS)
    assert graph_edges(graph) == edges
    assert dict(graph.upstreams) == SMALL_UPSTREAMS
    assert graph.sinks == ("lone", "sub/dvc.yaml:e")


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
    assert "## tiny: all 4 queries (against bm25)" in markdown
    assert "| run | nDCG@10 | RR@10 | R@100 | Δ nDCG@10 | p | W/L/T |" in markdown
    assert f"| bm25 | {bm25:.4f} |" in markdown
    assert "| shipped-weak |" in markdown


def flow_task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def assert_graph_drawn_is_dvc_dag(flow_run_id, repo: Path) -> None:
    """The flow-run graph (every task run's ``task_inputs``, what the UI draws) is ``dvc dag``'s graph: a stage's
    task waits for its DVC upstreams' tasks (for ``dag-stages`` when it has none), ``publish-metrics`` for the
    stages nothing depends on."""
    task_runs = flow_task_runs(flow_run_id)
    name_of = {run.id: run.name for run in task_runs}
    upstream_names = {
        run.name: {name_of[i.id] for inputs in run.task_inputs.values() for i in inputs if i.input_type == "task_run"}
        for run in task_runs
    }
    (dag_task,) = [name for name in upstream_names if name.startswith("dag-stages")]
    (publish_task,) = [name for name in upstream_names if name.startswith("publish-metrics")]
    assert upstream_names[dag_task] == set()

    nodes, edges = dvc_dag_edges(repo)
    assert set(upstream_names) == {dag_task, publish_task, *(f"dvc repro {stage}" for stage in nodes)}
    for stage in nodes:
        dvc_upstreams = {f"dvc repro {up}" for up, down in edges if down == stage}
        assert upstream_names[f"dvc repro {stage}"] == (dvc_upstreams or {dag_task}), stage
    sinks = {f"dvc repro {stage}" for stage in nodes if not any(up == stage for up, _ in edges)}
    assert upstream_names[publish_task] == sinks


def flow_logs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    logs: list = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(logs)
        ):
            logs += page
    return logs


def summary_records(flow_run_id) -> dict[str, list[str]]:
    """The JSON log records of each task of a flow run, by task name; no record is a lone brace."""
    logs = flow_logs(flow_run_id)
    messages = [log.message.strip() for log in logs]
    assert "{" not in messages and "}" not in messages
    task_of = {run.id: run.name for run in flow_task_runs(flow_run_id)}
    summaries: dict[str, list[str]] = {}
    for log in logs:
        if log.message.startswith("{"):
            summaries.setdefault(task_of[log.task_run_id], []).append(log.message)
    return summaries


def test_each_stage_task_waits_for_its_dvc_upstreams(first_run, repo: Path) -> None:
    nodes, edges = dvc_dag_edges(repo)
    assert nodes == set(TINY_STAGES)
    assert len(edges) > len(TINY_STAGES)  # not a chain: the graph drawn is DVC's, not the run order
    assert_graph_drawn_is_dvc_dag(first_run.state_details.flow_run_id, repo)


def test_each_stage_summary_is_one_log_record(first_run) -> None:
    summaries = summary_records(first_run.state_details.flow_run_id)
    assert sorted(summaries) == sorted(f"dvc repro {stage}" for stage in TINY_STAGES)
    for task_name, records in summaries.items():
        (record,) = records  # one record per stage: the whole summary, as the stage printed it (indented)
        assert "\n" in record
        assert json.loads(record)["stage"] == task_name.removeprefix("dvc repro ").split("@")[0]


def test_flow_on_a_small_project_draws_its_dvc_dag_and_logs_the_summary_once(
    prefect_server: None, small_project: Path
) -> None:
    state = distillrank_pipeline(repo_dir=str(small_project), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["stages_run"] == ["a", "b", "c", "d", "lone", "sub/dvc.yaml:e"]
    flow_run_id = state.state_details.flow_run_id
    assert_graph_drawn_is_dvc_dag(flow_run_id, small_project)
    (record,) = summary_records(flow_run_id)["dvc repro a"]
    assert record == json.dumps({"stage": "a", "copied": [1, 2]}, indent=2)


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
