"""Applying a student: ``rerank_run``, the ``distillrank rerank`` command and the rerank stage."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FIXTURE, save_tiny_cross_encoder
from pipeline.config import ConfigError, EvaluationCollection, RerankConfig, load_params
from pipeline.io import read_table, read_trec_run
from pipeline.rerank import RerankInputError, first_stage_order, main, rerank_run
from pipeline.stages import rerank as rerank_stage
from pipeline.students.base import STUDENT_FILE, Student


class OverlapStudent:
    """A deterministic student: the number of query words found in the passage. Records its calls."""

    kind = "overlap"
    max_length = 64

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        self.calls.append(len(queries))
        return np.array(
            [len(set(q.lower().split()) & set(p.lower().split())) for q, p in zip(queries, passages, strict=True)],
            dtype=np.float32,
        )

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, batch_size)


QUERIES = {"q1": "red apple", "q2": "blue sky"}
PASSAGES = {
    "a": "nothing here",
    "b": "a red apple",
    "c": "red things",
    "d": "blue sky today",
    "e": "red apple pie",
    "f": "sky",
}


def make_run(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """A run from (query, doc) pairs listed in first-stage order."""
    frame = pd.DataFrame(rows, columns=["query_id", "doc_id"])
    frame["rank"] = frame.groupby("query_id").cumcount() + 1
    frame["score"] = 100.0 - frame["rank"]
    return frame


def ranking(frame: pd.DataFrame, query: str) -> list[str]:
    return frame[frame.query_id == query].sort_values("rank").doc_id.tolist()


def test_the_fake_student_implements_the_protocol() -> None:
    assert isinstance(OverlapStudent(), Student)


def test_rerank_run_reorders_the_head_and_keeps_the_tail_in_first_stage_order() -> None:
    run = make_run([("q1", d) for d in "acbed"] + [("q2", d) for d in "afd"])
    student = OverlapStudent()
    out = rerank_run(student, QUERIES, PASSAGES, run, depth=3)
    # one batched call over the head pairs of every query: 3 of q1, 3 of q2
    assert student.calls == [6]
    # q1 head a, c, b scores 0, 1, 2 -> b, c, a; tail e (score 2 but below depth), d follow in their order
    assert ranking(out, "q1") == ["b", "c", "a", "e", "d"]
    assert ranking(out, "q2") == ["d", "f", "a"]
    q1 = out[out.query_id == "q1"].sort_values("rank")
    assert q1.first_stage_rank.tolist() == [3, 2, 1, 4, 5]
    assert q1["rank"].tolist() == [1, 2, 3, 4, 5]
    # scores decrease with rank, so tools that sort by score (ir_measures, trec_eval) see the same order
    assert q1.score.is_monotonic_decreasing and q1.score.iloc[2] > q1.score.iloc[3]
    assert list(out.columns) == ["query_id", "doc_id", "rank", "score", "first_stage_rank"]


def test_ties_keep_the_first_stage_order_and_depth_beyond_the_run_reranks_everything() -> None:
    run = make_run([("q1", d) for d in "ebc"])  # e and b both score 2
    out = rerank_run(OverlapStudent(), QUERIES, PASSAGES, run, depth=1000)
    assert ranking(out, "q1") == ["e", "b", "c"]
    assert (out.first_stage_rank <= 3).all()


def test_first_stage_order_follows_rank_not_file_order() -> None:
    run = pd.DataFrame({"query_id": ["q1"] * 3, "doc_id": ["c", "a", "b"], "rank": [3, 1, 2], "score": [1.0, 3, 2]})
    out = rerank_run(OverlapStudent(), QUERIES, PASSAGES, run, depth=1)
    assert ranking(out, "q1") == ["a", "b", "c"]
    assert first_stage_order(run).doc_id.tolist() == ["a", "b", "c"]


def test_rerank_run_rejects_bad_input() -> None:
    run = make_run([("q1", "a"), ("q1", "zz")])
    with pytest.raises(RerankInputError, match="1 documents of the run have no passage"):
        rerank_run(OverlapStudent(), QUERIES, PASSAGES, run, depth=10)
    with pytest.raises(RerankInputError, match="depth must be at least 1"):
        rerank_run(OverlapStudent(), QUERIES, PASSAGES, make_run([("q1", "a")]), depth=0)
    with pytest.raises(RerankInputError, match="queries of the run have no text"):
        rerank_run(OverlapStudent(), QUERIES, PASSAGES, make_run([("q9", "a")]), depth=10)


# --- the command --------------------------------------------------------------------------------------------


def student_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "overlap-student"
    folder.mkdir()
    (folder / STUDENT_FILE).write_text(json.dumps({"kind": "cross-encoder", "max_length": 64}), encoding="utf-8")
    return folder


def cli_args(model: Path, run: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--collection", str(FIXTURE), "--run", str(run), "--out", str(out), *extra]


def test_cli_reranks_a_shipped_run_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    # the command loads the student through load_student; a fake one stands in for a trained model here
    monkeypatch.setattr(
        "pipeline.students.registry.load_student", lambda folder, device=None, precision="auto": OverlapStudent()
    )
    out = tmp_path / "out" / "reranked.trec"
    out.parent.mkdir()
    run = FIXTURE / "runs" / "weak.trec"
    code = main(cli_args(student_folder(tmp_path), run, out, "--depth", "3", "--no-progress"))
    assert code == 0
    printed = capsys.readouterr().out
    first = read_trec_run(run)
    assert f"reranked {first.query_id.nunique()} queries" in printed
    assert "nDCG@10" in printed and "judged in test" in printed
    lines = out.read_text().splitlines()
    assert len(lines) == len(first)
    assert {line.split()[5] for line in lines} == {"overlap-student"}
    reranked = read_trec_run(out)
    for query, ranks in first.groupby("query_id"):
        # same documents; below the depth, the first-stage order
        mine = reranked[reranked.query_id == query].sort_values("rank")
        assert set(mine.doc_id) == set(ranks.doc_id)
        assert mine.doc_id.tolist()[3:] == ranks.sort_values("rank").doc_id.tolist()[3:]


def test_cli_errors_name_the_file(tmp_path: Path, capsys) -> None:
    run = FIXTURE / "runs" / "weak.trec"
    out = tmp_path / "out.trec"
    assert main(cli_args(tmp_path, run, out)) == 2
    assert STUDENT_FILE in capsys.readouterr().err
    model = student_folder(tmp_path)
    assert main(cli_args(model, tmp_path / "missing.trec", out)) == 2
    assert "missing.trec: run file not found" in capsys.readouterr().err
    foreign = tmp_path / "foreign.trec"
    foreign.write_text("q1 Q0 X1 1 3.0 t\nq1 Q0 X2 2 2.0 t\n")
    assert main(cli_args(model, foreign, out)) == 2
    err = capsys.readouterr().err
    assert "foreign.trec: none of its 2 doc ids is in" in err and "corpus.jsonl" in err
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(model, run, out, "--depth", "0"))
    assert exit_info.value.code == 2
    assert "--depth: must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_an_out_in_a_missing_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the output path is checked before the student loads")

    monkeypatch.setattr("pipeline.students.registry.load_student", no_model)
    model = student_folder(tmp_path)
    run = FIXTURE / "runs" / "weak.trec"
    out = tmp_path / "no-such-dir" / "reranked.trec"
    assert main(cli_args(model, run, out, "--no-progress")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"directory {out.parent} does not exist" in err
    assert not out.parent.exists()
    # a directory given as --out is refused too, naming it
    assert main(cli_args(model, run, tmp_path, "--no-progress")) == 2
    assert f"--out {tmp_path}: is a directory" in capsys.readouterr().err


# --- the stage ----------------------------------------------------------------------------------------------


def stage_paths(tiny_pipeline: Path, tmp_path: Path):
    """The session's prepared tiny collection, with the reranked folder in this test's tmp_path."""
    paths = load_params(tiny_pipeline / "params.yaml").paths
    return dataclasses.replace(paths, reranked=str(tmp_path / "reranked"))


def test_stage_reranks_the_evaluation_split_of_each_first_stage(tiny_pipeline: Path, tmp_path: Path) -> None:
    paths = stage_paths(tiny_pipeline, tmp_path)
    evaluation = {"tiny": EvaluationCollection(split="test")}
    student = OverlapStudent()
    summary = rerank_stage.run("overlap", student, evaluation, RerankConfig(depth=3), paths, progress=False)
    table = read_table(paths.reranked_dir("overlap") / "reranked.parquet")
    queries = read_table(paths.collection_dir("tiny") / "queries.parquet")
    test_ids = set(queries[queries.split.str.contains("test")].query_id)
    assert set(table.query_id) == test_ids
    assert set(table.student) == {"overlap"} and set(table.collection) == {"tiny"}
    mine = summary["collections"]["tiny"]["overlap"]
    assert mine["pairs"] == int((table.first_stage_rank <= 3).sum()) == student.calls[0]
    assert mine["first_stage"] == "bm25"
    trec = read_trec_run(paths.reranked_dir("overlap") / "runs" / "tiny.trec")
    assert len(trec) == len(table)

    shipped = RerankConfig(depth=2, first_stage_per_collection={"tiny": "shipped-weak"})
    rerank_stage.run("overlap", OverlapStudent(), evaluation, shipped, paths, progress=False)
    table = read_table(paths.reranked_dir("overlap") / "reranked.parquet")
    weak = read_trec_run(FIXTURE / "runs" / "weak.trec")
    assert set(table.doc_id) <= set(weak.doc_id)
    assert len(table) == len(weak[weak.query_id.isin(test_ids)])


def test_stage_names_a_missing_first_stage(tiny_pipeline: Path, tmp_path: Path) -> None:
    paths = stage_paths(tiny_pipeline, tmp_path)
    cfg = RerankConfig(first_stage_per_collection={"tiny": "shipped-nope"})
    with pytest.raises(ConfigError, match=r"rerank.first_stage_per_collection.tiny: no run 'shipped-nope'.*weak"):
        rerank_stage.run("s", OverlapStudent(), {"tiny": EvaluationCollection()}, cfg, paths, progress=False)
    with pytest.raises(ConfigError, match=r"rerank\.first_stage: no run 'dense'"):
        rerank_stage.run(
            "s", OverlapStudent(), {"tiny": EvaluationCollection()}, RerankConfig(first_stage="dense"), paths
        )


# --- the command with a real (tiny, random) cross-encoder student ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT cross-encoder with random weights and MiniLM's tokenizer, saved as a student."""
    folder = save_tiny_cross_encoder(tmp_path_factory.mktemp("students") / "tiny-ce")
    info = {"kind": "cross-encoder", "backbone": "tiny-random-bert", "max_length": 64}
    (folder / STUDENT_FILE).write_text(json.dumps(info), encoding="utf-8")
    return folder


def test_cli_with_a_real_student_folder(tiny_cross_encoder: Path, tmp_path: Path, capsys) -> None:
    from pipeline.lucene import document_contents
    from pipeline.sources import load_beir_folder
    from pipeline.students.registry import load_student

    out = tmp_path / "tiny-ce.trec"
    run = FIXTURE / "runs" / "weak.trec"
    args = cli_args(tiny_cross_encoder, run, out, "--depth", "4", "--device", "cpu", "--batch-size", "3")
    assert main([*args, "--no-progress"]) == 0
    assert "tiny-ce: reranked" in capsys.readouterr().out
    reranked = read_trec_run(out)
    first = read_trec_run(run)
    assert len(reranked) == len(first)
    # the head's order is the student's own: rescoring the top 4 of a query gives the same order
    student = load_student(tiny_cross_encoder, device="cpu")
    collection = load_beir_folder(FIXTURE, "tiny")
    corpus = collection.corpus.set_index("doc_id")
    query = first.query_id.iloc[0]
    head = first[first.query_id == query].sort_values("rank").doc_id.tolist()[:4]
    texts = [document_contents(corpus.title[d], corpus.text[d]) for d in head]
    scores = student.score(collection.queries.set_index("query_id").text[query], texts)
    expected = [head[i] for i in np.argsort(-scores, kind="stable")]
    mine = reranked[reranked.query_id == query].sort_values("rank").doc_id.tolist()[:4]
    assert mine == expected


def test_the_distillrank_command_dispatches_to_rerank(tmp_path: Path) -> None:
    from conftest import BIN, run_cli

    result = run_cli(
        [str(BIN / "distillrank"), "rerank", *cli_args(tmp_path, FIXTURE / "runs" / "weak.trec", tmp_path / "o")],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: not a distillrank student folder")


def test_stage_command_with_a_real_student(tiny_pipeline: Path, tiny_cross_encoder: Path, tmp_path: Path, capsys):
    import shutil

    from conftest import tiny_params, write_params

    params = tiny_params(
        tiny_pipeline,
        teach={"collection": {"tiny": {"split": "train"}}},
        students={"tiny-ce": {"kind": "cross-encoder", "labels": "tiny", "backbone": str(tiny_cross_encoder)}},
        rerank={"depth": 5, "batch_size": 4, "precision": "int8"},
    )
    params["paths"].update(students=str(tmp_path / "students"), reranked=str(tmp_path / "reranked"))
    params_file = write_params(tmp_path / "params.yaml", params)
    assert rerank_stage.main(["tiny-ce", "--params", str(params_file)]) == 2
    assert "student folder not found" in capsys.readouterr().err
    shutil.copytree(tiny_cross_encoder, tmp_path / "students" / "tiny-ce")
    assert rerank_stage.main(["tiny-ce", "--params", str(params_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["collections"]["tiny"]["tiny-ce"]["pairs"] > 0 and summary["depth"] == 5
    # rerank.precision reaches both the student and its untrained starting point
    assert {run["precision"] for run in summary["collections"]["tiny"].values()} == {"int8"}
    table = read_table(tmp_path / "reranked" / "tiny-ce" / "reranked.parquet")
    # the untrained starting point (the backbone) reranks the same candidates, as its own run
    assert set(table.student) == {"tiny-ce", "tiny-ce:untrained"}
    assert (
        summary["collections"]["tiny"]["tiny-ce:untrained"]["pairs"]
        == summary["collections"]["tiny"]["tiny-ce"]["pairs"]
    )
    assert (tmp_path / "reranked" / "tiny-ce" / "runs" / "tiny.trec").is_file()
    assert (tmp_path / "reranked" / "tiny-ce" / "runs" / "tiny.untrained.trec").is_file()
    assert rerank_stage.main(["nobody", "--params", str(params_file)]) == 2
    assert "students: no student 'nobody'" in capsys.readouterr().err
