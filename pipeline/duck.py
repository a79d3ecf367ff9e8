"""DuckDB over the pipeline's Parquet tables: one view per table, named after it.

Per-collection tables (``corpus``, ``queries``, ``candidates``, ...) are unions over every collection's file,
with the ``collection`` column telling them apart. Views are created for the tables that exist so far, plus:

- ``all_queries``: the collections' queries and the synthesized ones (``synthetic_queries``) in one view, so that
  a label or a rationale finds its query's text whichever kind of query it is;
- ``teacher_explained``: the teacher's ranking of each query with, for each passage, its title and the teacher's
  Reason-to-Rank reasons (null for a passage that was not explained, and for every passage of the other teacher
  methods). The README's query::

      SELECT teacher_rank, doc_id, title, direct_reason, answer_sentence, comparative_reason
      FROM teacher_explained
      WHERE collection = 'scifact' AND query_id = '1'
      ORDER BY teacher_rank;
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
    present: set[str] = set()
    for spec in TABLES.values():
        # an absolute path in params stays as it is (Path.glob rejects absolute patterns: glob.glob does not)
        location = str((root / table_glob(spec, paths)).resolve())
        if not glob.glob(location):
            continue
        present.add(spec.name)
        statements.append(
            f"CREATE OR REPLACE VIEW {spec.name} AS "
            f"SELECT * FROM read_parquet({_sql_string(location)}, union_by_name = true);"
        )
    # the teacher's call cache: JSONL shards, one folder per collection (an empty view when there are none)
    cache_glob = str((root / paths.teacher_cache).resolve() / "*")
    statements.append(f"CREATE OR REPLACE VIEW teacher_calls AS {teacher_calls_view_sql(cache_glob)};")
    return statements + derived_view_statements(present)


# The views built on the table views, each with the tables it needs. ``reasons``: one row per explained passage
# and window (the direct and the comparative row of one call side by side).
TEACHER_EXPLAINED_SQL = """CREATE OR REPLACE VIEW teacher_explained AS
WITH reasons AS (
    SELECT collection, query_id, doc_id, run_id, call_key,
           any_value(window_rank) AS window_rank,
           any_value(parse_status) AS parse_status,
           any_value(text) FILTER (WHERE kind = 'direct') AS direct_reason,
           any_value(answer_sentence) FILTER (WHERE kind = 'direct') AS answer_sentence,
           any_value(text) FILTER (WHERE kind = 'comparative') AS comparative_reason,
           any_value(compared_doc_ids) FILTER (WHERE kind = 'comparative') AS compared_doc_ids
    FROM rationales
    GROUP BY collection, query_id, doc_id, run_id, call_key
)
SELECT r.collection, r.query_id, q.text AS query, q.origin AS query_origin, r.teacher_rank, r.first_stage_rank,
       r.doc_id, c.title, x.window_rank, x.direct_reason, x.answer_sentence, x.comparative_reason,
       x.compared_doc_ids, x.parse_status, r.model, r.method, r.run_id
FROM teacher_rankings r
LEFT JOIN reasons x USING (collection, query_id, doc_id, run_id)
LEFT JOIN all_queries q ON q.collection = r.collection AND q.query_id = r.query_id
LEFT JOIN corpus c ON c.collection = r.collection AND c.doc_id = r.doc_id;"""


def derived_view_statements(tables: set[str]) -> list[str]:
    """``CREATE VIEW`` statements for ``all_queries`` and ``teacher_explained``, given the table views that exist.

    >>> derived_view_statements({"queries"})
    ['CREATE OR REPLACE VIEW all_queries AS SELECT * FROM queries;']
    >>> [s.split(" AS")[0] for s in derived_view_statements({"queries", "synthetic_queries", "corpus",
    ...                                                    "teacher_rankings", "rationales"})]
    ['CREATE OR REPLACE VIEW all_queries', 'CREATE OR REPLACE VIEW teacher_explained']
    """
    statements = []
    sources = [f"SELECT * FROM {name}" for name in ("queries", "synthetic_queries") if name in tables]
    if sources:
        statements.append(f"CREATE OR REPLACE VIEW all_queries AS {' UNION ALL BY NAME '.join(sources)};")
    if sources and {"teacher_rankings", "rationales", "corpus"} <= tables:
        # on one line, as every statement here: ``distillrank sql --print-views`` prints one statement a line
        statements.append(" ".join(TEACHER_EXPLAINED_SQL.split()))
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
