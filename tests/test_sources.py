"""Collection loading: the BEIR folder reader, its errors (file and line), unknown qrels, and ir_datasets."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import FIXTURE, tiny_params
from pipeline import schemas
from pipeline.config import IrDatasetsExport, Paths, PrepareConfig, parse_params
from pipeline.sources import (
    CollectionError,
    LoadedCollection,
    load_beir_folder,
    load_ir_datasets,
    write_beir_folder,
)
from pipeline.stages import fetch, prepare

TEST_QUERIES = ["q1", "q2", "q3", "q4"]
TRAIN_QUERIES = ["q5", "q6", "q7", "q8"]


def fixture_records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / name).read_text(encoding="utf-8").splitlines() if line]


def replace_line(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def append_lines(path: Path, *texts: str) -> int:
    """Append lines; return the line number of the first one appended."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines, *texts]) + "\n", encoding="utf-8")
    return len(lines) + 1


def load_error(folder: Path, **kwargs: object) -> str:
    with pytest.raises(CollectionError) as info:
        load_beir_folder(folder, "tiny", **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- the BEIR loader on the fixture -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> LoadedCollection:
    return load_beir_folder(FIXTURE, "tiny")


def test_fixture_counts(tiny: LoadedCollection) -> None:
    assert tiny.name == "tiny"
    assert len(tiny.corpus) == 15
    assert len(tiny.queries) == 8
    assert len(tiny.qrels) == 8 + 5
    assert tiny.qrels.split.value_counts().to_dict() == {"test": 8, "train": 5}
    assert tiny.unknown_qrels == 0
    for frame in (tiny.corpus, tiny.queries, tiny.qrels, tiny.shipped_runs):
        assert set(frame.collection) == {"tiny"}


def test_fixture_splits_come_from_the_qrels(tiny: LoadedCollection) -> None:
    split = dict(zip(tiny.queries.query_id, tiny.queries.split, strict=True))
    assert split == {**dict.fromkeys(TEST_QUERIES, "test"), **dict.fromkeys(TRAIN_QUERIES, "train")}
    assert set(tiny.queries.origin) == {"collection"}


def test_fixture_titles_and_texts(tiny: LoadedCollection) -> None:
    records = fixture_records("corpus.jsonl")
    assert tiny.corpus.doc_id.tolist() == [r["_id"] for r in records]
    d1 = tiny.corpus.set_index("doc_id").loc["d1"]
    assert d1.title == "Honey bees"
    assert d1.text.startswith("Honey bees communicate the location of flowers")
    q3 = tiny.queries.set_index("query_id").loc["q3"]
    assert q3.text == "why does the moon cause ocean tides"


def test_fixture_qrels_grades(tiny: LoadedCollection) -> None:
    grades = {(q, d): r for q, d, r in zip(tiny.qrels.query_id, tiny.qrels.doc_id, tiny.qrels.relevance, strict=True)}
    assert grades[("q1", "d1")] == 2
    assert grades[("q2", "d12")] == 0
    assert grades[("q7", "d11")] == 1


def test_fixture_shipped_run(tiny: LoadedCollection) -> None:
    runs = tiny.shipped_runs
    assert set(runs.run) == {"weak"}
    assert len(runs) == 12
    first = runs.iloc[0]
    assert (first.query_id, first.doc_id, first["rank"], first.score) == ("q1", "d6", 1, 9.0)


def test_fixture_tables_match_the_schemas(tiny: LoadedCollection) -> None:
    from pipeline.io import to_arrow

    for table, frame in {
        "corpus": tiny.corpus,
        "queries": tiny.queries,
        "qrels": tiny.qrels,
        "shipped_runs": tiny.shipped_runs,
    }.items():
        assert to_arrow(frame, schemas.TABLES[table].schema).num_rows == len(frame)


def test_numeric_ids_and_missing_title_are_accepted(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    append_lines(folder / "corpus.jsonl", json.dumps({"_id": 42, "text": "numeric id, no title"}))
    loaded = load_beir_folder(folder, "tiny")
    row = loaded.corpus.set_index("doc_id").loc["42"]
    assert (row.title, row.text) == ("", "numeric id, no title")


def test_a_byte_order_mark_at_the_start_of_a_jsonl_file_is_accepted(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    for name in ("corpus.jsonl", "queries.jsonl"):
        path = folder / name
        path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
    loaded = load_beir_folder(folder, "tiny")
    plain = load_beir_folder(FIXTURE, "tiny")
    assert loaded.corpus.doc_id.tolist() == plain.corpus.doc_id.tolist()
    assert loaded.queries.query_id.tolist() == plain.queries.query_id.tolist()


def test_a_byte_order_mark_is_accepted_in_every_file_of_a_collection(bad_collection: Callable[[], Path]) -> None:
    """Qrels TSVs with their header line and shipped TREC runs too (a BOM'd header once read as a grade 'score')."""
    folder = bad_collection()
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", *(folder / "qrels").glob("*.tsv")]
    files += list((folder / "runs").glob("*.trec"))
    assert (folder / "qrels/test.tsv").read_text(encoding="utf-8").startswith("query-id")  # the header case
    for path in files:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    loaded, plain = load_beir_folder(folder, "tiny"), load_beir_folder(FIXTURE, "tiny")
    for table in ("corpus", "queries", "qrels", "shipped_runs"):
        pd.testing.assert_frame_equal(getattr(loaded, table), getattr(plain, table))


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_a_query_with_an_empty_text_names_its_line(bad_collection: Callable[[], Path], text: str) -> None:
    folder = bad_collection()
    replace_line(folder / "queries.jsonl", 3, json.dumps({"_id": "q3", "text": text}))
    message = load_error(folder)
    assert_names(message, folder / "queries.jsonl", 3)
    assert "query 'q3' has an empty text" in message


def test_qrels_without_header_and_four_column_trec_qrels(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    (folder / "qrels" / "test.tsv").write_text("q1\td1\t2\nq2 0 d2 1\n", encoding="utf-8")
    loaded = load_beir_folder(folder, "tiny")
    test = loaded.qrels[loaded.qrels.split == "test"]
    assert list(zip(test.query_id, test.doc_id, test.relevance, strict=True)) == [("q1", "d1", 2), ("q2", "d2", 1)]


# --- bad input: CollectionError naming the file and the line ------------------------------------------------


def assert_names(message: str, path: Path, line_no: int | None = None) -> None:
    where = f"{path}:{line_no}:" if line_no is not None else f"{path}:"
    assert message.startswith(where), f"{message!r} does not start with {where!r}"


def test_malformed_jsonl_line(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "corpus.jsonl", 4, '{"_id": "d4", "title": "Black holes", "text": "unterminated')
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl", 4)
    assert "malformed JSON" in message


def test_jsonl_line_that_is_not_an_object(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "queries.jsonl", 2, '["q2", "text"]')
    message = load_error(folder)
    assert_names(message, folder / "queries.jsonl", 2)
    assert "expected a JSON object" in message


def test_missing_id(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "corpus.jsonl", 7, json.dumps({"title": "No id", "text": "a document without an id"}))
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl", 7)
    assert "missing required field '_id'" in message


def test_missing_text(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "corpus.jsonl", 2, json.dumps({"_id": "d2", "title": "Volcanoes"}))
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl", 2)
    assert "missing required field 'text'" in message


def test_missing_query_text(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "queries.jsonl", 5, json.dumps({"_id": "q5"}))
    message = load_error(folder)
    assert_names(message, folder / "queries.jsonl", 5)
    assert "'text'" in message


def test_text_of_the_wrong_type(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "corpus.jsonl", 3, json.dumps({"_id": "d3", "text": ["not", "a", "string"]}))
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl", 3)
    assert "must be a string" in message


def test_duplicate_id(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    line_no = append_lines(folder / "corpus.jsonl", json.dumps({"_id": "d3", "title": "", "text": "again"}))
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl", line_no)
    assert "duplicate _id 'd3' (first on line 3)" in message


def test_duplicate_query_id(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    line_no = append_lines(folder / "queries.jsonl", json.dumps({"_id": "q1", "text": "again"}))
    message = load_error(folder)
    assert_names(message, folder / "queries.jsonl", line_no)
    assert "duplicate _id 'q1'" in message


def test_qrels_non_integer_score(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    line_no = append_lines(folder / "qrels" / "train.tsv", "q5\td3\thigh")
    message = load_error(folder)
    assert_names(message, folder / "qrels" / "train.tsv", line_no)
    assert "relevance score must be an integer, got 'high'" in message


def test_qrels_wrong_number_of_fields(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "qrels" / "test.tsv", 3, "q1\td11")
    message = load_error(folder)
    assert_names(message, folder / "qrels" / "test.tsv", 3)
    assert "expected 3 tab-separated fields" in message
    assert "got 2" in message


def test_malformed_run_line(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "runs" / "weak.trec", 5, "q2 Q0 d9 2 8.0000")
    message = load_error(folder)
    assert_names(message, folder / "runs" / "weak.trec", 5)
    assert "expected 6 fields" in message


def test_run_line_with_a_non_numeric_score(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    replace_line(folder / "runs" / "weak.trec", 2, "q1 Q0 d11 2 high weak")
    message = load_error(folder)
    assert_names(message, folder / "runs" / "weak.trec", 2)


def test_empty_corpus(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    (folder / "corpus.jsonl").write_text("\n\n", encoding="utf-8")
    message = load_error(folder)
    assert_names(message, folder / "corpus.jsonl")
    assert "empty" in message


def test_missing_folder(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message
    assert "not found" in message


def test_missing_queries_file(bad_collection: Callable[[], Path]) -> None:
    folder = bad_collection()
    (folder / "queries.jsonl").unlink()
    message = load_error(folder)
    assert_names(message, folder / "queries.jsonl")
    assert "not found" in message


# --- qrels naming unknown queries or documents --------------------------------------------------------------


@pytest.fixture
def unknown_qrels_collection(bad_collection: Callable[[], Path]) -> Path:
    folder = bad_collection()
    append_lines(folder / "qrels" / "test.tsv", "q1\td99\t1", "q99\td1\t2")
    return folder


def test_unknown_qrels_warn_keeps_the_rows_and_reports(
    unknown_qrels_collection: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        loaded = load_beir_folder(unknown_qrels_collection, "tiny", on_unknown_qrels="warn")
    assert loaded.unknown_qrels == 2
    assert len(loaded.qrels) == 15
    assert {("q1", "d99"), ("q99", "d1")} <= set(zip(loaded.qrels.query_id, loaded.qrels.doc_id, strict=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 15 qrels rows name unknown queries or documents" in warnings[0]
    assert "1 rows with an unknown query id, 1 with an unknown doc id" in warnings[0]
    assert "kept" in warnings[0]
    # the unknown query does not become a query
    assert "q99" not in set(loaded.queries.query_id)


def test_unknown_qrels_drop_removes_the_rows(unknown_qrels_collection: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        loaded = load_beir_folder(unknown_qrels_collection, "tiny", on_unknown_qrels="drop")
    assert loaded.unknown_qrels == 2
    assert len(loaded.qrels) == 13
    assert "d99" not in set(loaded.qrels.doc_id)
    assert "q99" not in set(loaded.qrels.query_id)
    assert loaded.qrels.index.tolist() == list(range(13))
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_unknown_qrels_fail(unknown_qrels_collection: Path) -> None:
    message = load_error(unknown_qrels_collection, on_unknown_qrels="fail")
    assert "2 of 15 qrels rows" in message
    assert "prepare.on_unknown_qrels" in message


def test_no_unknown_qrels_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        loaded = load_beir_folder(FIXTURE, "tiny", on_unknown_qrels="fail")
    assert loaded.unknown_qrels == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- the prepare stage writes nothing from a bad collection ------------------------------------------------


def table_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_prepare_on_a_broken_collection_writes_no_table(bad_collection: Callable[[], Path], tmp_path: Path) -> None:
    folder = bad_collection()
    replace_line(folder / "corpus.jsonl", 9, "{not json")
    params = parse_params(tiny_params(tmp_path / "root", source=folder))
    with pytest.raises(CollectionError, match=re.escape(f"{folder / 'corpus.jsonl'}:9:")):
        prepare.run("tiny", params.collections["tiny"], params.prepare, params.paths)
    assert table_files(params.paths.collection_dir("tiny")) == {}


def test_prepare_failure_leaves_previous_tables_untouched(bad_collection: Callable[[], Path], tmp_path: Path) -> None:
    folder = bad_collection()
    params = parse_params(tiny_params(tmp_path / "root", source=folder))
    out = params.paths.collection_dir("tiny")
    summary = prepare.run("tiny", params.collections["tiny"], params.prepare, params.paths)
    assert summary["documents"] == 15
    assert summary["queries"] == {"test": 4, "train": 4}
    assert summary["shipped_runs"] == ["weak"]
    before = table_files(out)
    assert sorted(before) == sorted(schemas.TABLES[t].filename for t in ("corpus", "queries", "qrels", "shipped_runs"))
    # break the last file the loader reads, so the corpus, queries and qrels were read fine before it fails
    append_lines(folder / "corpus.jsonl", json.dumps({"_id": "d16", "text": "a new document"}))
    replace_line(folder / "runs" / "weak.trec", 12, "q4 Q0 d5 three 7.0 weak")
    with pytest.raises(CollectionError, match=re.escape("weak.trec:12:")):
        prepare.run("tiny", params.collections["tiny"], params.prepare, params.paths)
    assert table_files(out) == before  # same files, same bytes, no temporary files left beside them


# --- ir_datasets (offline: a dataset registered from local files) ------------------------------------------

IRDS_TEST = "distillrank-test/tiny/test"
IRDS_TRAIN = "distillrank-test/tiny/train"


@pytest.fixture(scope="session")
def irds_ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two ir_datasets ids over the fixture's files (TSV documents and queries, TREC qrels), sharing a corpus:
    the test id has q1-q4 and the test qrels, the train id q5-q8 and the train qrels."""
    import ir_datasets

    if IRDS_TEST in ir_datasets.registry:
        return IRDS_TEST, IRDS_TRAIN
    folder = tmp_path_factory.mktemp("irds")
    docs = folder / "docs.tsv"
    docs.write_text("".join(f"{r['_id']}\t{r['text']}\n" for r in fixture_records("corpus.jsonl")), encoding="utf-8")
    queries = fixture_records("queries.jsonl")
    for split, wanted, dataset_id in (("test", TEST_QUERIES, IRDS_TEST), ("train", TRAIN_QUERIES, IRDS_TRAIN)):
        queries_tsv = folder / f"queries-{split}.tsv"
        queries_tsv.write_text(
            "".join(f"{q['_id']}\t{q['text']}\n" for q in queries if q["_id"] in wanted), encoding="utf-8"
        )
        qrels_trec = folder / f"qrels-{split}.txt"
        rows = (FIXTURE / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        qrels_trec.write_text(
            "".join(f"{q} 0 {d} {r}\n" for q, d, r in (row.split("\t") for row in rows)), encoding="utf-8"
        )
        dataset = ir_datasets.create_dataset(
            docs_tsv=str(docs), queries_tsv=str(queries_tsv), qrels_trec=str(qrels_trec)
        )
        ir_datasets.registry.register(dataset_id, dataset)
    return IRDS_TEST, IRDS_TRAIN


def test_load_ir_datasets_gives_the_expected_tables(irds_ids: tuple[str, str]) -> None:
    loaded = load_ir_datasets(list(irds_ids), "x")
    beir = load_beir_folder(FIXTURE, "x")
    assert loaded.name == "x"
    assert loaded.unknown_qrels == 0
    # TSV documents have no title: the title is empty and the text is the document's text
    assert loaded.corpus.doc_id.tolist() == beir.corpus.doc_id.tolist()
    assert set(loaded.corpus.title) == {""}
    assert loaded.corpus.text.tolist() == beir.corpus.text.tolist()
    assert set(loaded.corpus.collection) == {"x"}
    # queries from both ids, their split from the id's last component
    assert loaded.queries.query_id.tolist() == TEST_QUERIES + TRAIN_QUERIES
    assert loaded.queries.split.tolist() == ["test"] * 4 + ["train"] * 4
    assert set(loaded.queries.origin) == {"collection"}
    assert loaded.queries.text.tolist() == beir.queries.text.tolist()
    columns = ["query_id", "doc_id", "relevance", "split"]
    pd.testing.assert_frame_equal(
        loaded.qrels[columns].reset_index(drop=True), beir.qrels[columns].reset_index(drop=True), check_dtype=False
    )
    assert loaded.shipped_runs.empty


def test_load_ir_datasets_single_id(irds_ids: tuple[str, str]) -> None:
    loaded = load_ir_datasets([irds_ids[1]], "x")
    assert len(loaded.corpus) == 15
    assert loaded.queries.query_id.tolist() == TRAIN_QUERIES
    assert set(loaded.qrels.split) == {"train"}
    assert len(loaded.qrels) == 5


def test_fetch_writes_a_beir_folder_that_reads_back_identically(irds_ids: tuple[str, str], tmp_path: Path) -> None:
    paths = Paths(sources=str(tmp_path / "sources"))
    summary = fetch.run("x", IrDatasetsExport(ids=irds_ids), PrepareConfig(), paths)
    folder = tmp_path / "sources" / "x"
    assert summary["folder"] == str(folder)
    assert (summary["documents"], summary["queries"], summary["qrels"]) == (15, 8, 13)
    assert sorted(p.name for p in (folder / "qrels").iterdir()) == ["test.tsv", "train.tsv"]
    assert [p.name for p in tmp_path.joinpath("sources").iterdir()] == ["x"]  # no temporary folder left
    exported = load_ir_datasets(list(irds_ids), "x")
    read_back = load_beir_folder(folder, "x")
    for table in ("corpus", "queries", "qrels"):
        mine, theirs = getattr(exported, table), getattr(read_back, table)
        sort_by = ["split", "query_id", "doc_id"] if table == "qrels" else list(mine.columns[:1])
        pd.testing.assert_frame_equal(
            mine.sort_values(sort_by).reset_index(drop=True),
            theirs[mine.columns].sort_values(sort_by).reset_index(drop=True),
            check_dtype=False,
        )
    # fetching again replaces the folder
    fetch.run("x", IrDatasetsExport(ids=(irds_ids[0],)), PrepareConfig(), paths)
    assert sorted(p.name for p in (folder / "qrels").iterdir()) == ["test.tsv"]


def test_write_beir_folder_round_trip_keeps_titles_and_unicode(tmp_path: Path) -> None:
    original = load_beir_folder(FIXTURE, "tiny")
    corpus = original.corpus.copy()
    corpus.loc[0, "text"] = 'Unicode — "quoted" café ✓'
    collection = LoadedCollection(
        name="tiny",
        corpus=corpus,
        queries=original.queries,
        qrels=original.qrels,
        shipped_runs=original.shipped_runs,
        unknown_qrels=0,
    )
    read_back = load_beir_folder(write_beir_folder(collection, tmp_path / "out"), "tiny")
    pd.testing.assert_frame_equal(read_back.corpus, corpus, check_dtype=False)
    pd.testing.assert_frame_equal(read_back.queries, original.queries, check_dtype=False)


def test_unknown_ir_datasets_id() -> None:
    with pytest.raises(CollectionError, match="unknown dataset id 'distillrank-test/nosuch'"):
        load_ir_datasets(["distillrank-test/nosuch"], "x")


def test_fetch_with_an_unknown_id_writes_nothing(tmp_path: Path) -> None:
    paths = Paths(sources=str(tmp_path / "sources"))
    with pytest.raises(CollectionError, match="unknown dataset id"):
        fetch.run("x", IrDatasetsExport(ids=("distillrank-test/nosuch",)), PrepareConfig(), paths)
    assert not (tmp_path / "sources" / "x").exists()


def test_no_ids() -> None:
    with pytest.raises(CollectionError, match="at least one"):
        load_ir_datasets([], "x")
