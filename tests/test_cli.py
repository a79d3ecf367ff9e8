"""The ``distillrank`` command's help and its errors: what a new user sees first."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, FIXTURE, REPO
from pipeline.cli import COMMANDS, STAGES, TOOLS, main
from pipeline.students import explain


def lines_starting(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().split(" ", 1)[0] == word]


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_describes_every_command(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: distillrank COMMAND [ARGS ...]")
    assert "rest" not in out.split()
    assert set(COMMANDS) == {"stage", "sql", *TOOLS}
    for command in COMMANDS:
        (line,) = lines_starting(out, command)
        description = line.split(None, 1)[1]
        assert len(description) > 20 and description == COMMANDS[command]
    assert "distillrank COMMAND --help" in out


def test_the_installed_command_prints_the_same_help() -> None:
    result = subprocess.run([str(BIN / "distillrank"), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert all(lines_starting(result.stdout, command) for command in COMMANDS)


def test_an_unknown_command_names_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(f"'{command}'" in err for command in COMMANDS)


def test_stage_help_lists_every_stage_and_what_it_takes(capsys: pytest.CaptureFixture) -> None:
    assert main(["stage", "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert out.startswith("usage: distillrank stage STAGE [NAME] [--params FILE]")
    assert "distillrank stage teach trec-dl-2019" in out and "dvc repro" in out
    for stage, (argument, description) in STAGES.items():
        (line,) = lines_starting(out, stage)
        assert line.split() == [stage, *argument.split(), *description.split()]
    assert lines_starting(out, "teach")[0].split()[1] == "TARGET"
    assert lines_starting(out, "train")[0].split()[1] == "STUDENT"
    assert main(["stage", "-h"]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["stage", "bogus"], "unknown stage 'bogus'"),
        (["stage", "teech", "trec-dl-2019"], "unknown stage 'teech' (did you mean 'teach'?)"),
        (["stage"], "give a stage"),
    ],
)
def test_a_wrong_stage_lists_the_stages(argv: list[str], problem: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("usage: distillrank stage")
    assert err.rstrip().endswith(f"distillrank stage: error: {problem}")
    assert all(lines_starting(err, stage) for stage in STAGES)


# --- explain: where an R2R student comes from -----------------------------------------------------------------


def r2r_students_in_presets() -> list[tuple[str, str]]:
    """(preset, folder) of every R2R student in presets/, read here without the code under test."""
    found = []
    for path in sorted((REPO / "presets").glob("*.yaml")):
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
        for name, cfg in (params.get("students") or {}).items():
            if cfg.get("kind") == "r2r":
                found.append((path.stem, f"{params['paths']['students']}/{name}"))
    return found


def test_the_r2r_presets_are_found() -> None:
    expected = r2r_students_in_presets()
    assert ("r2r", "data/students/r2r-smollm2") in expected
    assert sorted(explain.r2r_presets()) == sorted(expected)


def explain_args(model: Path, tmp_path: Path) -> list[str]:
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d1 1 1.0 bm25\n")
    return ["--model", str(model), "--collection", str(FIXTURE), "--run", str(run), "--query-id", "q1"]


def test_explain_on_a_missing_folder_says_so_and_names_the_r2r_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "students" / "r2r-smollm2"
    assert explain.main(explain_args(missing, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: the folder does not exist; ")
    assert "distillrank_student.json" not in err
    assert "`make preset PRESET=r2r`" in err and "data/students/r2r-smollm2" in err
    for preset, _ in r2r_students_in_presets():
        assert f"PRESET={preset}" in err


def test_explain_on_a_folder_that_is_no_r2r_student_names_the_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert explain.main(explain_args(empty, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "not a distillrank student folder" in err and "`make preset PRESET=r2r`" in err
    cross = tmp_path / "cross"
    cross.mkdir()
    (cross / "distillrank_student.json").write_text(json.dumps({"kind": "cross-encoder"}))
    assert explain.main(explain_args(cross, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "a 'cross-encoder' student cannot explain" in err and "`make preset PRESET=r2r`" in err
