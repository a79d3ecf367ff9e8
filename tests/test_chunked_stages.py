"""Bounded memory in the per-query stages: the chunk writer is atomic, and every chunked stage (retrieve, pool,
build, rerank, evaluate) writes with one query per chunk exactly what it writes with every query in one chunk, and
what the whole-table library functions give (same rows, same order, same scores). The call cache's index holds
locations, not answers."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_evaluate import evaluate_c, tmp_paths, write_collection, write_student, write_teacher
from test_pool import SYNTHETIC
from test_rerank import OverlapStudent
from test_train import make_paths, write_labelled_collection

from pipeline import schemas
from pipeline.config import (
    BuildConfig,
    EvaluateConfig,
    EvaluationCollection,
    PoolConfig,
    RerankConfig,
    RetrieveConfig,
    TeachTarget,
    load_params,
)
from pipeline.io import (
    ParquetChunkWriter,
    read_rows_in,
    read_table,
    write_table,
    write_trec_run,
    write_trec_run_from_parquet,
)
from pipeline.lucene import document_contents
from pipeline.pool import pool_table, source_recall, unique_share
from pipeline.rerank import rerank_run
from pipeline.retrievers import retrieve
from pipeline.stages import build, evaluate, pool, rerank
from pipeline.stages import retrieve as retrieve_stage
from pipeline.teacher.cache import CallRecord, TeacherCache

SCHEMA = pa.schema([pa.field("query_id", pa.string(), nullable=False), pa.field("rank", pa.int32(), nullable=False)])


def chunk(query_id: str, rank: int) -> pd.DataFrame:
    return pd.DataFrame({"query_id": [query_id], "rank": [rank]})


# --- the writers ------------------------------------------------------------------------------------------------


def test_the_chunk_writer_leaves_no_partial_file_when_a_chunk_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError, match="mid-way"), ParquetChunkWriter(path, SCHEMA) as writer:
        writer.write(chunk("q1", 1))
        writer.write(chunk("q2", 1))
        raise RuntimeError("mid-way")
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temporary file left either

    write_table(chunk("old", 1), SCHEMA, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="missing columns"), ParquetChunkWriter(path, SCHEMA) as writer:
        writer.write(chunk("q1", 1))
        writer.write(pd.DataFrame({"query_id": ["q2"]}))  # a bad chunk
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_the_chunk_writer_writes_an_empty_table_and_one_row_group_per_chunk(tmp_path: Path) -> None:
    with ParquetChunkWriter(tmp_path / "empty.parquet", SCHEMA):
        pass
    assert (
        pq.read_table(tmp_path / "empty.parquet").schema.equals(SCHEMA) and read_table(tmp_path / "empty.parquet").empty
    )
    with ParquetChunkWriter(tmp_path / "t.parquet", SCHEMA) as writer:
        for rank in range(1, 4):
            writer.write(pa.table({"rank": pa.array([rank], pa.int32()), "query_id": ["q"]}))  # any column order
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 3
    assert read_table(tmp_path / "t.parquet")["rank"].tolist() == [1, 2, 3] and writer.rows == 3


def test_reading_the_rows_of_some_queries_keeps_the_file_order_and_the_types(tmp_path: Path) -> None:
    # what build's and evaluate's chunks read: the rows pq.read_table(filters=) gives, typed alike (nulls,
    # nullable ints, pandas' string dtype), from a table of several row groups read in batches smaller than them
    spec = schemas.TABLES["teacher_rankings"]
    rows = pd.DataFrame(
        {
            "collection": "c",
            "query_id": [f"q{i % 5}" for i in range(40)],
            "doc_id": [f"d{i}" for i in range(40)],
            "teacher_rank": range(1, 41),
            "score": [None if i % 3 else i / 7 for i in range(40)],
            "first_stage_rank": pd.array([None if i % 4 == 0 else i for i in range(40)], dtype="Int32"),
            "model": ["m1", "m2"] * 20,
            "method": "listwise",
            "first_stage": [None, "bm25"] * 20,
            "template_hash": "h",
            "run_id": "r",
        }
    )
    path = tmp_path / spec.filename
    with ParquetChunkWriter(path, spec.schema) as writer:
        for start in range(0, 40, 16):
            writer.write(rows.iloc[start : start + 16])
    wanted = ["q3", "q1", "absent"]
    expected = pq.read_table(path, filters=[("query_id", "in", wanted)]).to_pandas()
    got = read_rows_in(path, {"query_id": wanted}, batch_rows=3)
    pd.testing.assert_frame_equal(got, expected)
    assert got.query_id.tolist() == [q for q in rows.query_id if q in {"q1", "q3"}]  # file order, not query order
    both = read_rows_in(path, {"query_id": wanted, "model": ["m2"]}, columns=["doc_id", "first_stage_rank"])
    assert both.columns.tolist() == ["doc_id", "first_stage_rank"]
    assert both.doc_id.tolist() == rows.doc_id[rows.query_id.isin(wanted) & (rows.model == "m2")].tolist()
    assert read_rows_in(path, {"query_id": []}).empty
    with pytest.raises(FileNotFoundError, match=r"nothing\.parquet: table not found"):
        read_rows_in(tmp_path / "nothing.parquet", {"query_id": ["q1"]})


def test_a_trec_run_sorted_out_of_core_equals_write_trec_run(tmp_path: Path) -> None:
    # unsorted, with ids whose code-point order is not their file order (upper case, digits, non-ASCII)
    run = pd.DataFrame(
        {
            "query_id": ["b", "é", "B", "10", "2", "b", "é"],
            "doc_id": ["d1", "d2", "d3", "d4", "d5", "d6", "d7"],
            "rank": [2, 1, 1, 1, 1, 1, 2],
            "score": [0.1234565, 2.0, -1.5, 1e-7, 3.0, 0.5, 1.0],
        }
    )
    write_table(run.astype({"rank": "int32"}), pa.schema([*SCHEMA.remove(1), *[
        pa.field("doc_id", pa.string()), pa.field("rank", pa.int32()), pa.field("score", pa.float64())]]),
        tmp_path / "run.parquet")  # fmt: skip
    write_trec_run(run, tmp_path / "memory.trec", tag="t")
    write_trec_run_from_parquet(tmp_path / "run.parquet", tmp_path / "duck.trec", tag="t", batch_rows=2)
    assert (tmp_path / "duck.trec").read_text() == (tmp_path / "memory.trec").read_text()


# --- retrieve and pool ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_paths(tiny_pipeline: Path):
    return load_params(tiny_pipeline / "params.yaml").paths


@pytest.fixture(scope="module")
def reordered_paths(tiny_paths, tmp_path_factory: pytest.TempPathFactory):
    """The session's tiny collection with its queries in an order that is not query_id order (as SciFact's file
    order "1" < "3" < ... < "10" is not), and its documents encoded for the dense method."""
    from pipeline.stages import encode

    root = tmp_path_factory.mktemp("reordered")
    source = tiny_paths.collection_dir("tiny")
    folder = root / "collections" / "tiny"
    folder.mkdir(parents=True)
    for table in source.iterdir():
        if table.name != "queries.parquet":
            (folder / table.name).symlink_to(table)
    queries = read_table(source / "queries.parquet")
    order = [*range(1, len(queries), 2), *range(0, len(queries), 2)]  # q2, q4, ..., q1, q3, ...
    write_table(queries.iloc[order], schemas.QUERIES, folder / "queries.parquet")
    paths = dataclasses.replace(tiny_paths, collections=str(root / "collections"), dense=str(root / "dense"))
    encode.run("tiny", RetrieveConfig().dense, paths)
    return paths


METHODS = ("bm25", "bm25-rm3", "dense", "rrf")


def test_retrieve_one_query_per_chunk_writes_what_all_at_once_does(reordered_paths, tmp_path: Path) -> None:
    tiny_paths = reordered_paths
    cfg = RetrieveConfig(methods=METHODS, depth=5, threads=1, rrf={"methods": ["bm25", "bm25-rm3", "dense"]})
    outputs = {}
    for size in (1, 3, 1000):
        paths = dataclasses.replace(tiny_paths, retrieval=str(tmp_path / f"chunk{size}"))
        summary = retrieve_stage.run("tiny", cfg, paths, chunk_queries=size)
        folder = paths.retrieval_dir("tiny")
        runs = {m: (folder / "runs" / f"{m}.trec").read_bytes() for m in METHODS}
        outputs[size] = (read_table(folder / "candidates.parquet"), runs, summary["candidates"])
    # the reference: every query retrieved at once, concatenated method by method (what the stage wrote before)
    queries = read_table(tiny_paths.collection_dir("tiny") / "queries.parquet")
    runs, _ = retrieve("tiny", METHODS, queries, 5, cfg, tiny_paths)
    reference = pd.concat([r.assign(method=m, collection="tiny") for m, r in runs.items()], ignore_index=True)
    reference = reference[schemas.CANDIDATES.names].astype({"rank": "int32"})
    for size, (candidates, trec, count) in outputs.items():
        pd.testing.assert_frame_equal(candidates, reference, check_dtype=False, check_exact=True, obj=f"chunk {size}")
        assert trec == outputs[1000][1] and count == len(reference), size
    bm25 = outputs[1][0][outputs[1][0].method == "bm25"]
    assert bm25.query_id.drop_duplicates().tolist() == queries.query_id.tolist() != sorted(queries.query_id)


def test_pool_one_query_per_chunk_writes_what_all_at_once_does(reordered_paths, tmp_path: Path) -> None:
    tiny_paths = reordered_paths
    # not in query_id order: s4, s2, s1, s5, s3 (BM25 finds s4, s2, s1: s5 and s3 are paraphrases)
    rows = [SYNTHETIC[i] for i in (3, 1, 0, 4, 2)]
    queries = pd.DataFrame(rows, columns=["query_id", "text", "source_doc_id"]).assign(
        collection="tiny", split="train", origin="cropped"
    )
    paths = dataclasses.replace(tiny_paths, synthetic=str(tmp_path / "synthetic"))
    spec = schemas.TABLES["synthetic_queries"]
    write_table(queries, spec.schema, paths.synthetic_dir("tiny") / spec.filename)
    retrieve_cfg = RetrieveConfig(methods=("bm25",), depth=5, threads=1, rrf={"methods": ["bm25", "bm25-rm3"]})
    outputs = {}
    for order in ("fused", "shuffled"):
        cfg = PoolConfig(methods=METHODS, depth_per_method=4, size=5, order=order, recall_depths=(1, 3))
        for size in (1, 2, 1000):
            mine = dataclasses.replace(paths, pool=str(tmp_path / f"pool-{order}-{size}"))
            summary = pool.run("tiny", cfg, retrieve_cfg, mine, chunk_queries=size)
            summary.pop("seconds")
            outputs[order, size] = (read_table(mine.pool_dir("tiny") / "candidates.parquet"), summary)
        # the reference: pool_table and the metrics over every query at once (what the stage computed before)
        runs, _ = retrieve("tiny", cfg.methods, queries, 4, retrieve_cfg, paths)
        table = pool_table(runs, size=5, k=cfg.rrf_k, order=order, seed=0).assign(collection="tiny")
        recall = source_recall(table, queries[["query_id", "source_doc_id"]], (1, 3), [*runs, "pool"])
        for size in (1, 2, 1000):
            candidates, summary = outputs[order, size]
            pd.testing.assert_frame_equal(
                candidates, table[schemas.CANDIDATES.names], check_dtype=False, check_exact=True, obj=f"{order} {size}"
            )
            assert summary["source_recall"] == recall
            assert summary["unique_docs_per_method_share"] == unique_share(table, runs)
            sizes = table[table.method == "pool"].groupby("query_id").size()
            assert summary["pool_size_mean"] == float(sizes.reindex(queries.query_id, fill_value=0).mean())
    assert not outputs["fused", 1][0].equals(outputs["shuffled", 1][0])


# --- build ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [TeachTarget(), TeachTarget(queries="synthetic")], ids=["collection", "synthetic"])
def test_build_one_query_per_chunk_writes_what_all_at_once_does(tmp_path: Path, target: TeachTarget) -> None:
    paths = make_paths(tmp_path)
    write_labelled_collection(paths, queries=9, per_query=4, lists=("bm25", "tas-b"))
    if target.queries == "synthetic":  # the synthesized queries keep their own dev split
        queries = read_table(paths.collection_dir("t") / "queries.parquet")
        queries["split"] = ["dev" if i % 3 == 0 else "train" for i in range(len(queries))]
        write_table(queries, schemas.QUERIES, paths.synthetic_dir("t") / "queries.parquet")
    cfg = BuildConfig(dev_fraction=0.3, seed=2)
    tables, summaries = {}, {}
    for size in (1, 4, 1000):
        mine = dataclasses.replace(paths, training=str(tmp_path / f"training{size}"))
        summaries[size] = build.run("t", target, cfg, mine, chunk_queries=size)
        summaries[size].pop("output")
        tables[size] = read_table(mine.training_dir("t") / "examples.parquet")
    rankings = read_table(paths.teacher_dir("t") / "teacher_rankings.parquet")
    corpus = read_table(paths.collection_dir("t") / "corpus.parquet")
    queries = build.read_query_texts("t", target, paths)
    reference, _ = build.build_examples("t", rankings, queries, corpus, cfg, target.queries == "synthetic")
    for size in (1, 4, 1000):
        pd.testing.assert_frame_equal(
            tables[size], reference[schemas.TRAINING_EXAMPLES.names], check_dtype=False, obj=f"chunk {size}"
        )
        assert summaries[size] == summaries[1000]
    assert set(reference.split) == {"train", "dev"}


# --- rerank -----------------------------------------------------------------------------------------------------


def test_rerank_one_query_per_chunk_writes_what_all_at_once_does(tiny_paths, tmp_path: Path) -> None:
    evaluation = {"tiny": EvaluationCollection(split="test"), "tiny2": EvaluationCollection(split="train")}
    paths = dataclasses.replace(tiny_paths, reranked=str(tmp_path / "reranked"))
    # a second collection name over the same tables: the table holds every collection's rows, in order
    for name in ("collections", "retrieval"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tiny2").symlink_to(Path(getattr(tiny_paths, name)) / "tiny")
        (tmp_path / name / "tiny").symlink_to(Path(getattr(tiny_paths, name)) / "tiny")
    paths = dataclasses.replace(paths, collections=str(tmp_path / "collections"), retrieval=str(tmp_path / "retrieval"))
    cfg = RerankConfig(depth=3)
    outputs = {}
    for size in (1, 2, 1000):
        mine = dataclasses.replace(paths, reranked=str(tmp_path / f"reranked{size}"))
        summary = rerank.run("o", OverlapStudent(), evaluation, cfg, mine, progress=False, chunk_queries=size,
                             untrained=OverlapStudent())  # fmt: skip
        folder = mine.reranked_dir("o")
        trec = {p.name: p.read_bytes() for p in sorted((folder / "runs").glob("*.trec"))}
        for figures in summary["collections"].values():
            for run in figures.values():
                run.pop("seconds"), run.pop("pairs_per_s")
        outputs[size] = (read_table(folder / "reranked.parquet"), trec, summary)
    # the reference: rerank_run over every query of the split at once
    first = read_table(Path(tiny_paths.retrieval_dir("tiny")) / "candidates.parquet")
    first = first[first.method == "bm25"][["query_id", "doc_id", "rank", "score"]]
    queries = read_table(tiny_paths.collection_dir("tiny") / "queries.parquet")
    corpus = read_table(tiny_paths.collection_dir("tiny") / "corpus.parquet")
    passages = dict(zip(corpus.doc_id, map(document_contents, corpus.title, corpus.text), strict=True))
    texts = dict(zip(queries.query_id, queries.text, strict=True))
    frames = []
    for name, target in evaluation.items():
        ids = set(queries.query_id[queries.split.str.split(",").map(lambda s, t=target.split: t in s)])
        for run_name in ("o", "o:untrained"):
            reranked = rerank_run(OverlapStudent(), texts, passages, first[first.query_id.isin(ids)], 3)
            frames.append(reranked.assign(collection=name, student=run_name))
    reference = pd.concat(frames, ignore_index=True)[schemas.RERANKED.names]
    for size, (table, trec, summary) in outputs.items():
        pd.testing.assert_frame_equal(table, reference, check_dtype=False, obj=f"chunk {size}")
        assert trec == outputs[1000][1] and summary == outputs[1000][2]
    assert sorted(outputs[1][1]) == ["tiny.trec", "tiny.untrained.trec", "tiny2.trec", "tiny2.untrained.trec"]


# --- evaluate ---------------------------------------------------------------------------------------------------


def test_evaluate_one_query_per_chunk_writes_what_all_at_once_does(tmp_path: Path) -> None:
    outputs = {}
    for size in (1, 3, 1000):
        paths = tmp_paths(tmp_path / f"chunk{size}")
        write_collection(paths)
        write_student(paths, "s")
        write_teacher(paths)
        cfg = EvaluateConfig(measures=("nDCG@10", "RR@10"), baseline="bm25")
        summary = evaluate.run({"c": EvaluationCollection(split="test")}, {"c": 1}, cfg, paths, chunk_queries=size)
        per_query = read_table(Path(paths.evaluation) / "per_query.parquet")
        outputs[size] = (summary["metrics"], per_query, (Path(paths.plots) / "per_query_deltas.csv").read_text())
    # the reference figures: test_evaluate's own run of the same tables (the default chunk size)
    reference = evaluate_c(tmp_paths(tmp_path / "chunk1000"))["metrics"]
    for size, (metrics, per_query, deltas) in outputs.items():
        assert json.dumps(metrics, sort_keys=True) == json.dumps(reference, sort_keys=True), size
        pd.testing.assert_frame_equal(per_query, outputs[1000][1])
        assert deltas == outputs[1000][2]
    assert set(outputs[1][1].run) == {"bm25", "s", "teacher:m@bm25"}


# --- the call cache's index -------------------------------------------------------------------------------------


def cache_record(key: str, answer: str) -> CallRecord:
    request = {"messages": [{"role": "user", "content": answer}], "sampling": {}}
    return CallRecord(key, "m", "t", request, answer, None, 1, 1, 0.1, "ok", None, "2026-01-01T00:00:00+00:00", "r")


def index_bytes(folder: Path) -> int:
    tracemalloc.start()
    try:
        cache = TeacherCache(folder)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(cache) == 300
    return held


def test_the_cache_index_holds_locations_not_answers(tmp_path: Path) -> None:
    for name, size in (("small", 10), ("large", 20_000)):
        with TeacherCache(tmp_path / name) as cache:
            for i in range(300):
                cache.put(cache_record(f"{i:064d}", str(i % 10) * size))
    small, large = index_bytes(tmp_path / "small"), index_bytes(tmp_path / "large")
    # 300 answers of 20 KB are 6 MB (24 MB with the prompts' copies) when held; the index is the same either way
    assert large < 1.5 * small and large < 1_000_000
    reopened = TeacherCache(tmp_path / "large")
    assert reopened.get(f"{7:064d}").response_text == "7" * 20_000
    assert sorted(r.key for r in reopened)[:2] == [f"{0:064d}", f"{1:064d}"]
    reopened.put(cache_record("k" * 64, "new"))  # a record of this process's own shard is read back from it
    assert reopened.get("k" * 64).response_text == "new" and reopened.get(f"{299:064d}").ok
