"""Slow end-to-end checks on the real SciFact collection in ../shared/data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import SHARED_DATA, make_repo_copy, run_cli, tiny_params
from pipeline.io import read_trec_run
from pipeline.lucene import java_environment, pyserini_command

SCIFACT = SHARED_DATA / "scifact"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"{SCIFACT} is not there (../shared/data)"),
]


@pytest.fixture(scope="module")
def scifact_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = tiny_params(
        collections={"scifact": {"source": str(SCIFACT)}},
        train={"collection": "scifact", "split": "train"},
        evaluation={"scifact": {"split": "test"}},
        retrieve={"depth": 100, "threads": 2},
        index={"threads": 2},
    )
    params["collections"] = {"scifact": {"source": str(SCIFACT)}}
    params["evaluation"] = {"scifact": {"split": "test"}}
    repo = make_repo_copy(tmp_path_factory.mktemp("scifact") / "repo", params)
    result = run_cli(["dvc", "repro"], repo, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return repo


def test_bm25_lands_on_the_published_lucene_figure(scifact_repo: Path) -> None:
    metrics = json.loads((scifact_repo / "metrics/eval.json").read_text())["scifact"]
    assert metrics["queries"] == 300
    bm25 = metrics["runs"]["bm25"]
    # BEIR's Lucene BM25 (multifield) reports 0.665, pyserini's flat index 0.679; ../shared/data's
    # reference with pyserini 1.6.0, k1=0.9 b=0.4, title+text in one field: 0.6799 / 0.9253 / 0.6461.
    assert 0.665 <= bm25["nDCG@10"] <= 0.681
    assert bm25["nDCG@10"] == pytest.approx(0.6799, abs=1e-4)
    assert bm25["R@100"] == pytest.approx(0.9253, abs=1e-4)
    assert bm25["RR@10"] == pytest.approx(0.6461, abs=1e-4)


def test_bm25_run_equals_pyserini_search_cli(scifact_repo: Path, tmp_path: Path) -> None:
    """Our run and pyserini's own search CLI, same index and parameters, must be the same run."""
    import pandas as pd

    queries = pd.read_parquet(scifact_repo / "data/collections/scifact/queries.parquet")
    queries = queries[queries.split == "test"]
    topics = tmp_path / "topics.tsv"
    topics.write_text("".join(f"{q}\t{t}\n" for q, t in zip(queries.query_id, queries.text, strict=True)))
    cli_run = tmp_path / "cli.trec"
    args = ["--index", str(scifact_repo / "data/indexes/scifact"), "--topics", str(topics)]
    args += ["--output", str(cli_run), "--bm25", "--k1", "0.9", "--b", "0.4", "--hits", "100", "--threads", "2"]
    result = subprocess.run(
        pyserini_command("pyserini.search.lucene", args),
        env=java_environment(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = read_trec_run(cli_run)
    ours = read_trec_run(scifact_repo / "data/retrieval/scifact/runs/bm25.trec")
    ours = ours[ours.query_id.isin(set(queries.query_id))]  # retrieve covers every split; the CLI got the test
    assert len(ours) == len(theirs)
    assert ours.query_id.nunique() == 300 and len(ours) > 299 * 100  # a few queries match < 100 docs
    key = ["query_id", "rank"]
    merged = ours.merge(theirs, on=key, suffixes=("_ours", "_cli"), how="outer", validate="one_to_one")
    assert (merged.doc_id_ours == merged.doc_id_cli).all()
    assert (merged.score_ours == merged.score_cli).all()


def test_sql_over_the_default_tables(scifact_repo: Path) -> None:
    result = run_cli(
        ["distillrank", "sql", "SELECT count(*) AS docs FROM corpus WHERE collection = 'scifact'"], scifact_repo
    )
    assert result.returncode == 0, result.stderr
    assert "5183" in result.stdout
