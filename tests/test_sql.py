"""DuckDB views over the tables, and the ``distillrank`` command line (sql, stage errors)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from conftest import BIN, run_cli, tiny_params, write_params
from pipeline import duck
from pipeline.config import load_params, parse_params
from pipeline.io import write_table
from pipeline.schemas import TABLES
from pipeline.teacher.cache import CallRecord

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
    assert "The views: corpus, queries, qrels, shipped_runs, candidates, eval_per_query, teacher_calls" in result.stderr
    assert "pg_" not in result.stderr  # DuckDB's own hint names one of its catalog tables
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


# --- the README's SQL: every query runs on fixture tables and gives what pandas computes --------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_queries() -> list[str]:
    """Every SQL query in the README: each statement of its ```sql blocks, and each `distillrank sql "..."`."""
    text = README.read_text(encoding="utf-8")
    statements = []
    for block in re.findall(r"^```sql\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        statements += [s.strip() for s in re.split(r";[ \t]*(?:\n|$)", block) if s.strip()]
    statements += re.findall(r'distillrank sql "([^"]+)"', text)
    return statements


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def build_readme_fixture(root: Path) -> dict[str, pd.DataFrame]:
    """Small tables under ``root`` (the layout of ``tiny_params(root)``) named as the README's queries expect
    ('scifact', 'trec-dl-2019', 'syn-c-1'), with the traps those queries must get right: ``candidates`` holds
    several retrievers' runs, qrels judge documents outside the corpus and queries outside ``queries``, a test
    query also has dev qrels, doc and query ids repeat across collections, one synthesized query's source document
    is not among the teacher's candidates. Returns the tables as DataFrames (``teacher_calls``: the cache
    records)."""
    rng = random.Random(14)
    paths = parse_params(tiny_params(root)).paths
    docs = [f"d{i}" for i in range(40)]  # the same ids in both collections
    methods = {"scifact": ["bm25", "bm25-rm3", "dense", "rrf"], "trec-dl-2019": ["bm25", "bm25-rm3"]}
    tables: dict[str, list[dict]] = {name: [] for name in TABLES}
    for collection in ("scifact", "trec-dl-2019"):
        tables["corpus"] += [
            {"collection": collection, "doc_id": d, "title": f"{collection} title {d}", "text": f"text of {d}"}
            for d in docs
        ]
        for i in range(1, 9):
            query_id = f"q{i}"
            split = "train" if collection == "scifact" and i > 5 else "test"
            tables["queries"].append(
                {
                    "collection": collection,
                    "query_id": query_id,
                    "text": f"{collection} query {i}",
                    "split": split,
                    "origin": "collection",
                    "source_doc_id": None,
                }
            )
            grades = (0, 1) if collection == "scifact" else (0, 1, 2, 3)
            judged = rng.sample(docs, 8) + ([f"x{i}a", f"x{i}b"] if collection == "trec-dl-2019" else [])
            tables["qrels"] += [
                {
                    "collection": collection,
                    "query_id": query_id,
                    "doc_id": d,
                    "relevance": rng.choice(grades),
                    "split": split,
                }
                for d in judged
            ]
            for method in methods[collection]:
                ranked = rng.sample(docs, 25)
                tables["candidates"] += [
                    {
                        "collection": collection,
                        "query_id": query_id,
                        "doc_id": d,
                        "method": method,
                        "rank": r,
                        "score": 30.0 - r,
                    }
                    for r, d in enumerate(ranked, start=1)
                ]
            for run in ("shipped-bm25", "shipped-splade-pp-ed", "bm25"):
                tables["eval_per_query"] += [
                    {
                        "collection": collection,
                        "run": run,
                        "query_id": query_id,
                        "measure": measure,
                        "value": rng.random(),
                    }
                    for measure in ("nDCG@10", "RR@10")
                ]
        # judged in qrels, absent from queries (prepare keeps such rows with a warning)
        tables["qrels"].append(
            {"collection": collection, "query_id": "q99", "doc_id": "d1", "relevance": 1, "split": "test"}
        )
    # a test query of SciFact that dev qrels judge too (its documents must count once, under 'test')
    tables["qrels"] += [
        {**row, "split": "dev"} for row in tables["qrels"] if row["collection"] == "scifact" and row["query_id"] == "q1"
    ]
    synthetic = [
        ("syn-c-1", "cropped"),
        ("syn-c-2", "cropped"),
        ("syn-c-3", "cropped"),
        ("syn-g-1", "generated-llm"),
        ("syn-g-2", "generated-llm"),
        ("syn-g-3", "generated-llm"),
        ("syn-g-4", "generated-llm"),
    ]
    for n, (query_id, origin) in enumerate(synthetic):
        source = docs[n]
        tables["synthetic_queries"].append(
            {
                "collection": "scifact",
                "query_id": query_id,
                "text": f"synthesized {query_id}",
                "split": "train",
                "origin": origin,
                "source_doc_id": source,
            }
        )
        # the teacher ranks 10 candidates; syn-g-4's source document is not among them
        ranked = rng.sample([d for d in docs if d != source], 9) + ([source] if query_id != "syn-g-4" else docs[-1:])
        rng.shuffle(ranked)
        pool_order = rng.sample(range(1, 11), 10)
        for collection in ("scifact", "trec-dl-2019") if query_id == "syn-c-1" else ("scifact",):
            # trec-dl-2019 has a query 'syn-c-1' too (an id repeated across collections)
            tables["teacher_rankings"] += [
                {
                    "collection": collection,
                    "query_id": query_id,
                    "doc_id": d,
                    "teacher_rank": r,
                    "score": None,
                    "first_stage_rank": pool_order[r - 1],
                    "model": "qwen",
                    "method": "pointwise",
                    "first_stage": "pool",
                    "template_hash": "h",
                    "run_id": "r1",
                }
                for r, d in enumerate(ranked if collection == "scifact" else ranked[::-1], start=1)
            ]
        if query_id == "syn-c-1":
            explained = ranked[:3]  # of the first window only
            for w, d in enumerate(explained, start=1):
                common = {
                    "collection": "scifact",
                    "query_id": query_id,
                    "doc_id": d,
                    "window_rank": w,
                    "parse_status": "ok",
                    "model": "qwen",
                    "template_hash": "h",
                    "call_key": "k1",
                    "run_id": "r1",
                }
                tables["rationales"] += [
                    {
                        **common,
                        "kind": "direct",
                        "text": f"direct {d}",
                        "answer_sentence": f"answer {d}",
                        "compared_doc_ids": [],
                    },
                    {
                        **common,
                        "kind": "comparative",
                        "text": f"comparative {d}",
                        "answer_sentence": None,
                        "compared_doc_ids": [x for x in explained if x != d],
                    },
                ]
    frames = {}
    for name, rows in tables.items():
        if not rows:
            continue
        spec = TABLES[name]
        frame = _frame(rows)
        for collection, part in frame.groupby("collection"):
            target = Path(duck.table_glob(spec, paths).replace("*", str(collection)))
            write_table(part, spec.schema, target)
        frames[name] = frame
    # the call cache: a teach target's folder and the synthesize stage's (one level deeper), a torn last line
    records = []
    for folder, statuses in (
        (Path(paths.teacher_cache) / "scifact", ["ok", "ok", "error", "ok"]),
        (Path(paths.teacher_cache) / "_synthesize" / "scifact", ["ok", "unusable", "ok"]),
    ):
        lines = []
        for status in statuses:
            record = CallRecord(
                key=f"k{len(records)}",
                model="qwen",
                template_hash="h",
                request={"messages": []},
                response_text="yes" if status != "error" else None,
                logprobs=None,
                prompt_tokens=rng.randint(50, 500),
                completion_tokens=1,
                latency_s=round(rng.uniform(0.1, 3), 3),
                status=status,
                error=None if status == "ok" else "failed",
                timestamp="2024-01-01T00:00:00+00:00",
                run_id="r1",
            )
            records.append(record)
            lines.append(record.to_json())
        folder.mkdir(parents=True)
        (folder / "calls-20240101T000000000000Z-1-abcd.jsonl").write_text("\n".join(lines) + '\n{"key": "torn', "utf-8")
    frames["teacher_calls"] = pd.DataFrame([dataclasses.asdict(r) for r in records])
    write_params(root / "params.yaml", tiny_params(root))
    return frames


@pytest.fixture(scope="module")
def readme_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("readme-sql")
    return root, build_readme_fixture(root)


# What each README query must return, computed with pandas from the same tables: (rows, ordered). An oracle is
# found by a phrase only its query has; a README query without one fails test_every_readme_query_has_an_oracle.


def _missed_by_bm25(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    q = t["qrels"]
    judged = q[(q.relevance >= 1) & (q.split == "test")]
    judged = judged.merge(t["queries"][["collection", "query_id"]]).merge(t["corpus"][["collection", "doc_id"]])
    c = t["candidates"]
    found = set(c[c.method == "bm25"][["collection", "query_id", "doc_id"]].itertuples(index=False, name=None))
    keys = judged[["collection", "query_id", "doc_id"]].itertuples(index=False, name=None)
    missed = judged[[key not in found for key in keys]]
    return list(missed.groupby("collection").size().items()), True


def _splade_gains(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    e = t["eval_per_query"]
    e = e[(e.collection == "trec-dl-2019") & (e.measure == "nDCG@10")]
    splade = e[e.run == "shipped-splade-pp-ed"].set_index("query_id").value
    bm25 = e[e.run == "shipped-bm25"].set_index("query_id").value
    texts = t["queries"][t["queries"].collection == "trec-dl-2019"].set_index("query_id").text
    gains = sorted(
        ((qid, texts[qid], round(splade[qid] - bm25[qid], 4)) for qid in splade.index if qid in texts),
        key=lambda row: (-row[2], row[0]),
    )
    return gains[:5], True


def _source_document_ranks(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    rows = []
    for q in t["synthetic_queries"].itertuples():
        r = t["teacher_rankings"]
        hit = r[(r.collection == q.collection) & (r.query_id == q.query_id) & (r.doc_id == q.source_doc_id)]
        rows += [(q.query_id, q.origin, q.text, h.teacher_rank, h.first_stage_rank) for h in hit.itertuples()]
    return sorted(rows, key=lambda row: (-row[3], row[0]))[:5], True


def _bm25_rank_bands(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    c = t["candidates"]
    q = t["qrels"]
    judged = c[c.method == "bm25"].merge(q[q.split == "test"], on=["collection", "query_id", "doc_id"])
    judged = judged.assign(from_rank=(judged["rank"] - 1) // 10 * 10 + 1)
    counts = judged.groupby(["collection", "from_rank", "relevance"]).size()
    return [(*key, n) for key, n in sorted(counts.items())], True


def _explained(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    r = t["teacher_rankings"]
    ranking = r[(r.collection == "scifact") & (r.query_id == "syn-c-1")].sort_values("teacher_rank")
    reasons = t["rationales"]
    direct = {x.doc_id: x for x in reasons[reasons.kind == "direct"].itertuples()}
    comparative = {x.doc_id: x.text for x in reasons[reasons.kind == "comparative"].itertuples()}
    titles = t["corpus"][t["corpus"].collection == "scifact"].set_index("doc_id").title
    return [
        (
            x.teacher_rank,
            x.doc_id,
            titles[x.doc_id],
            direct[x.doc_id].text if x.doc_id in direct else None,
            direct[x.doc_id].answer_sentence if x.doc_id in direct else None,
            comparative.get(x.doc_id),
        )
        for x in ranking.itertuples()
    ], True


def _call_stats(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    stats = (
        t["teacher_calls"]
        .groupby("status")
        .agg(n=("key", "size"), tokens=("prompt_tokens", "sum"), latency=("latency_s", "mean"))
    )
    return [(status, *row) for status, row in zip(stats.index, stats.itertuples(index=False), strict=True)], False


def _docs_per_collection(t: dict[str, pd.DataFrame]) -> tuple[list[tuple], bool]:
    return list(t["corpus"].groupby("collection").size().items()), False


ORACLES = {
    "AS missed": _missed_by_bm25,
    "AS gain": _splade_gains,
    "AS pool_rank": _source_document_ranks,
    "AS from_rank": _bm25_rank_bands,
    "FROM teacher_explained": _explained,
    "FROM teacher_calls": _call_stats,
    "AS docs FROM corpus": _docs_per_collection,
}


def oracle_of(statement: str) -> str:
    matches = [phrase for phrase in ORACLES if phrase in statement]
    assert len(matches) == 1, f"README query without exactly one oracle in tests/test_sql.py ({matches}):\n{statement}"
    return matches[0]


def test_every_readme_query_has_an_oracle() -> None:
    statements = readme_queries()
    assert len(statements) >= len(ORACLES)
    assert sorted(oracle_of(s) for s in statements) == sorted(ORACLES)  # one query each, none left without


def _plain(value: object) -> object:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def assert_same_rows(actual: list[tuple], expected: list[tuple]) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for got, want in zip(actual, expected, strict=True):
        got, want = tuple(map(_plain, got)), tuple(map(_plain, want))
        assert len(got) == len(want), (got, want)
        for a, b in zip(got, want, strict=True):
            if isinstance(b, float):
                assert a == pytest.approx(b, rel=1e-9, abs=1e-9), (got, want)
            else:
                assert a == b, (got, want)


@pytest.mark.parametrize("statement", readme_queries(), ids=oracle_of)
def test_readme_query_gives_what_pandas_computes(readme_tables, statement: str) -> None:
    root, tables = readme_tables
    _, rows = duck.query(paths_of(root), statement, root)
    expected, ordered = ORACLES[oracle_of(statement)](tables)
    assert expected, "the fixture must give every README query rows to check"
    if not ordered:
        rows, expected = sorted(rows), sorted(expected)
    assert_same_rows(rows, expected)


def test_the_fixture_has_the_traps_the_readme_queries_avoid(readme_tables) -> None:
    """Each README query would give another answer on this fixture if it lost a condition it needs."""
    root, t = readme_tables
    q, c, corpus, queries = t["qrels"], t["candidates"], t["corpus"], t["queries"]
    keys = ["collection", "query_id", "doc_id"]
    # query 1: without `method = 'bm25'` it counts what every retriever missed; without the joins, documents outside
    # the corpus and queries outside `queries` too
    missed = dict(_missed_by_bm25(t)[0])
    assert set(missed) == {"scifact", "trec-dl-2019"}
    relevant = q[(q.relevance >= 1) & (q.split == "test")]
    known = relevant.merge(queries[["collection", "query_id"]]).merge(corpus[["collection", "doc_id"]])
    retrieved = set(c[keys].itertuples(index=False, name=None))
    assert sum(key not in retrieved for key in known[keys].itertuples(index=False, name=None)) < sum(missed.values())
    assert not relevant.doc_id.isin(corpus.doc_id).all()
    assert not relevant.query_id.isin(queries.query_id).all()
    # query 4: without `method = 'bm25'` a document counts once per retriever; without the split, twice for q1
    banded = sum(row[-1] for row in _bm25_rank_bands(t)[0])
    assert banded < len(c.merge(q[q.split == "test"], on=keys))
    assert banded < len(c[c.method == "bm25"].merge(q, on=keys))
    # query 3: a synthesized query without a row; the teacher ranked a query of that id in another collection too
    ranked = {row[0] for row in _source_document_ranks(t)[0]}
    assert len(ranked) == 5 and len(t["synthetic_queries"]) == 7
    assert t["teacher_rankings"].query_id.eq("syn-c-1").groupby(t["teacher_rankings"].collection).any().all()
    # the call cache has shards at two depths, and a torn line
    cache = Path(paths_of(root).teacher_cache).resolve()
    shards = [row[0] for row in sql(root, "SELECT DISTINCT shard FROM teacher_calls")]
    assert sorted(Path(s).parent.relative_to(cache).as_posix() for s in shards) == ["_synthesize/scifact", "scifact"]


# --- the teacher_calls view and unknown tables --------------------------------------------------------------


def test_teacher_calls_reads_the_synthesize_cache_alone(tmp_path: Path) -> None:
    """The synthesize stage's shards sit one level deeper (`_synthesize/<name>/`); before any teach stage ran they
    are the only ones."""
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params(tmp_path)))
    folder = Path(params.paths.teacher_cache) / "_synthesize" / "tiny"
    folder.mkdir(parents=True)
    record = CallRecord("k", "m", "t", {}, "q?", None, 7, 2, 0.5, "ok", None, "2024-01-01T00:00:00+00:00", "r")
    (folder / "calls-x.jsonl").write_text(record.to_json() + "\n", encoding="utf-8")
    assert duck.query(params.paths, "SELECT key, prompt_tokens FROM teacher_calls", tmp_path)[1] == [("k", 7)]


def test_an_unknown_table_lists_the_views(tiny_pipeline: Path) -> None:
    views = "corpus, queries, qrels, shipped_runs, candidates, eval_per_query, teacher_calls, all_queries"
    with pytest.raises(duck.UnknownTableError) as raised:
        duck.query(paths_of(tiny_pipeline), "SELECT * FROM candidate", tiny_pipeline)
    message = str(raised.value)
    assert message.startswith("Catalog Error: no table or view named 'candidate'. Did you mean \"candidates\"?")
    assert f"The views: {views}\n" in message
    assert "pg_" not in message and "sqlite_" not in message
    assert "LINE 1: SELECT * FROM candidate" in message  # DuckDB's pointer stays
    assert isinstance(raised.value, duckdb.CatalogException)
    # a table no stage has written yet, and a joined view whose tables are missing
    with pytest.raises(duck.UnknownTableError, match=r"no view 'reranked' yet: no file matches .*reranked\.parquet"):
        duck.query(paths_of(tiny_pipeline), "SELECT * FROM reranked", tiny_pipeline)
    with pytest.raises(duck.UnknownTableError, match="no view 'teacher_explained' yet: it needs teacher_rankings"):
        duck.query(paths_of(tiny_pipeline), "SELECT * FROM teacher_explained", tiny_pipeline)
    # other catalog errors keep DuckDB's message
    with pytest.raises(duckdb.CatalogException, match="nosuchfn") as other:
        duck.query(paths_of(tiny_pipeline), "SELECT nosuchfn(1)", tiny_pipeline)
    assert not isinstance(other.value, duck.UnknownTableError)
