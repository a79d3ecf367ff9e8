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
    assert {path.stem for path in PRESETS} >= {"strong-teacher", "r2r", "r2r-embedded", "full", "recorded-teacher"}


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
    from pipeline.config import teacher_for

    params = load_params(REPO / "presets/strong-teacher.yaml")
    target = params.teach["trec-dl-2019"]
    teacher = teacher_for(params.teacher, target)
    assert teacher.method == "imported" and teacher.imported.scope == "pool"
    assert [f.path for f in teacher.imported.files] == ["../shared/data/trec-dl-2019/runs/splade-pp-ed.trec"]
    assert target.candidates == "shipped-union" and target.queries == "collection"
    # the students learn from TREC-DL 2019's queries, so it is not an evaluation collection
    assert "trec-dl-2019" not in params.evaluation
    assert all(student.labels == "trec-dl-2019" for student in params.students.values())


def test_r2r_embedded_preset_trains_a_reason_to_rank_student_on_the_live_teachers_rationales() -> None:
    params = load_params(REPO / "presets/r2r-embedded.yaml")
    assert params.teacher.method == "rationales"
    assert any(student.kind == "r2r" for student in params.students.values())


def test_r2r_preset_imports_the_real_gpt4_teacher_file_as_collection_and_labels() -> None:
    from pipeline.config import teacher_for

    params = load_params(REPO / "presets/r2r.yaml")
    collection = params.collection("r2r-msmarco")
    assert collection.format == "r2r-jsonl" and (REPO / collection.source).is_file()
    files = teacher_for(params.teacher, params.teach["r2r-msmarco"]).imported.files
    assert [(f.format, f.path) for f in files] == [("r2r-jsonl", collection.source)]
    kinds = {student.kind: student for student in params.students.values()}
    assert set(kinds) == {"r2r", "cross-encoder"} and all(s.labels == "r2r-msmarco" for s in kinds.values())
    assert kinds["r2r"].r2r.answer_sentence and kinds["r2r"].r2r.faithfulness_passages is None
    # the students never see TREC-DL 2019: all its 43 queries measure them, BM25's top 20 reranked
    assert set(params.evaluation) == {"trec-dl-2019"} and params.rerank.depth == 20


def test_recorded_teacher_preset_distils_the_six_recorded_lists_and_holds_queries_out() -> None:
    from pipeline.config import teacher_for

    params = load_params(REPO / "presets/recorded-teacher.yaml")
    target = params.teach["trec-dl-2019"]
    files = teacher_for(params.teacher, target).imported.files
    assert len(files) == 6 and all(Path(REPO / f.path).is_file() for f in files)
    assert {(f.teacher, f.first_stage) for f in files} >= {
        ("rankgpt-gpt-3.5-turbo", "bm25"),
        ("rank_vicuna-7b", "tas-b"),
    }
    assert params.evaluation["trec-dl-2019"].held_out == "trec-dl-2019"
    assert {s.kind for s in params.students.values()} == {"bi-encoder", "cross-encoder"}
    assert params.synthesize == {}  # no live LLM call


def test_the_default_trains_a_student_on_recorded_teachers_and_keeps_the_live_llm_path() -> None:
    from pipeline.config import teacher_for

    params = load_params(REPO / "params.yaml")
    assert (
        params.teacher.backend == "embedded"
        and teacher_for(params.teacher, params.teach["scifact"]).method != "imported"
    )
    assert teacher_for(params.teacher, params.teach["trec-dl-2019"]).method == "imported"
    assert params.evaluation["trec-dl-2019"].held_out == "trec-dl-2019"
    assert any(s.labels == "trec-dl-2019" and s.kind == "bi-encoder" for s in params.students.values())
