"""First-stage retrieval (BM25) and evaluation outputs on the tiny fixture pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import schemas
from pipeline.config import ConfigError, Paths, RetrieveConfig, load_params
from pipeline.io import read_table, read_trec_run
from pipeline.lucene import document_contents
from pipeline.stages import retrieve
from pipeline.stages.common import split_queries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def params(tiny_pipeline: Path):
    return load_params(tiny_pipeline / "params.yaml")


@pytest.fixture(scope="module")
def candidates(params) -> pd.DataFrame:
    return read_table(params.paths.retrieval_dir("tiny") / schemas.TABLES["candidates"].filename)


def test_candidates_schema(params) -> None:
    path = params.paths.retrieval_dir("tiny") / schemas.TABLES["candidates"].filename
    schema = pq.read_schema(path)
    assert schema.names == ["collection", "query_id", "doc_id", "method", "rank", "score"]
    assert schema.equals(schemas.CANDIDATES, check_metadata=False)


def test_candidates_cover_every_query(candidates: pd.DataFrame) -> None:
    assert sorted(candidates.query_id.unique()) == [f"q{i}" for i in range(1, 9)]
    assert set(candidates.collection) == {"tiny"}
    assert set(candidates.method) == {"bm25"}
    assert not candidates.duplicated(["query_id", "doc_id", "method"]).any()


def test_ranks_are_contiguous_and_scores_non_increasing(candidates: pd.DataFrame, params) -> None:
    for (query_id, _), rows in candidates.groupby(["query_id", "method"]):
        rows = rows.sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1)), query_id
        assert rows.score.is_monotonic_decreasing, query_id
        assert (rows.score > 0).all(), query_id
        assert 1 <= len(rows) <= params.retrieve.depth, query_id


@pytest.mark.parametrize(
    ("query_id", "expected"), [("q1", {"d1"}), ("q2", {"d2"}), ("q3", {"d7"}), ("q4", {"d5", "d13"})]
)
def test_the_obvious_document_ranks_first(candidates: pd.DataFrame, query_id: str, expected: set[str]) -> None:
    top = candidates[(candidates.query_id == query_id) & (candidates["rank"] == 1)]
    assert len(top) == 1
    assert top.doc_id.iloc[0] in expected


def test_trec_run_file_equals_the_table(candidates: pd.DataFrame, params) -> None:
    path = params.paths.retrieval_dir("tiny") / retrieve.RUNS_FOLDER / "bm25.trec"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.split()[1] == "Q0" and line.split()[5] == "bm25" for line in lines)
    run = read_trec_run(path)
    table = candidates[candidates.method == "bm25"].sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert len(run) == len(table)
    assert run.query_id.tolist() == table.query_id.tolist()
    assert run.doc_id.tolist() == table.doc_id.tolist()
    assert run["rank"].tolist() == table["rank"].tolist()
    assert run.score.tolist() == pytest.approx(table.score.tolist(), abs=5e-7)


def test_depth_limits_the_candidates(params, tmp_path: Path) -> None:
    paths = Paths(
        collections=params.paths.collections, indexes=params.paths.indexes, retrieval=str(tmp_path / "retrieval")
    )
    cfg = RetrieveConfig(depth=2, threads=1)
    summary = retrieve.run("tiny", cfg, paths)
    shallow = read_table(paths.retrieval_dir("tiny") / schemas.TABLES["candidates"].filename)
    assert summary["queries"] == {"test": 4, "train": 4}
    assert summary["candidates"] == len(shallow)
    assert shallow.groupby("query_id").size().max() == 2
    deep = read_table(params.paths.retrieval_dir("tiny") / schemas.TABLES["candidates"].filename)
    # the top 2 are the deep run's top 2
    pd.testing.assert_frame_equal(
        shallow[["query_id", "doc_id", "rank"]].reset_index(drop=True),
        deep[deep["rank"] <= 2][["query_id", "doc_id", "rank"]].reset_index(drop=True),
    )


def test_every_split_is_retrieved(candidates: pd.DataFrame, params) -> None:
    """The training split gets candidates too (the teacher labels them); evaluate keeps its own split."""
    assert {"q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"} <= set(candidates.query_id)
    top = candidates[candidates["rank"] == 1].set_index("query_id").doc_id
    assert top["q5"] == "d8"  # vaccines
    per_query = pd.read_parquet(Path(params.paths.evaluation) / "per_query.parquet")
    assert set(per_query.query_id) == {"q1", "q2", "q3", "q4"}


def test_empty_split_names_the_parameter(params) -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.tiny\.split: no queries in split 'dev'") as info:
        split_queries(params.paths, "tiny", "dev", "evaluation.tiny.split")
    assert "['test', 'train']" in str(info.value)


# --- evaluate outputs ---------------------------------------------------------------------------------------


def test_eval_metrics(params) -> None:
    metrics = json.loads((Path(params.paths.metrics) / "eval.json").read_text(encoding="utf-8"))
    tiny = metrics["tiny"]
    assert tiny["queries"] == 4
    assert set(tiny["runs"]) == {"bm25", "shipped-weak"}
    for run in tiny["runs"].values():
        assert set(run) == {"nDCG@10", "RR@10", "R@100"}
        assert all(0.0 <= value <= 1.0 for value in run.values())
    assert tiny["runs"]["bm25"]["nDCG@10"] > tiny["runs"]["shipped-weak"]["nDCG@10"]
    # the weak run's first relevant document per query gives RR@10
    # (1/2 [q1: d11] + 1/3 [q2: d12 is judged 0, d2 at 3] + 1 [q3: d14] + 1/2 [q4: d13]) / 4 = 0.5833
    assert tiny["runs"]["shipped-weak"]["RR@10"] == pytest.approx(0.5833, abs=1e-4)
    comparison = tiny["vs_bm25"]["shipped-weak"]
    assert comparison["measure"] == "nDCG@10"
    assert comparison["wins"] + comparison["losses"] + comparison["ties"] == 4
    assert comparison["delta"] < 0


def test_eval_per_query_table(params) -> None:
    path = Path(params.paths.evaluation) / schemas.TABLES["eval_per_query"].filename
    assert pq.read_schema(path).names == schemas.EVAL_PER_QUERY.names
    per_query = read_table(path)
    assert set(per_query.run) == {"bm25", "shipped-weak"}
    assert set(per_query.query_id) == {"q1", "q2", "q3", "q4"}
    assert len(per_query) == 2 * 4 * 3
    metrics = json.loads((Path(params.paths.metrics) / "eval.json").read_text(encoding="utf-8"))
    means = per_query.groupby(["run", "measure"]).value.mean()
    for run, values in metrics["tiny"]["runs"].items():
        for measure, value in values.items():
            assert means[(run, measure)] == pytest.approx(value, abs=5e-5)


def test_delta_plots(params) -> None:
    png = Path(params.paths.plots) / "deltas" / "tiny.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    deltas = pd.read_csv(Path(params.paths.plots) / "per_query_deltas.csv")
    assert deltas.columns.tolist() == ["collection", "run", "measure", "order", "query_id", "delta"]
    assert set(deltas.run) == {"shipped-weak"}
    assert deltas.delta.is_monotonic_increasing


# --- lucene.document_contents -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "text", "contents"),
    [
        ("Title", "Body.", "Title Body."),
        ("", "Body.", "Body."),
        ("", "", ""),
    ],
)
def test_document_contents(title: str, text: str, contents: str) -> None:
    assert document_contents(title, text) == contents
