"""DuckDB views over the tables, and the ``distillrank`` command line (sql, stage errors)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb
import pytest

from conftest import BIN, run_cli, tiny_params, write_params
from pipeline import duck
from pipeline.config import load_params, parse_params

DISTILLRANK = str(BIN / "distillrank")


def paths_of(root: Path):
    return load_params(root / "params.yaml").paths


def sql(root: Path, statement: str) -> list[tuple]:
    return duck.query(paths_of(root), statement, root)[1]


# --- pipeline.duck ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "rows"),
    [
        ("corpus", 15),
        ("queries", 8),
        ("qrels", 13),
        ("shipped_runs", 12),
    ],
)
def test_views_of_the_prepared_tables(tiny_pipeline: Path, view: str, rows: int) -> None:
    assert sql(tiny_pipeline, f"SELECT count(*) FROM {view}") == [(rows,)]
    assert sql(tiny_pipeline, f"SELECT DISTINCT collection FROM {view}") == [("tiny",)]


def test_views_of_the_retrieval_and_evaluation_tables(tiny_pipeline: Path) -> None:
    # all 8 queries (4 test, 4 train); BM25 returns only documents sharing a term with the query (depth=10)
    n, queries, methods = sql(
        tiny_pipeline, "SELECT count(*), count(DISTINCT query_id), list(DISTINCT method) FROM candidates"
    )[0]
    assert 8 <= n <= 80
    assert queries == 8
    assert methods == ["bm25"]
    runs = sql(tiny_pipeline, "SELECT DISTINCT run FROM eval_per_query ORDER BY run")
    assert runs == [("bm25",), ("shipped-weak",)]
    # 2 runs x 4 test queries x 3 measures
    assert sql(tiny_pipeline, "SELECT count(*) FROM eval_per_query") == [(2 * 4 * 3,)]


def test_query_returns_column_names(tiny_pipeline: Path) -> None:
    columns, rows = duck.query(
        paths_of(tiny_pipeline), "SELECT query_id, text FROM queries WHERE split = 'train' ORDER BY 1", tiny_pipeline
    )
    assert columns == ["query_id", "text"]
    assert [r[0] for r in rows] == ["q5", "q6", "q7", "q8"]


def test_join_candidates_with_qrels(tiny_pipeline: Path) -> None:
    rows = sql(
        tiny_pipeline,
        """
        SELECT c.query_id, c.doc_id, c.rank, q.relevance
        FROM candidates c JOIN qrels q USING (collection, query_id, doc_id)
        WHERE q.split = 'test' AND c.rank = 1
        ORDER BY c.query_id
        """,
    )
    assert [r[0] for r in rows] == ["q1", "q2", "q3", "q4"]
    assert all(r[3] == 2 for r in rows)  # every test query's top document is highly relevant


def test_views_cover_only_existing_tables(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params(tmp_path)))
    # only the teacher's call cache has a view before anything ran: an empty one, so queries on it still work
    statements = duck.view_statements(params.paths, tmp_path)
    assert [s.split()[4] for s in statements] == ["teacher_calls"]
    assert duck.query(params.paths, "SELECT count(*) FROM teacher_calls", tmp_path)[1] == [(0,)]
    with pytest.raises(duckdb.CatalogException):
        duck.query(params.paths, "SELECT * FROM corpus", tmp_path)


def test_relative_paths_resolve_against_the_root(tiny_pipeline: Path) -> None:
    relative = parse_params(tiny_params(None)).paths
    assert relative.collections == "data/collections"
    statements = duck.view_statements(relative, tiny_pipeline)
    assert len(statements) == 8  # six tables, all_queries and the (empty) teacher_calls view
    assert str((tiny_pipeline / "data/collections").resolve()) in statements[0]
    assert duck.query(relative, "SELECT count(*) FROM corpus", tiny_pipeline)[1] == [(15,)]


# --- distillrank sql ----------------------------------------------------------------------------------------


def distillrank(root: Path, *args: str):
    return run_cli([DISTILLRANK, *args], cwd=root, timeout=120)


def test_cli_sql_table(tiny_pipeline: Path) -> None:
    result = distillrank(tiny_pipeline, "sql", "SELECT count(*) AS n FROM corpus", "--params", "params.yaml")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == "n"
    assert lines[-1] == "15"


def test_cli_sql_max_rows(tiny_pipeline: Path) -> None:
    result = distillrank(
        tiny_pipeline, "sql", "SELECT doc_id FROM corpus", "--params", "params.yaml", "--max-rows", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "... 11 more rows" in result.stdout


def test_cli_sql_json(tiny_pipeline: Path) -> None:
    result = distillrank(
        tiny_pipeline,
        "sql",
        "SELECT query_id, count(*) AS n FROM qrels WHERE split = 'test' GROUP BY 1 ORDER BY 1",
        "--params",
        str(tiny_pipeline / "params.yaml"),
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"query_id": f"q{i}", "n": 2} for i in range(1, 5)]


def test_cli_sql_csv(tiny_pipeline: Path) -> None:
    result = distillrank(
        tiny_pipeline,
        "sql",
        "SELECT doc_id, title FROM corpus WHERE doc_id IN ('d1', 'd2') ORDER BY doc_id",
        "--params",
        "params.yaml",
        "--format",
        "csv",
    )
    assert result.returncode == 0, result.stderr
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        ["doc_id", "title"],
        ["d1", "Honey bees"],
        ["d2", "Volcanoes"],
    ]


def test_cli_print_views(tiny_pipeline: Path) -> None:
    result = distillrank(tiny_pipeline, "sql", "--print-views", "--params", "params.yaml")
    assert result.returncode == 0, result.stderr
    statements = result.stdout.strip().splitlines()
    names = [s.split()[4] for s in statements]
    assert names == [
        "corpus",
        "queries",
        "qrels",
        "shipped_runs",
        "candidates",
        "eval_per_query",
        "teacher_calls",
        "all_queries",
    ]
    assert all(s.startswith("CREATE OR REPLACE VIEW ") and s.endswith(";") for s in statements)
    # the statements work as they are in a fresh duckdb session (what the option is for)
    con = duckdb.connect()
    for statement in statements:
        con.execute(statement)
    assert con.execute("SELECT count(*) FROM corpus").fetchone() == (15,)


def test_cli_sql_error_exits_2_without_traceback(tiny_pipeline: Path) -> None:
    result = distillrank(tiny_pipeline, "sql", "SELECT * FROM nosuch_table", "--params", "params.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "nosuch_table" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_sql_bad_params_exits_2(tiny_pipeline: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(tiny_pipeline, paths={"colections": "x"}))
    result = distillrank(tiny_pipeline, "sql", "SELECT 1", "--params", str(params))
    assert result.returncode == 2
    assert "paths.colections: unknown key (did you mean 'collections'?)" in result.stderr
    assert "Traceback" not in result.stderr


# --- distillrank stage: user errors -------------------------------------------------------------------------


def test_stage_with_an_undefined_collection(tiny_pipeline: Path) -> None:
    result = distillrank(tiny_pipeline, "stage", "prepare", "nosuch", "--params", "params.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "collection 'nosuch' is not defined under 'collections'" in result.stderr
    assert "tiny" in result.stderr  # the known collections
    assert "Traceback" not in result.stderr


def test_stage_with_a_typo_in_params(tiny_pipeline: Path, tmp_path: Path) -> None:
    params = tiny_params(tiny_pipeline)
    params["retrieve"] = {**params["retrieve"], "dpeth": 5}
    path = write_params(tmp_path / "params.yaml", params)
    result = distillrank(tiny_pipeline, "stage", "retrieve", "tiny", "--params", str(path))
    assert result.returncode == 2
    assert f"error: {path}: invalid parameters" in result.stderr
    assert "retrieve.dpeth: unknown key (did you mean 'depth'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_stage_exits_2(tiny_pipeline: Path) -> None:
    result = distillrank(tiny_pipeline, "stage", "nosuch")
    assert result.returncode == 2
    assert "usage: distillrank stage" in result.stderr


def test_duckdb_shell_sees_the_same_views(tiny_pipeline: Path, tmp_path: Path) -> None:
    """What `make sql` does: the duckdb-cli shell started with the printed views as its init file."""
    import subprocess

    views = run_cli(["distillrank", "sql", "--print-views"], tiny_pipeline)
    assert views.returncode == 0, views.stderr
    init = tmp_path / "views.sql"
    init.write_text(views.stdout)
    shell = subprocess.run(
        [str(BIN / "duckdb"), "-csv", "-init", str(init)],
        input="SELECT count(*) AS n FROM corpus;\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip().splitlines()[-1] == "15"
