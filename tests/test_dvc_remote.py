"""A DVC remote backs up what cost money: `dvc push` sends the call cache, labels and students to it, and a fresh
clone that runs `dvc pull` re-runs the teacher paying for nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import ALWAYS_PRESENT, make_repo_copy, run_cli, tiny_params, tool_env
from pipeline.teacher.chat_server import OpenAIServer

KEY_ENV = "DISTILLRANK_DVC_REMOTE_TEST_KEY"


def git(repo: Path, *args: str) -> None:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    subprocess.run(command, cwd=repo, env=tool_env(), check=True, capture_output=True)


def must(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_a_fresh_clone_with_dvc_pull_reteaches_with_zero_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-dvc-remote-test")
    with OpenAIServer() as server:
        params = tiny_params()
        params["teacher"] = {
            "backend": "openai",
            "method": "listwise",
            "endpoint": {"base_url": server.base_url, "model": "remote-teacher", "api_key_env": KEY_ENV},
            "listwise": {"window": 3, "step": 2},
        }
        params["teach"] = {"collection": {"tiny": {"split": "train", "depth": 4}}, "synthetic": {}}
        origin = make_repo_copy(tmp_path / "origin", params)
        for key in ALWAYS_PRESENT:  # as in the repository: each such folder keeps a committed README.md
            (origin / "data" / key / "README.md").write_text(f"{key}\n")
        remote = tmp_path / "remote"
        must(run_cli(["dvc", "remote", "add", "--default", "backup", str(remote)], origin))
        must(run_cli(["dvc", "repro", "teach-collection@tiny"], origin))
        paid = server.served_ok
        assert paid > 0
        git(origin, "add", "-A")
        git(origin, "commit", "-q", "-m", "taught")
        pushed = must(run_cli(["dvc", "push"], origin))
        assert remote.is_dir() and any(remote.rglob("*")), pushed.stdout

        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", str(origin), str(clone))
        assert not (clone / "data/teacher_cache/tiny").exists()  # a fresh clone has none of the paid-for data
        # (this test ran only the teach target and what it needs: it pulls those; after a full `dvc repro` and
        # `dvc push`, a plain `dvc pull` restores every stage)
        must(run_cli(["dvc", "pull", "--with-deps", "teach-collection@tiny"], clone))
        assert any((clone / "data/teacher_cache/tiny").iterdir())
        status = must(run_cli(["dvc", "status", "teach-collection@tiny"], clone))
        assert "up to date" in status.stdout
        # even forced, the teacher re-runs from the pulled call cache: no call is paid again
        must(run_cli(["dvc", "repro", "--force", "--single-item", "teach-collection@tiny"], clone))
        assert server.served_ok == paid
        pulled = pd.read_parquet(clone / "data/teacher/tiny/teacher_rankings.parquet")
        original = pd.read_parquet(origin / "data/teacher/tiny/teacher_rankings.parquet")
        columns = ["query_id", "doc_id", "teacher_rank"]
        pd.testing.assert_frame_equal(
            pulled[columns].sort_values(columns).reset_index(drop=True),
            original[columns].sort_values(columns).reset_index(drop=True),
        )
