"""bin/distillrank, what dvc.yaml's stage commands call: DVC runs whether or not the venv is on PATH.

Every command here runs in a clean environment whose PATH is the system's only (no activated venv), as it is in a
new shell on a fresh clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, make_repo_copy, tiny_params

LAUNCHER = REPO / "bin" / "distillrank"
SYSTEM_PATH = "/usr/bin:/bin"


def clean_env(home: Path, path: str = SYSTEM_PATH) -> dict[str, str]:
    """No venv, no VIRTUAL_ENV, nothing of the test run's environment but what a tool needs to stay offline."""
    return {"PATH": path, "HOME": str(home), "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


def launch(launcher: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(launcher), *args], env=env, cwd=launcher.parent, capture_output=True, text=True, timeout=60, check=False
    )


def fake_command(path: Path, says: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{says} $*"\n')
    path.chmod(0o755)
    return path


def test_every_stage_command_goes_through_the_launcher() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = [stage.get("do", stage)["cmd"] for stage in stages.values()]
    assert commands and all(cmd.startswith("bin/distillrank stage ") for cmd in commands), commands
    assert os.access(LAUNCHER, os.X_OK)
    lock = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert all(stage["cmd"].startswith("bin/distillrank stage ") for stage in lock.values())


def test_the_launcher_prefers_the_repositorys_venv_then_path(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    launcher = repo / "bin" / "distillrank"
    launcher.parent.mkdir(parents=True)
    shutil.copy2(LAUNCHER, launcher)
    fake_command(repo / ".venv" / "bin" / "distillrank", "venv")
    on_path = fake_command(tmp_path / "elsewhere" / "distillrank", "path")
    env = clean_env(tmp_path, f"{on_path.parent}:{SYSTEM_PATH}")

    result = launch(launcher, env, "stage", "prepare", "my collection")
    assert (result.returncode, result.stdout) == (0, "venv stage prepare my collection\n"), result.stderr

    shutil.rmtree(repo / ".venv")
    result = launch(launcher, env, "stage", "prepare", "x")
    assert (result.returncode, result.stdout) == (0, "path stage prepare x\n"), result.stderr

    # `dvc exp run --temp` runs in a copy under .dvc/tmp/exps/ (no .venv there): the repository's own venv
    fake_command(repo / ".venv" / "bin" / "distillrank", "venv")
    temp_launcher = repo / ".dvc" / "tmp" / "exps" / "tmpab12" / "bin" / "distillrank"
    temp_launcher.parent.mkdir(parents=True)
    shutil.copy2(LAUNCHER, temp_launcher)
    result = launch(temp_launcher, env, "stage", "train", "s")
    assert (result.returncode, result.stdout) == (0, "venv stage train s\n"), result.stderr
    shutil.rmtree(repo / ".venv")

    # neither: a clear message and a non-zero exit, also when bin/ itself is on PATH (no loop)
    for path in (SYSTEM_PATH, f"{launcher.parent}:{SYSTEM_PATH}"):
        result = launch(launcher, clean_env(tmp_path, path), "stage", "prepare", "x")
        assert result.returncode == 127
        assert result.stdout == ""
        assert f"no {repo}/.venv/bin/distillrank and no distillrank on PATH" in result.stderr
        assert "make install" in result.stderr and "dvc checkout" in result.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "distillrank").exists(), reason="no .venv (make install)")
def test_the_launcher_runs_this_repositorys_venv_without_it_on_path(tmp_path: Path) -> None:
    result = launch(LAUNCHER, clean_env(tmp_path), "stage", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: distillrank stage STAGE" in result.stdout


def test_dvc_repro_runs_a_stage_without_the_venv_on_path(tmp_path: Path) -> None:
    """`.venv/bin/dvc repro` from a shell where the venv is not activated: the stage runs; without any install the
    stage fails with the launcher's message (DVC's own error names the exit status)."""
    repo = make_repo_copy(tmp_path / "repo", tiny_params())
    (repo / ".venv").symlink_to(BIN.parent)  # the clone's venv, as `make install` makes it
    env = clean_env(tmp_path)
    dvc = [str(BIN / "dvc"), "repro", "--single-item", "prepare@tiny"]

    result = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bin/distillrank stage prepare tiny" in result.stdout
    assert (repo / "data/collections/tiny/corpus.parquet").is_file()

    (repo / ".venv").unlink()
    result = subprocess.run([*dvc, "--force"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "distillrank is not installed" in result.stderr and "make install" in result.stderr
    assert "command not found" not in result.stderr + result.stdout
