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

import difflib
import glob
import re
from pathlib import Path

import duckdb

from pipeline.config import Paths
from pipeline.schemas import TABLES, TableSpec
from pipeline.teacher.cache import teacher_calls_view_sql


def distinct_values(path: Path, column: str, where: tuple[str, str] | None = None) -> list[str]:
    """The sorted distinct values of ``column`` in the Parquet file ``path``, in Python's string order (DuckDB:
    the column is never held whole).

    >>> import tempfile, pandas as pd
    >>> path = Path(tempfile.mkdtemp()) / "t.parquet"
    >>> pd.DataFrame({"query_id": ["q2", "q1", "q2"], "method": ["a", "b", "a"]}).to_parquet(path)
    >>> distinct_values(path, "query_id"), distinct_values(path, "query_id", where=("method", "a"))
    (['q1', 'q2'], ['q2'])
    """
    sql = f'SELECT DISTINCT "{column}" FROM read_parquet(?)'
    args: list[str] = [str(path)]
    if where is not None:
        sql += f' WHERE "{where[0]}" = ?'
        args.append(where[1])
    with duckdb.connect() as con:
        return sorted(str(row[0]) for row in con.execute(sql, args).fetchall())


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
    statements.append(teacher_calls_statement(root / paths.teacher_cache))
    return statements + derived_view_statements(present)


def teacher_calls_statement(cache: Path) -> str:
    """The ``teacher_calls`` view: every shard of the call cache, at any depth under ``cache`` (the teach
    targets' folders ``<name>/`` and the synthesize stage's ``_synthesize/<name>/``); an empty view when there
    are none."""
    return f"CREATE OR REPLACE VIEW teacher_calls AS {teacher_calls_view_sql(cache / '**')};"


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


# Every view this module can make: a table's once a stage has written it, the derived ones once their tables exist.
DERIVED_VIEWS = {
    "teacher_calls": "the teacher's call cache",
    "all_queries": "queries or synthetic_queries",
    "teacher_explained": "teacher_rankings, rationales, corpus and queries or synthetic_queries",
}
VIEW_NAMES = (*TABLES, *DERIVED_VIEWS)


class UnknownTableError(duckdb.CatalogException):
    """A query named a table or view that does not exist (the message lists the views that do)."""


_UNKNOWN_TABLE = re.compile(r"Table with name (.+?) does not exist!")


def unknown_table_message(error: str, views: list[str], paths: Paths, root: Path | str = ".") -> str | None:
    r"""DuckDB's message for an unknown table with its hint (the nearest of its own catalog tables, such as
    ``pg_sequences``) replaced by the views here; None for any other error.

    >>> error = 'Catalog Error: Table with name corpu does not exist!\nDid you mean "pg_sequences"?\n\nLINE 1: ...'
    >>> print(unknown_table_message(error, ["corpus", "qrels"], Paths()))
    Catalog Error: no table or view named 'corpu'. Did you mean "corpus"?
    The views: corpus, qrels
    Not made (no stage has written their tables yet): queries, ..., teacher_explained
    <BLANKLINE>
    LINE 1: ...
    """
    match = _UNKNOWN_TABLE.search(error)
    if match is None:
        return None
    name = match.group(1)
    pending = [v for v in VIEW_NAMES if v not in views]
    spec = TABLES.get(name.lower())
    if name.lower() in pending:
        what = (
            f"no file matches {Path(root) / table_glob(spec, paths)} (the stage that writes it has not run)"
            if spec is not None
            else f"it needs {DERIVED_VIEWS[name.lower()]}"
        )
        first = f"Catalog Error: there is no view {name!r} yet: {what}"
    else:
        close = difflib.get_close_matches(name.lower(), [*views, *pending], n=1)
        first = f"Catalog Error: no table or view named {name!r}." + (f' Did you mean "{close[0]}"?' if close else "")
    lines = [first, "The views: " + (", ".join(views) or "none")]
    if pending:
        lines.append("Not made (no stage has written their tables yet): " + ", ".join(pending))
    location = error.find("\nLINE ")  # DuckDB's pointer to the name in the query
    return "\n".join(lines) + ("\n" + error[location:] if location >= 0 else "")


def query(paths: Paths, sql: str, root: Path | str = ".") -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the views; return (column names, rows). A query naming a table that does not exist raises
    ``UnknownTableError``, whose message lists the views."""
    statements = view_statements(paths, root)
    con = duckdb.connect()
    try:
        for statement in statements:
            con.execute(statement)
        try:
            cursor = con.execute(sql)
        except duckdb.CatalogException as err:
            views = [statement.split()[4] for statement in statements]
            message = unknown_table_message(str(err), views, paths, root)
            if message is None:
                raise
            raise UnknownTableError(message) from None
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()
