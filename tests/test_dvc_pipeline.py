"""The real DVC DAG (`dvc repro`) in a throw-away copy of the repository, on the fixture collection."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, make_repo_copy, run_cli, tiny_params, write_params

STAGES = {"prepare@tiny", "index@tiny", "encode@tiny", "retrieve@tiny", "evaluate"}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repo_copy(tmp_path_factory.mktemp("dvc") / "repo", tiny_params())
    result = run_cli(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stderr[-3000:]
    return repo


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_builds_every_output(reproduced: Path) -> None:
    repo = reproduced
    for table in ("corpus", "queries", "qrels", "shipped_runs"):
        assert (repo / "data/collections/tiny" / f"{table}.parquet").is_file()
    assert (repo / "data/indexes/tiny").is_dir()
    run = (repo / "data/retrieval/tiny/runs/bm25.trec").read_text().splitlines()
    assert run and run[0].split()[1] == "Q0"
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert set(metrics["tiny"]["runs"]) == {"bm25", "shipped-weak"}
    assert 0.5 < metrics["tiny"]["runs"]["bm25"]["nDCG@10"] <= 1.0
    assert (repo / "plots/deltas/tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "plots/per_query_deltas.csv").is_file()
    per_query = pd.read_parquet(repo / "data/evaluation/per_query.parquet")
    assert set(per_query.run) == {"bm25", "shipped-weak"}
    # the headline (the DVC metrics): one small file per collection × run, what `dvc metrics show` prints
    headline = sorted(p.name for p in (repo / "metrics/headline/tiny/all").glob("*.json"))
    assert headline == ["bm25.json", "shipped-weak.json"]
    shown = run_cli(["dvc", "metrics", "show"], repo)
    assert shown.returncode == 0 and shown.stdout.split()[:6] == ["Path", "R@100", "RR@10", "delta", "nDCG@10", "p"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert STAGES <= set(lock["stages"])


def test_second_repro_skips_everything(reproduced: Path) -> None:
    result = run_cli(["dvc", "repro"], reproduced)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ran_stages(result.stdout) == set()
    assert "Data and pipelines are up to date" in result.stdout


def test_changed_param_reruns_only_downstream_stages(reproduced: Path) -> None:
    params = tiny_params(retrieve={"depth": 2})
    write_params(reproduced / "params.yaml", params)
    result = run_cli(["dvc", "repro"], reproduced)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ran_stages(result.stdout) == {"retrieve@tiny", "evaluate"}
    candidates = pd.read_parquet(reproduced / "data/retrieval/tiny/candidates.parquet")
    assert candidates.groupby("query_id").size().max() == 2


def test_bad_collection_fails_the_stage_with_a_clear_error(tmp_path: Path, bad_collection) -> None:
    source = bad_collection()
    lines = (source / "corpus.jsonl").read_text().splitlines()
    lines[3] = '{"_id": "d4", "title": "broken'
    (source / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    repo = make_repo_copy(tmp_path / "repo", tiny_params(source=source))
    result = run_cli(["dvc", "repro"], repo)
    assert result.returncode != 0
    assert f"{source / 'corpus.jsonl'}:4: malformed JSON" in result.stderr
    assert not (repo / "data/collections/tiny/corpus.parquet").exists()


def test_repository_dag_lists_the_default_stages() -> None:
    result = run_cli(["dvc", "stage", "list"], REPO)
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    expected = {"prepare@scifact", "prepare@trec-dl-2019", "index@scifact", "index@trec-dl-2019"}
    assert expected | {"retrieve@scifact", "retrieve@trec-dl-2019", "evaluate"} <= names


def test_teach_stage_in_dvc_keeps_its_call_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """teach-collection@<name> runs in `dvc repro`; its call cache is `persist: true`, so even a forced re-run pays
    nothing."""
    from pipeline.teacher.chat_server import OpenAIServer

    monkeypatch.setenv("DISTILLRANK_DVC_TEST_KEY", "sk-dvc-test")
    with OpenAIServer() as server:
        params = tiny_params()
        params["teacher"] = {
            "backend": "openai",
            "method": "listwise",
            "endpoint": {
                "base_url": server.base_url,
                "model": "dvc-teacher",
                "api_key_env": "DISTILLRANK_DVC_TEST_KEY",
            },
            "listwise": {"window": 3, "step": 2},
        }
        params["teach"] = {"collection": {"tiny": {"split": "train", "depth": 4}}, "synthetic": {}}
        repo = make_repo_copy(tmp_path / "repo", params)
        result = run_cli(["dvc", "repro"], repo)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "teach-collection@tiny" in ran_stages(result.stdout)
        paid = server.served_ok
        assert paid > 0
        labels = pd.read_parquet(repo / "data/teacher/tiny/teacher_rankings.parquet")
        assert set(labels.query_id) == {"q5", "q6", "q7", "q8"}
        metrics = json.loads((repo / "metrics/teacher/tiny.json").read_text())
        assert metrics["calls"]["paid"] == paid

        forced = run_cli(["dvc", "repro", "--force", "--single-item", "teach-collection@tiny"], repo)
        assert forced.returncode == 0, forced.stderr[-3000:]
        assert server.served_ok == paid  # the persisted cache answered every call
        assert json.loads((repo / "metrics/teacher/tiny.json").read_text())["calls"]["cached"] == paid
