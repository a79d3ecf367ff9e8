"""Atomic writes, schema-enforced Parquet tables, TREC runs, and the table declarations."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schemas
from pipeline.config import Paths
from pipeline.io import (
    RunFormatError,
    atomic_path,
    read_table,
    read_trec_run,
    to_arrow,
    write_json,
    write_table,
    write_text,
    write_trec_run,
)


class Boom(RuntimeError):
    pass


def qrels_frame() -> pd.DataFrame:
    # columns deliberately out of schema order, relevance as int64
    return pd.DataFrame(
        {
            "split": ["test", "test", "train"],
            "relevance": [2, 0, 1],
            "doc_id": ["d1", "d2", "d3"],
            "query_id": ["q1", "q1", "q2"],
            "collection": ["tiny"] * 3,
        }
    )


# --- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_path_replaces_the_file_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        tmp.write_text("new", encoding="utf-8")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_atomic_path_failure_keeps_the_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half writ", encoding="utf-8")
        raise Boom("mid-write")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_atomic_path_failure_without_a_previous_file_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise Boom
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    """Not mkstemp's owner-only 0600: tables and metrics are read by other users and tools."""
    previous = os.umask(umask)
    try:
        table = write_table(pd.DataFrame({"x": [1]}), pa.schema([("x", pa.int64())]), tmp_path / "t.parquet")
        metrics = write_json({"a": 1}, tmp_path / "m.json")
        replaced = write_json({"a": 2}, metrics)  # over an existing file too
    finally:
        os.umask(previous)
    for path in (table, metrics, replaced):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_write_table_failure_mid_write_keeps_the_previous_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = schemas.TABLES["qrels"]
    target = tmp_path / spec.filename
    write_table(qrels_frame(), spec.schema, target)
    before = target.read_bytes()

    def failing_write(table: pa.Table, where: Path, **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1 partial")
        raise Boom("disk full")

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(Boom):
        write_table(qrels_frame().iloc[:1], spec.schema, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [spec.filename]
    monkeypatch.undo()
    assert len(read_table(target)) == 3


def test_write_text_and_json(tmp_path: Path) -> None:
    write_text("héllo\n", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    write_json({"b": 1, "a": [1.5]}, tmp_path / "m" / "x.json")
    text = (tmp_path / "m" / "x.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"a": [1.5], "b": 1}
    assert text.index('"a"') < text.index('"b"')  # sorted keys: stable diffs of DVC metrics
    assert text.endswith("\n")


# --- schema enforcement -------------------------------------------------------------------------------------


def test_write_table_follows_the_schema_order_and_types(tmp_path: Path) -> None:
    spec = schemas.TABLES["qrels"]
    path = write_table(qrels_frame(), spec.schema, tmp_path / spec.filename)
    stored = pq.read_schema(path)
    assert stored.names == ["collection", "query_id", "doc_id", "relevance", "split"]
    assert stored.field("relevance").type == pa.int32()
    assert stored.field("query_id").type == pa.string()
    assert not stored.field("doc_id").nullable
    back = read_table(path)
    assert back.relevance.tolist() == [2, 0, 1]
    assert back.query_id.tolist() == ["q1", "q1", "q2"]


def test_write_table_missing_column_is_an_error(tmp_path: Path) -> None:
    spec = schemas.TABLES["qrels"]
    with pytest.raises(ValueError, match=r"missing columns \['relevance'\]"):
        write_table(qrels_frame().drop(columns="relevance"), spec.schema, tmp_path / spec.filename)
    assert not (tmp_path / spec.filename).exists()


def test_extra_columns_are_dropped() -> None:
    frame = qrels_frame().assign(extra=1)
    assert to_arrow(frame, schemas.QRELS).schema.names == schemas.QRELS.names


def test_wrong_type_is_an_error(tmp_path: Path) -> None:
    frame = qrels_frame().assign(relevance=["high", "low", "none"])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):
        write_table(frame, schemas.QRELS, tmp_path / "qrels.parquet")


def test_null_in_a_non_nullable_column_is_an_error(tmp_path: Path) -> None:
    frame = qrels_frame()
    frame["doc_id"] = pd.Series(["d1", None, "d3"], dtype=object)
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        write_table(frame, schemas.QRELS, tmp_path / "qrels.parquet")
    assert not (tmp_path / "qrels.parquet").exists()


def test_write_table_accepts_an_arrow_table_and_casts_it(tmp_path: Path) -> None:
    table = pa.Table.from_pandas(qrels_frame()[schemas.QRELS.names], preserve_index=False)
    assert table.schema.field("relevance").type == pa.int64()
    path = write_table(table, schemas.QRELS, tmp_path / "qrels.parquet")
    assert pq.read_schema(path).field("relevance").type == pa.int32()


def test_read_table_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"candidates.parquet: table not found"):
        read_table(tmp_path / "candidates.parquet")


# --- TREC runs ----------------------------------------------------------------------------------------------


def test_trec_run_round_trip(tmp_path: Path) -> None:
    run = pd.DataFrame(
        {
            "query_id": ["q2", "q1", "q1", "q2", "q1"],
            "doc_id": ["d5", "d3", "d1", "d4", "d2"],
            "rank": [1, 3, 1, 2, 2],
            "score": [7.25, 1.0000004, 3.14159265, 6.5, 2.0],
        }
    )
    path = write_trec_run(run, tmp_path / "runs" / "bm25.trec", tag="bm25")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [
        "q1 Q0 d1 1 3.141593 bm25",
        "q1 Q0 d2 2 2.000000 bm25",
        "q1 Q0 d3 3 1.000000 bm25",
        "q2 Q0 d5 1 7.250000 bm25",
        "q2 Q0 d4 2 6.500000 bm25",
    ]
    back = read_trec_run(path)
    assert back.columns.tolist() == ["query_id", "doc_id", "rank", "score"]
    expected = run.sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert back.query_id.tolist() == expected.query_id.tolist()
    assert back.doc_id.tolist() == expected.doc_id.tolist()
    assert back["rank"].tolist() == expected["rank"].tolist()
    assert back.score.tolist() == pytest.approx(expected.score.round(6).tolist(), abs=1e-9)


def test_read_trec_run_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 2.5 t\n\n  \nq1 Q0 d2 2 1.5 t\n", encoding="utf-8")
    assert read_trec_run(path).doc_id.tolist() == ["d1", "d2"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("q1 Q0 d2 2 1.5", "expected 6 fields"),
        ("q1 Q0 d2 2 1.5 t extra", "expected 6 fields"),
        ("q1 Q0 d2 two 1.5 t", "rank must be an integer"),
        ("q1 Q0 d2 2 high t", "score a number"),
    ],
)
def test_malformed_run_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "run.trec"
    path.write_text(f"q1 Q0 d1 1 2.5 t\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(RunFormatError) as info:
        read_trec_run(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


# --- the table declarations ---------------------------------------------------------------------------------


def test_every_table_uses_ir_column_names() -> None:
    for name, spec in schemas.TABLES.items():
        assert spec.name == name
        columns = spec.schema.names
        assert len(columns) == len(set(columns)), name
        assert columns[0] == "collection", name  # DuckDB unions per-collection files by it
        assert not {"qid", "docid", "query-id", "corpus-id", "_id", "id", "pid"} & set(columns), name
        if name != "corpus":
            assert "query_id" in columns, name
        if name not in {"queries", "synthetic_queries", "eval_per_query", "teacher_windows"}:
            assert "doc_id" in columns, name
        # only values that may truly be unknown are nullable: a listwise teacher gives no score, and an
        # imported label may rank a document that the first stage did not retrieve; a collection's own query
        # has no source document; a teacher may find no answer sentence; a teacher score may be unknown; an
        # imported file may not say which first stage it reranked
        allowed_null = {
            ("teacher_rankings", "score"),
            ("teacher_rankings", "first_stage_rank"),
            ("teacher_rankings", "first_stage"),
            ("queries", "source_doc_id"),
            ("synthetic_queries", "source_doc_id"),
            ("rationales", "answer_sentence"),
            ("rationales", "window_rank"),
            ("training_examples", "teacher_score"),
        }
        for field in spec.schema:
            assert not field.nullable or (name, field.name) in allowed_null, (name, field.name)
        if "rank" in columns:
            assert spec.schema.field("rank").type == pa.int32()
        if "score" in columns:
            assert spec.schema.field("score").type == pa.float64()


def test_table_filenames_are_unique_per_folder_and_folders_exist() -> None:
    per_folder = Counter((spec.folder, spec.filename) for spec in schemas.TABLES.values())
    assert all(count == 1 for count in per_folder.values()), per_folder
    paths = Paths()
    for spec in schemas.TABLES.values():
        assert spec.filename.endswith(".parquet")
        assert spec.scope in {"collection", "global"}
        assert isinstance(getattr(paths, spec.folder), str)
