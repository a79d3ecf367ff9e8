"""The evaluate stage with students' reranked runs, the teacher's labels and fidelity figures (hand-made tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from pipeline import schemas
from pipeline.config import ConfigError, EvaluateConfig, EvaluationCollection, Paths
from pipeline.io import read_table, write_json, write_table
from pipeline.stages import evaluate

TEST_QUERIES = [f"t{i}" for i in range(1, 9)]
TEACHER = "teacher:m@bm25"  # the teacher's run: one per ranked list (teacher@first stage)
DOCS = [f"d{i}" for i in range(1, 9)]  # t<i>'s relevant document is d<i>


def tmp_paths(root: Path) -> Paths:
    names = (
        "collections",
        "retrieval",
        "evaluation",
        "teacher",
        "reranked",
        "metrics",
        "plots",
        "students",
        "training",
    )
    return Paths(**{name: str(root / name) for name in names})


def run_frame(ranked: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(q, d, r, 10.0 - r) for q, docs in ranked.items() for r, d in enumerate(docs, start=1)]
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "rank", "score"])


def relevant_at(query: str, position: int) -> list[str]:
    """DOCS with the query's relevant document moved to ``position`` (1-based)."""
    relevant = "d" + query[1:]
    others = [d for d in DOCS if d != relevant]
    return [*others[: position - 1], relevant, *others[position - 1 :]]


def write_collection(paths: Paths) -> None:
    """Collection "c": 8 test queries and 2 train ones; bm25 puts each relevant document at rank 3."""
    queries = pd.DataFrame(
        {
            "collection": "c",
            "query_id": [*TEST_QUERIES, "r1", "r2"],
            "text": "q",
            "split": ["test"] * 8 + ["train"] * 2,
            "origin": "collection",
            "source_doc_id": None,
        }
    )
    qrels = pd.DataFrame(
        {
            "collection": "c",
            "query_id": [*TEST_QUERIES, "r1", "r2"],
            "doc_id": [*DOCS, "d1", "d2"],
            "relevance": 1,
            "split": ["test"] * 8 + ["train"] * 2,
        }
    )
    folder = Path(paths.collections) / "c"
    write_table(queries, schemas.QUERIES, folder / "queries.parquet")
    write_table(qrels, schemas.QRELS, folder / "qrels.parquet")
    shipped = pd.DataFrame(columns=schemas.SHIPPED_RUNS.names)
    write_table(
        shipped.astype({"rank": "int32", "score": "float64"}), schemas.SHIPPED_RUNS, folder / "shipped_runs.parquet"
    )
    bm25 = run_frame({q: relevant_at(q, 3) for q in [*TEST_QUERIES, "r1", "r2"]}).assign(collection="c", method="bm25")
    write_table(bm25, schemas.CANDIDATES, Path(paths.retrieval) / "c" / "candidates.parquet")


def write_student(paths: Paths, name: str) -> None:
    """A student that lifts the relevant document to rank 1 on 6 queries and drops it to rank 5 on 2."""
    ranked = {q: relevant_at(q, 1 if i < 6 else 5) for i, q in enumerate(TEST_QUERIES)}
    frame = run_frame(ranked).assign(collection="c", student=name, first_stage_rank=1)
    write_table(frame, schemas.RERANKED, paths.reranked_dir(name) / "reranked.parquet")


def write_teacher(paths: Paths) -> None:
    """Teacher labels on 3 test queries (relevant at rank 2) and one train query (which must not count)."""
    ranked = {q: relevant_at(q, 2) for q in ["t1", "t2", "t3", "r1"]}
    frame = run_frame(ranked).rename(columns={"rank": "teacher_rank"})
    frame = frame.assign(
        collection="c",
        first_stage_rank=1,
        model="m",
        method="pointwise",
        first_stage="bm25",
        template_hash="h",
        run_id="x",
    )
    write_table(frame, schemas.TEACHER_RANKINGS, paths.teacher_dir("c") / "teacher_rankings.parquet")


def evaluate_c(paths: Paths) -> dict:
    cfg = EvaluateConfig(measures=("nDCG@10", "RR@10"), baseline="bm25")
    return evaluate.run({"c": EvaluationCollection(split="test")}, {"c": 1}, cfg, paths)


def test_evaluate_without_students_or_teacher_folders(tmp_path: Path) -> None:
    paths = tmp_paths(tmp_path)
    write_collection(paths)
    summary = evaluate_c(paths)
    assert set(summary["metrics"]) == {"c"}  # no "students" section without fidelity files
    assert set(summary["metrics"]["c"]["runs"]) == {"bm25"}
    assert summary["metrics"]["c"]["runs"]["bm25"]["RR@10"] == pytest.approx(1 / 3, abs=1e-4)
    assert "teacher_queries" not in summary["metrics"]["c"]
    assert all(Path(p).is_file() for p in summary["plots"])


def test_evaluate_lists_students_and_the_teacher_on_its_queries(tmp_path: Path) -> None:
    paths = tmp_paths(tmp_path)
    write_collection(paths)
    write_student(paths, "student-ce")
    write_teacher(paths)
    write_json({"dev": {"nDCG@10": 0.5, "kendall_tau": 0.3}}, Path(paths.metrics) / "students" / "student-ce.json")
    metrics = evaluate_c(paths)["metrics"]

    runs = metrics["c"]["runs"]
    assert set(runs) == {"bm25", "student-ce", TEACHER}
    assert runs["student-ce"]["RR@10"] == pytest.approx((6 * 1 + 2 * 0.2) / 8, abs=1e-4)
    # the teacher is measured on the 3 test queries it labelled, not penalised on the 5 others
    assert metrics["c"]["teacher_queries"] == {TEACHER: 3}
    assert runs[TEACHER]["RR@10"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["students"] == {"student-ce": {"dev": {"nDCG@10": 0.5, "kendall_tau": 0.3}}}

    versus = metrics["c"]["vs_bm25"]
    assert versus[TEACHER]["queries"] == 3 and versus[TEACHER]["wins"] == 3
    assert versus["student-ce"]["queries"] == 8
    assert (versus["student-ce"]["wins"], versus["student-ce"]["losses"]) == (6, 2)
    per_query = read_table(Path(paths.evaluation) / "per_query.parquet")
    bm25 = per_query[(per_query.run == "bm25") & (per_query.measure == "nDCG@10")].set_index("query_id").value
    student = per_query[(per_query.run == "student-ce") & (per_query.measure == "nDCG@10")].set_index("query_id")
    expected = stats.wilcoxon(student.value - bm25[student.index]).pvalue
    assert versus["student-ce"]["wilcoxon_p_value"] == pytest.approx(expected, rel=1e-2)
    assert set(per_query[per_query.run == TEACHER].query_id) == {"t1", "t2", "t3"}

    deltas = pd.read_csv(Path(paths.plots) / "per_query_deltas.csv")
    assert set(deltas.run) == {"student-ce", TEACHER}
    assert len(deltas[deltas.run == TEACHER]) == 3
    assert json.loads((Path(paths.metrics) / "eval.json").read_text())["c"]["runs"].keys() == runs.keys()


def test_a_student_named_like_a_first_stage_run_is_an_error(tmp_path: Path) -> None:
    paths = tmp_paths(tmp_path)
    write_collection(paths)
    write_student(paths, "bm25")
    with pytest.raises(ConfigError, match=r"students\.bm25: the name is taken"):
        evaluate_c(paths)


def test_paired_tests_handle_identical_runs_and_match_scipy() -> None:
    same = pd.Series([0.1, 0.5, 0.9])
    assert evaluate.paired_tests(same, same) == (1.0, 1.0)
    run, base = pd.Series([0.9, 0.8, 0.7, 0.6, 0.2]), pd.Series([0.1, 0.2, 0.3, 0.4, 0.5])
    t_p, w_p = evaluate.paired_tests(run, base)
    assert t_p == pytest.approx(stats.ttest_rel(run, base).pvalue, rel=1e-2)
    assert w_p == pytest.approx(stats.wilcoxon(run - base).pvalue, rel=1e-2)
    # one constant nonzero delta: the t-test is undefined (no variance), reported as None, not NaN
    t_p, w_p = evaluate.paired_tests(pd.Series([0.5, 0.6]), pd.Series([0.4, 0.5]))
    assert t_p is None and w_p is not None


def test_every_run_is_also_measured_on_the_held_out_queries(tmp_path: Path) -> None:
    """evaluation.<name>.held_out: the teach target's dev queries (t5..t8, which no student trained on) get their own
    figures, deltas and paired tests, next to the whole split's."""
    paths = tmp_paths(tmp_path)
    write_collection(paths)
    write_student(paths, "student-ce")  # rank 1 on t1..t6, rank 5 on t7, t8
    write_teacher(paths)
    examples = pd.DataFrame(
        {
            "collection": "c",
            "query_id": TEST_QUERIES,
            "list": "m@bm25",
            "query": "q",
            "doc_id": "d1",
            "passage": "p",
            "teacher_rank": 1,
            "target": 0.5,
            "teacher_score": None,
            "split": ["train"] * 4 + ["dev"] * 4,
        }
    )
    write_table(examples, schemas.TRAINING_EXAMPLES, paths.training_dir("c") / "examples.parquet")
    cfg = EvaluateConfig(measures=("nDCG@10", "RR@10"), baseline="bm25")
    metrics = evaluate.run({"c": EvaluationCollection(split="test", held_out="c")}, {"c": 1}, cfg, paths)["metrics"]
    held = metrics["c"]["held_out"]
    assert held["target"] == "c" and held["queries"] == 4
    assert held["runs"]["bm25"]["RR@10"] == pytest.approx(1 / 3, abs=1e-4)
    assert held["runs"]["student-ce"]["RR@10"] == pytest.approx((2 * 1 + 2 * 0.2) / 4, abs=1e-4)
    assert TEACHER not in held["runs"]  # it labelled t1..t3 only, none of them held out
    assert held["vs_bm25"]["student-ce"]["queries"] == 4 and held["vs_bm25"]["student-ce"]["wins"] == 2
    assert metrics["c"]["vs_bm25"]["student-ce"]["queries"] == 8  # the whole split is still there


def test_the_headline_is_one_small_file_per_collection_and_run_and_has_no_stale_file(tmp_path: Path) -> None:
    """metrics/headline/<collection>/all/<run>.json: the measures, delta and p of eval.json; a run evaluated no
    more (a student removed from params) leaves no file behind."""
    paths = tmp_paths(tmp_path)
    write_collection(paths)
    write_student(paths, "student-ce")
    write_teacher(paths)
    summary = evaluate_c(paths)
    folder = Path(paths.metrics) / "headline"
    assert summary["headline"] == str(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json"))
    assert files == ["c/all/bm25.json", "c/all/student-ce.json", "c/all/teacher.m@bm25.json"]
    student = json.loads((folder / "c/all/student-ce.json").read_text())
    versus = summary["metrics"]["c"]["vs_bm25"]["student-ce"]
    assert student == {
        **summary["metrics"]["c"]["runs"]["student-ce"],
        "delta": versus["delta"],
        "p": versus["p_value"],
    }
    assert set(json.loads((folder / "c/all/bm25.json").read_text())) == {"nDCG@10", "RR@10"}  # the baseline

    cfg = EvaluateConfig(measures=("nDCG@10", "RR@10"), baseline="bm25")
    evaluate.run({"c": EvaluationCollection(split="test")}, {"c": 1}, cfg, paths, students=[])
    assert sorted(p.name for p in folder.rglob("*.json")) == ["bm25.json", "teacher.m@bm25.json"]
