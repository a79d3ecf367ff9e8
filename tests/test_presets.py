"""Presets (presets/*.yaml): complete params files that differ from params.yaml only where their header says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipeline.config import load_params

PRESETS = sorted((REPO / "presets").glob("*.yaml"))


def declared_differences(path: Path) -> list[str]:
    match = re.search(r"^# differs from params\.yaml in: (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"{path}: the header must say which sections differ from params.yaml"
    return [name.strip() for name in match.group(1).split(",")]


def test_the_documented_presets_exist() -> None:
    assert {path.stem for path in PRESETS} >= {"strong-teacher", "r2r", "full"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_differs_only_where_declared(path: Path) -> None:
    load_params(path)  # every key valid, every reference defined
    preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    default = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    declared = declared_differences(path)
    assert set(preset) == set(default), "a preset names every section params.yaml names (dvc.yaml reads them)"
    for section in default:
        if section in declared:
            assert preset[section] != default[section], f"{section} is declared as different but is not"
        else:
            assert preset[section] == default[section], f"{path.name}: {section} differs from params.yaml"


def test_strong_teacher_preset_imports_splade_over_the_shipped_union() -> None:
    params = load_params(REPO / "presets/strong-teacher.yaml")
    assert params.teacher.method == "imported" and params.teacher.imported.scope == "pool"
    assert params.teacher.imported.path is not None and params.teacher.imported.path.endswith("splade-pp-ed.trec")
    target = params.teach["trec-dl-2019"]
    assert target.candidates == "shipped-union" and target.queries == "collection"
    # the students learn from TREC-DL 2019's queries, so it is not an evaluation collection
    assert "trec-dl-2019" not in params.evaluation
    assert all(student.labels == "trec-dl-2019" for student in params.students.values())


def test_r2r_preset_trains_a_reason_to_rank_student_on_rationales() -> None:
    params = load_params(REPO / "presets/r2r.yaml")
    assert params.teacher.method == "rationales"
    assert any(student.kind == "r2r" for student in params.students.values())
