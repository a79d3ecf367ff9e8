"""The teach stage over synthesized queries and their candidate pool (hand-made tables, imported labels or the
local OpenAI-compatible test server; no LLM)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from test_rationales import json_responder

from conftest import run_teach, tiny_params
from pipeline import duck, schemas
from pipeline.config import ConfigError, parse_params
from pipeline.io import write_table
from pipeline.teacher.chat_server import OpenAIServer

KEY_ENV = "DISTILLRANK_TEST_SYNTHETIC_KEY"

# (query_id, text, split, origin, source_doc_id)
QUERIES = [
    ("s1", "bees dance to show where flowers are", "train", "cropped", "d1"),
    ("s2", "magma rises through cracks in the crust", "train", "generated-llm", "d2"),
    ("s3", "caffeine and theanine in leaves", "train", "cropped", "d13"),  # its source is not in its pool
    ("s4", "where glaciers form", "dev", "cropped", "d9"),  # another split
]
# the pool, in the order it is shown to the teacher (rank), plus a per-method run that must be ignored
POOL = {"s1": ["d11", "d1", "d6"], "s2": ["d12", "d3", "d2"], "s3": ["d5", "d8"], "s4": ["d9"]}


@pytest.fixture
def root(tiny_pipeline: Path, tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name in ("collections", "indexes", "retrieval"):
        os.symlink(tiny_pipeline / "data" / name, tmp_path / "data" / name)
    queries = pd.DataFrame(QUERIES, columns=["query_id", "text", "split", "origin", "source_doc_id"])
    spec = schemas.TABLES["synthetic_queries"]
    write_table(queries.assign(collection="tiny"), spec.schema, tmp_path / "data/synthetic/tiny" / spec.filename)
    rows = [(q, d, "pool", rank, 1.0 / rank) for q, docs in POOL.items() for rank, d in enumerate(docs, start=1)]
    rows += [("s1", "d6", "bm25", 1, 9.0), ("s1", "d4", "bm25", 2, 8.0)]
    candidates = pd.DataFrame(rows, columns=["query_id", "doc_id", "method", "rank", "score"]).assign(collection="tiny")
    spec = schemas.TABLES["pool_candidates"]
    write_table(candidates, spec.schema, tmp_path / "data/pool/tiny" / spec.filename)
    return tmp_path


def synthetic_params(root: Path, teacher: dict, **target: object) -> dict:
    params = tiny_params(root)
    params["paths"] |= {"synthetic": str(root / "data/synthetic"), "pool": str(root / "data/pool")}
    params["synthesize"] = {"tiny": {}}
    params["teacher"] = teacher
    params["teach"] = {
        "collection": {},
        "synthetic": {"tiny": {"split": "train", "depth": 3, "candidates": "pool", **target}},
    }
    return params


def rankings(root: Path) -> pd.DataFrame:
    frame = pd.read_parquet(root / "data/teacher/tiny/teacher_rankings.parquet")
    return frame.sort_values(["query_id", "teacher_rank"]).reset_index(drop=True)


def imported_teacher(root: Path) -> dict:
    run_file = root / "teacher.trec"
    lines = ["s1 Q0 d1 1 3 t", "s1 Q0 d11 2 2 t", "s1 Q0 d6 3 1 t", "s2 Q0 d2 1 3 t", "s2 Q0 d12 2 2 t"]
    lines += ["s2 Q0 d3 3 1 t", "s3 Q0 d5 1 2 t", "s3 Q0 d8 2 1 t", "s4 Q0 d9 1 1 t", "q1 Q0 d1 1 1 t"]
    run_file.write_text("\n".join(lines) + "\n")
    return {
        "backend": "embedded",
        "method": "imported",
        "imported": {"files": [{"path": str(run_file), "teacher": "oracle"}]},
    }


def test_synthetic_queries_with_imported_labels_report_the_source_document(root: Path) -> None:
    summary = run_teach(synthetic_params(root, imported_teacher(root)))
    labels = rankings(root)
    assert set(labels.query_id) == {"s1", "s2", "s3"}  # the train split only; no collection query
    # the first-stage rank is the pool's presentation order
    s1 = labels[labels.query_id == "s1"]
    assert s1.doc_id.tolist() == ["d1", "d11", "d6"] and s1.first_stage_rank.tolist() == [2, 1, 3]
    assert summary["queries_from"] == "synthetic" and summary["quality"] == {}
    assert summary["source_doc"] == {
        "queries": 3,
        "source_in_pool": round(2 / 3, 4),
        "teacher_mrr": round(2 / 3, 4),  # s1 and s2 first, s3's source missing
        "first_stage_mrr": round((1 / 2 + 1 / 3) / 3, 4),
        "teacher_at_1": round(2 / 3, 4),
        "first_stage_at_1": 0.0,
    }
    assert pd.read_parquet(root / "data/teacher/tiny/rationales.parquet").empty


def test_depth_max_queries_and_the_dev_split(root: Path) -> None:
    summary = run_teach(synthetic_params(root, imported_teacher(root), split="dev"))
    assert rankings(root).query_id.unique().tolist() == ["s4"]
    assert summary["source_doc"]["teacher_at_1"] == 1.0 == summary["source_doc"]["first_stage_at_1"]

    teacher = {
        "backend": "openai",
        "method": "listwise",
        "endpoint": {"base_url": "", "model": "t", "api_key_env": None, "max_retries": 0},
        "listwise": {"window": 2, "step": 1, "max_words": 20},
    }
    with OpenAIServer() as server:  # the default responder keeps every window's order
        teacher["endpoint"]["base_url"] = server.base_url
        summary = run_teach(synthetic_params(root, teacher, depth=2, max_queries=2, seed=1))
        prompts = [" ".join(m["content"] for m in body["messages"]) for body in server.requests]
    labels = rankings(root)
    assert labels.query_id.nunique() == 2 == summary["queries"]["labelled"]
    assert labels.groupby("query_id").size().max() == 2  # the pool's top 2 only
    assert (labels.teacher_rank == labels.first_stage_rank).all()
    texts = dict((q, t) for q, t, *_ in QUERIES)
    assert all(any(texts[q] in prompt for prompt in prompts) for q in labels.query_id.unique())


def test_rationales_over_synthetic_queries_and_their_text_in_duckdb(root: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with OpenAIServer(responder=json_responder) as server:
        teacher = {
            "backend": "openai",
            "method": "rationales",
            "endpoint": {"base_url": server.base_url, "model": "t", "api_key_env": KEY_ENV, "max_retries": 0},
            "rationales": {"window": 3, "step": 3, "max_words": 20},
        }
        params = synthetic_params(root, teacher)
        summary = run_teach(params)
    assert summary["windows"] == 3 and summary["parse"]["ok"] == 3
    # every window reversed: s1's source d1 stays second, s2's d2 goes first
    assert summary["source_doc"]["teacher_mrr"] == round((1 / 2 + 1) / 3, 4)
    sql = (
        "SELECT query, query_origin, teacher_rank, doc_id, title, direct_reason FROM teacher_explained "
        "WHERE query_id = 's2' ORDER BY teacher_rank"
    )
    columns, rows = duck.query(parse_params(params).paths, sql, root=root)
    explained = pd.DataFrame(rows, columns=columns)
    assert set(explained["query"]) == {"magma rises through cracks in the crust"}
    assert set(explained.query_origin) == {"generated-llm"}
    assert explained.doc_id.tolist() == ["d2", "d3", "d12"] and explained.title.tolist()[0] == "Volcanoes"
    assert explained.direct_reason.notna().all()
    # the collection's queries are in all_queries too
    _, counts = duck.query(parse_params(params).paths, "SELECT origin, count(*) FROM all_queries GROUP BY 1", root)
    assert dict(counts) == {"collection": 8, "cropped": 3, "generated-llm": 1}


def test_missing_tables_and_empty_selections_are_named(root: Path, tmp_path: Path) -> None:
    teacher = imported_teacher(root)
    with pytest.raises(ConfigError, match=r"teach.synthetic.tiny.split: no synthesized queries in split 'test'.*dev"):
        run_teach(synthetic_params(root, teacher, split="test"))
    with pytest.raises(ConfigError, match=r"no 'rrf' candidates .*methods here: \['bm25', 'pool'\]"):
        run_teach(synthetic_params(root, teacher, candidates="rrf"))
    (root / "data/pool/tiny/candidates.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no candidate pool"):
        run_teach(synthetic_params(root, teacher))
    (root / "data/synthetic/tiny/queries.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="run synthesize"):
        run_teach(synthetic_params(root, teacher))
    params = synthetic_params(root, teacher)
    del params["synthesize"]
    with pytest.raises(
        ConfigError, match=r"teach\.synthetic\.tiny: a target on synthesized queries needs synthesize\.tiny"
    ):
        parse_params(params)
