"""DuckDB over the pipeline's Parquet tables: one view per table, named after it.

Per-collection tables (``corpus``, ``queries``, ``candidates``, ...) are unions over every collection's file,
with the ``collection`` column telling them apart. Views are created for the tables that exist so far.
"""

from __future__ import annotations

import glob
from pathlib import Path

import duckdb

from pipeline.config import Paths
from pipeline.schemas import TABLES, TableSpec
from pipeline.teacher.cache import teacher_calls_view_sql


def table_glob(spec: TableSpec, paths: Paths) -> str:
    folder = Path(getattr(paths, spec.folder))
    return str(folder / "*" / spec.filename) if spec.scope == "collection" else str(folder / spec.filename)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def view_statements(paths: Paths, root: Path | str = ".") -> list[str]:
    """``CREATE VIEW`` statements for every table that has at least one file under ``root``."""
    root = Path(root)
    statements = []
    for spec in TABLES.values():
        # an absolute path in params stays as it is (Path.glob rejects absolute patterns: glob.glob does not)
        location = str((root / table_glob(spec, paths)).resolve())
        if not glob.glob(location):
            continue
        statements.append(
            f"CREATE OR REPLACE VIEW {spec.name} AS "
            f"SELECT * FROM read_parquet({_sql_string(location)}, union_by_name = true);"
        )
    # the teacher's call cache: JSONL shards, one folder per collection (an empty view when there are none)
    cache_glob = str((root / paths.teacher_cache).resolve() / "*")
    statements.append(f"CREATE OR REPLACE VIEW teacher_calls AS {teacher_calls_view_sql(cache_glob)};")
    return statements


def connect(paths: Paths, root: Path | str = ".") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views of ``view_statements``."""
    con = duckdb.connect()
    for statement in view_statements(paths, root):
        con.execute(statement)
    return con


def query(paths: Paths, sql: str, root: Path | str = ".") -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the views; return (column names, rows)."""
    con = connect(paths, root)
    try:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()
