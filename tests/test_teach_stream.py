"""The teach stage streams its rows: each chunk's labels go to spill files beside the tables as soon as they are
labelled and from there into the tables (so the stage's memory does not grow with its queries), and it reads only
its method's candidates within depth. What it writes is what labelling everything at once writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_teach import KEY_ENV, SECRET, bee_responder, reverse_responder, teach_params
from test_teach_fanout import prefect_api, sibling  # noqa: F401 (prefect_api: a fixture)

from conftest import run_teach
from pipeline import schemas
from pipeline.config import parse_params
from pipeline.io import write_table
from pipeline.stages.common import split_queries
from pipeline.teacher import candidates as candidates_module
from pipeline.teacher import fanout
from pipeline.teacher.candidates import load_pool
from pipeline.teacher.chat_server import OpenAIServer
from pipeline.teacher.client import TeacherCallError
from pipeline.teacher.outcome import Provenance, calling_tables
from pipeline.teacher.quality import teacher_quality
from pipeline.teacher.templates import load_template

TABLES = ("teacher_rankings", "teacher_windows", "rationales")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def written(root: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(root / f"data/teacher/tiny/{name}.parquet").drop(columns="run_id") for name in TABLES}


def all_at_once(params: dict) -> tuple[dict[str, pd.DataFrame], dict]:
    """What the stage wrote before it streamed: the whole target labelled in memory (one shard, one chunk, no
    spill folder, every call served from the cache the stage run filled), its tables built from every row at once
    and its quality figures computed from all of them."""
    parsed = parse_params(params)
    target, teacher, paths = parsed.teach["tiny"], parsed.teacher, parsed.paths
    queries = split_queries(paths, "tiny", target.split, "teach.collection.tiny.split")
    pool = load_pool("tiny", target, paths, queries)
    template = load_template(getattr(teacher, teacher.method).template)
    assert teacher.endpoint is not None
    [job] = fanout.shard_jobs(pool, teacher, teacher.endpoint, paths.teacher_cache_dir("tiny"), template.sha256, "ref")
    assert job.spill_dir is None and job.chunk_queries is None
    result = fanout.teach_shard(job)
    assert result.counters.calls == 0 and result.counters.cached > 0 and result.chunks == ()  # the same calls
    provenance = Provenance("tiny", target.candidates, teacher.endpoint.model, template.sha256, teacher.method, "ref")
    tables = calling_tables(result.outcome, pool.candidates, provenance)
    frames = {"teacher_rankings": tables.rankings, "teacher_windows": tables.windows, "rationales": tables.rationales}
    # written as the stage wrote them before it streamed (write_table, all at once), read back as pandas reads them
    folder = Path(params["paths"]["teacher"]).parent / "all-at-once"
    expected = {}
    for name, frame in frames.items():
        path = write_table(frame, schemas.TABLES[name].schema, folder / f"{name}.parquet")
        written_schema = pq.read_schema(Path(params["paths"]["teacher"]) / f"tiny/{name}.parquet")
        # the pandas metadata too (extension dtypes: Int32), and list fields as Parquet names them
        assert written_schema.equals(pq.read_schema(path), check_metadata=True), name
        expected[name] = pd.read_parquet(path).drop(columns="run_id")
    quality = teacher_quality("tiny", paths, target.split, pool, tables.rankings, 1)
    return expected, quality


def assert_all_at_once(params: dict, summary: dict) -> None:
    expected, quality = all_at_once(params)
    root = Path(params["paths"]["teacher"]).parent.parent
    for name, frame in written(root).items():
        pd.testing.assert_frame_equal(frame, expected[name], obj=name)
    assert len(expected["teacher_rankings"]) > 0
    if params["teacher"]["method"] == "listwise":
        assert len(expected["teacher_windows"]) > 0
    assert summary["quality"] == quality and quality["teacher"] is not None
    assert summary["queries"]["labelled"] == expected["teacher_rankings"].query_id.nunique() == 4


def spied_spills(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every chunk the stage spills (checked to be on disk, whole, when it is written)."""
    spilled: list[Path] = []
    spill_chunk: Callable[..., Path] = fanout.spill_chunk

    def recording(*args: object) -> Path:
        chunk = spill_chunk(*args)
        assert all(path.is_file() for path in fanout.spill_paths(chunk).values())
        spilled.append(chunk)
        return chunk

    monkeypatch.setattr(fanout, "spill_chunk", recording)
    return spilled


def assert_no_spill_left(root: Path, spilled: list[Path]) -> None:
    assert spilled and not any(path.exists() for chunk in spilled for path in fanout.spill_paths(chunk).values())
    assert not spilled[0].parent.exists()
    assert not [p for p in (root / "data/teacher/tiny").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["listwise", "pointwise"])
@pytest.mark.parametrize("chunk_queries", [1, 1000])
def test_streamed_tables_equal_the_all_at_once_tables(
    teach_root: Path, monkeypatch: pytest.MonkeyPatch, method: str, chunk_queries: int
) -> None:
    spilled = spied_spills(monkeypatch)
    with OpenAIServer(responder=bee_responder if method == "pointwise" else reverse_responder) as server:
        params = teach_params(teach_root, server.base_url, method=method)
        params["scale"] = {"chunk_queries": chunk_queries}
        summary = run_teach(params)
    # one spilled chunk per query in chunks of one, one for all four in chunks of 1000; none left after
    assert len(spilled) == (4 if chunk_queries == 1 else 1)
    assert_no_spill_left(teach_root, spilled)
    assert pq.ParquetFile(teach_root / "data/teacher/tiny/teacher_rankings.parquet").num_row_groups == len(spilled)
    assert_all_at_once(params, summary)


def test_two_shards_in_chunks_of_one_equal_the_all_at_once_tables(
    teach_root: Path,
    prefect_api: None,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spilled = spied_spills(monkeypatch)
    root = sibling(teach_root, "two-shards")
    with OpenAIServer(responder=reverse_responder) as server:
        params = teach_params(root, server.base_url)
        params["teacher"]["fan_out"] = {"shards": 2, "task_runner": "thread", "workers": 2}
        params["scale"] = {"chunk_queries": 1}
        summary = run_teach(params)
    assert sorted(chunk.name for chunk in spilled) == [f"shard-{s:05d}-chunk-{c:06d}" for s in (0, 1) for c in (0, 1)]
    assert_no_spill_left(root, spilled)
    # the reference runs one shard from the cache the two shards filled
    params["teacher"]["fan_out"] = {"shards": 1}
    assert_all_at_once(params, summary)


def test_no_spill_is_left_after_a_failure(teach_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spilled = spied_spills(monkeypatch)

    def no_caffeine(body: dict) -> str:
        # q4 ("which drinks contain caffeine") is the last query: the three before it are spilled when it fails
        if "caffeine" in body["messages"][-1]["content"]:
            raise ValueError("this server does not rank caffeine")
        return reverse_responder(body)

    with OpenAIServer(responder=no_caffeine) as server:
        params = teach_params(teach_root, server.base_url)
        params["scale"] = {"chunk_queries": 1}
        with pytest.raises(TeacherCallError):
            run_teach(params)
    assert len(spilled) == 3
    assert_no_spill_left(teach_root, spilled)
    assert not (teach_root / "data/teacher/tiny/teacher_rankings.parquet").exists()


def test_the_pool_reads_only_its_method_within_depth(tiny_pipeline: Path, tmp_path: Path, monkeypatch) -> None:
    """A candidates table with another method and ranks deeper than ``depth``: the pool is the filtered one, and
    the reader is given the filters (it never holds the whole table)."""
    (tmp_path / "data/retrieval/tiny").mkdir(parents=True)
    os.symlink(tiny_pipeline / "data/collections", tmp_path / "data/collections")
    shipped = pd.read_parquet(tiny_pipeline / "data/retrieval/tiny/candidates.parquet")
    bm25 = shipped[shipped.method == "bm25"]
    deeper = bm25.assign(rank=bm25["rank"] + 100, doc_id=bm25.doc_id + "-deep")
    other = bm25.assign(method="splade", doc_id=bm25.doc_id + "-splade")
    # interleaved, so that file order and (query_id, rank) order differ
    table = pd.concat([other, deeper, bm25.iloc[::-1]], ignore_index=True)
    write_table(table, schemas.CANDIDATES, tmp_path / "data/retrieval/tiny/candidates.parquet")
    parsed = parse_params(teach_params(tmp_path, "http://127.0.0.1:9/v1"))
    target = parsed.teach["tiny"]
    queries = split_queries(parsed.paths, "tiny", target.split, "teach.collection.tiny.split")

    reads: list[tuple] = []
    read_rows_in = candidates_module.read_rows_in

    def spying(path: Path, where: dict, columns: list[str]) -> pd.DataFrame:
        reads.append((where, columns))
        return read_rows_in(path, where, columns)

    monkeypatch.setattr(candidates_module, "read_rows_in", spying)
    pool = load_pool("tiny", target, parsed.paths, queries, passages=False)
    assert reads[0][0] == {"method": ["bm25"], "rank": range(1, target.depth + 1)}
    assert "score" not in reads[0][1]

    # what the stage used to do: the whole table, filtered in pandas
    selected = set(pool.queries.query_id)
    whole = table[(table.method == "bm25") & (table["rank"] <= target.depth) & table.query_id.isin(selected)]
    expected = whole.sort_values(["query_id", "rank"])[["query_id", "doc_id", "rank"]].reset_index(drop=True)
    # the other method's and the deeper rows were there to leave out
    assert 0 < len(expected) and not expected.doc_id.str.contains("-").any()
    pd.testing.assert_frame_equal(pool.candidates.reset_index(drop=True), expected, check_dtype=False)
