"""TWOLAR's candidate pools (pipeline.pool and the pool stage): fusion, deduplication, size cap, provenance, fused
vs shuffled order, source recall, and the stage's table and metrics on the tiny fixture collection."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import schemas
from pipeline.config import load_params, parse_params
from pipeline.io import read_table, write_table
from pipeline.pool import POOL_METHOD, build_pool, pool_table, shuffle_pool, source_recall, unique_share
from pipeline.stages import encode
from pipeline.stages import pool as pool_stage


def run_of(query_id: str, doc_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query_id": query_id,
            "doc_id": doc_ids,
            "rank": range(1, len(doc_ids) + 1),
            "score": [float(len(doc_ids) - i) for i in range(len(doc_ids))],
        }
    )


# Two methods over two queries, overlapping: a = [d1 d2 d3 d4], b = [d3 d1 d5 d6] for q1.
RUNS = {
    "a": pd.concat([run_of("q1", ["d1", "d2", "d3", "d4"]), run_of("q2", ["x1", "x2"])], ignore_index=True),
    "b": pd.concat([run_of("q1", ["d3", "d1", "d5", "d6"]), run_of("q2", ["x2", "x3"])], ignore_index=True),
}


def pool_rows(table: pd.DataFrame, query_id: str) -> pd.DataFrame:
    return table[(table.method == POOL_METHOD) & (table.query_id == query_id)].sort_values("rank")


def test_pool_deduplicates_in_fusion_order() -> None:
    table = pool_table(RUNS, size=10, k=60, order="fused", seed=0)
    q1 = pool_rows(table, "q1")
    # d1: 1/61 + 1/62; d3: 1/63 + 1/61; d2: 1/62; d5: 1/63; d4: 1/64; d6: 1/64
    assert q1.doc_id.tolist() == ["d1", "d3", "d2", "d5", "d4", "d6"]
    assert q1["rank"].tolist() == list(range(1, 7))
    assert q1.score.tolist() == pytest.approx([1 / 61 + 1 / 62, 1 / 61 + 1 / 63, 1 / 62, 1 / 63, 1 / 64, 1 / 64])
    assert not q1.doc_id.duplicated().any()
    assert pool_rows(table, "q2").doc_id.tolist() == ["x2", "x1", "x3"]


def test_pool_size_caps_each_query() -> None:
    table = pool_table(RUNS, size=3, k=60, order="fused", seed=0)
    assert pool_rows(table, "q1").doc_id.tolist() == ["d1", "d3", "d2"]
    assert len(pool_rows(table, "q2")) == 3
    assert table[table.method == POOL_METHOD].groupby("query_id").size().max() == 3


def test_every_method_row_is_kept_and_every_pool_doc_has_provenance() -> None:
    table = pool_table(RUNS, size=3, k=60, order="fused", seed=0)
    methods = table[table.method != POOL_METHOD]
    assert len(methods) == len(RUNS["a"]) + len(RUNS["b"])  # provenance of every (query, doc, method, rank, score)
    pd.testing.assert_frame_equal(
        methods[methods.method == "b"][["query_id", "doc_id", "rank", "score"]].reset_index(drop=True), RUNS["b"]
    )
    found = set(zip(methods.query_id, methods.doc_id, strict=True))
    pool = table[table.method == POOL_METHOD]
    assert all(pair in found for pair in zip(pool.query_id, pool.doc_id, strict=True))


def test_shuffled_is_a_seeded_permutation_of_fused() -> None:
    many = {
        name: pd.concat([run.assign(query_id=run.query_id + f"-{i}") for i in range(20)]) for name, run in RUNS.items()
    }
    fused = pool_table(many, size=6, k=60, order="fused", seed=0)
    shuffled = pool_table(many, size=6, k=60, order="shuffled", seed=0)
    again = pool_table(many, size=6, k=60, order="shuffled", seed=0)
    other_seed = pool_table(many, size=6, k=60, order="shuffled", seed=1)
    pd.testing.assert_frame_equal(shuffled, again)  # deterministic
    f = fused[fused.method == POOL_METHOD].set_index(["query_id", "doc_id"]).sort_index()
    s = shuffled[shuffled.method == POOL_METHOD].set_index(["query_id", "doc_id"]).sort_index()
    assert f.index.equals(s.index)  # the same documents per query
    assert s.score.tolist() == f.score.tolist()  # keep their fused score
    for query_id, rows in s.groupby(level="query_id"):
        assert sorted(rows["rank"]) == list(range(1, len(rows) + 1)), query_id
    assert not (s["rank"] == f["rank"]).all()  # 40 pools of 3 or 6: some order changed
    o = other_seed[other_seed.method == POOL_METHOD].set_index(["query_id", "doc_id"]).sort_index()
    assert not (o["rank"] == s["rank"]).all()
    # method rows are untouched by the order
    pd.testing.assert_frame_equal(fused[fused.method != POOL_METHOD], shuffled[shuffled.method != POOL_METHOD])


def test_adding_queries_does_not_reshuffle_the_others() -> None:
    fused = build_pool(pd.concat([run.assign(method=m) for m, run in RUNS.items()]), size=6, k=60)
    alone = shuffle_pool(fused[fused.query_id == "q1"], seed=7)
    together = shuffle_pool(pd.concat([fused, fused.assign(query_id="q0")]), seed=7)
    mine = together[together.query_id == "q1"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), mine)


def test_unknown_order_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"pool\.order"):
        pool_table(RUNS, size=3, k=60, order="random", seed=0)


def test_source_recall_by_hand() -> None:
    """q1's source d3 is at rank 3 in a, 1 in b, 2 in the pool; q2's source x3 is only b's rank 2 (pool rank 3);
    q3 (source z) was retrieved by nothing; q4 has no source document and is left out."""
    table = pool_table(RUNS, size=10, k=60, order="fused", seed=0)
    sources = pd.DataFrame({"query_id": ["q1", "q2", "q3", "q4"], "source_doc_id": ["d3", "x3", "z", None]})
    recall = source_recall(table, sources, [1, 2, 3], ["a", "b", POOL_METHOD])
    assert recall == {
        "a": {"@1": 0.0, "@2": 0.0, "@3": pytest.approx(1 / 3)},
        "b": {"@1": pytest.approx(1 / 3), "@2": pytest.approx(2 / 3), "@3": pytest.approx(2 / 3)},
        POOL_METHOD: {"@1": 0.0, "@2": pytest.approx(1 / 3), "@3": pytest.approx(2 / 3)},
    }


def test_unique_share_by_hand() -> None:
    table = pool_table(RUNS, size=10, k=60, order="fused", seed=0)
    # a: d2 d4 x1 unique of 6 rows; b: d5 d6 x3 unique of 6 rows
    assert unique_share(table, ["a", "b"]) == {"a": 0.5, "b": 0.5}


# --- the stage on the tiny collection ---------------------------------------------------------------------------

SYNTHETIC = [  # (query_id, text, source_doc_id): cropped sentences and paraphrases of tiny documents
    ("s1", "communicate the location of flowers through a waggle dance", "d1"),
    ("s2", "magma rises through cracks in the crust", "d2"),
    ("s3", "a shot that protects people from getting sick", "d8"),
    ("s4", "compacts into dense ice over centuries", "d9"),
    ("s5", "which drinks keep you awake", "d5"),
]


@pytest.fixture(scope="module")
def stage_root(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A params file over the session's tiny pipeline (its collection, index and retrieval) with this module's own
    dense, synthetic, pool and metrics folders; the synthesized queries written as the synthesize stage would."""
    import yaml

    root = tmp_path_factory.mktemp("pool")
    raw = yaml.safe_load((tiny_pipeline / "params.yaml").read_text(encoding="utf-8"))
    raw["paths"].update(
        dense=str(root / "dense"), synthetic=str(root / "synthetic"), pool=str(root / "pool"), metrics=str(root / "m")
    )
    raw["synthesize"] = {"tiny": {"cropped": 4, "generated": 1}}
    raw["pool"] = {"methods": ["bm25", "bm25-rm3", "dense", "rrf"], "depth_per_method": 5, "size": 6}
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = parse_params(raw)
    encode.run("tiny", params.retrieve.dense, params.paths)
    queries = pd.DataFrame(SYNTHETIC, columns=["query_id", "text", "source_doc_id"]).assign(
        collection="tiny", split="train", origin="cropped"
    )
    spec = schemas.TABLES["synthetic_queries"]
    write_table(queries, spec.schema, params.paths.synthetic_dir("tiny") / spec.filename)
    assert pool_stage.main(["tiny", "--params", str(root / "params.yaml")]) == 0
    return root


def test_pool_stage_table(stage_root: Path) -> None:
    paths = load_params(stage_root / "params.yaml").paths
    path = paths.pool_dir("tiny") / schemas.TABLES["pool_candidates"].filename
    assert pq.read_schema(path).equals(schemas.CANDIDATES, check_metadata=False)
    table = read_table(path)
    assert set(table.method) == {"bm25", "bm25-rm3", "dense", "rrf", POOL_METHOD}
    assert set(table.collection) == {"tiny"}
    pool = table[table.method == POOL_METHOD]
    assert set(pool.query_id) == {q for q, _, _ in SYNTHETIC}
    assert pool.groupby("query_id").size().max() == 6  # dense alone fills 5, the others add more: capped at 6
    assert not pool.duplicated(["query_id", "doc_id"]).any()
    methods = table[table.method != POOL_METHOD]
    assert methods.groupby(["query_id", "method"]).size().max() == 5
    found = set(zip(methods.query_id, methods.doc_id, strict=True))
    assert all(pair in found for pair in zip(pool.query_id, pool.doc_id, strict=True))
    # fused order: scores non-increasing in the order shown
    for _, rows in pool.groupby("query_id"):
        assert rows.sort_values("rank").score.is_monotonic_decreasing


def test_pool_stage_metrics(stage_root: Path, tiny_pipeline: Path) -> None:
    paths = load_params(stage_root / "params.yaml").paths
    metrics = json.loads(pool_stage.metrics_path(paths, "tiny").read_text(encoding="utf-8"))
    synthetic = metrics["synthetic"]["tiny"]
    assert synthetic["queries"] == 5
    recall = synthetic["source_recall"]
    assert set(recall) == {"bm25", "bm25-rm3", "dense", "rrf", POOL_METHOD}
    assert all(set(values) == {"@1", "@10", "@30"} for values in recall.values())
    # s3 and s5 share no term with their source document: BM25 finds neither, dense finds both (s5's "drinks that
    # keep you awake" puts tea, d13, just above coffee, d5); the pool has every source document
    assert recall["bm25"] == {"@1": 0.6, "@10": 0.6, "@30": 0.6}
    assert recall["dense"] == {"@1": 0.8, "@10": 1.0, "@30": 1.0}
    assert recall[POOL_METHOD]["@10"] == 1.0
    assert synthetic["pool_size_mean"] == pytest.approx(
        read_table(paths.pool_dir("tiny") / "candidates.parquet")
        .query("method == 'pool'")
        .groupby("query_id")
        .size()
        .mean()
    )
    assert set(synthetic["unique_docs_per_method_share"]) == {"bm25", "bm25-rm3", "dense", "rrf"}
    # the evaluation part: the retrieve stage's candidates (the session pipeline ran bm25) on tiny's test qrels
    evaluate_metrics = Path(load_params(tiny_pipeline / "params.yaml").paths.metrics) / "eval.json"
    bm25 = json.loads(evaluate_metrics.read_text(encoding="utf-8"))["tiny"]["runs"]["bm25"]
    assert metrics["evaluation"]["tiny"]["bm25"]["nDCG@10"] == pytest.approx(bm25["nDCG@10"], abs=1e-4)
    assert metrics["evaluation"]["tiny"]["bm25"]["R@100"] == pytest.approx(bm25["R@100"], abs=1e-4)
    assert set(metrics["evaluation"]["tiny"]["bm25"]) == {"nDCG@10", "R@100"}


def test_pool_stage_without_synthetic_queries_names_the_file(stage_root: Path, tmp_path: Path, capsys) -> None:
    import yaml

    raw = yaml.safe_load((stage_root / "params.yaml").read_text(encoding="utf-8"))
    raw["paths"]["synthetic"] = str(tmp_path / "none")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert pool_stage.main(["tiny", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "queries.parquet: table not found" in capsys.readouterr().err


def test_shuffled_order_in_the_stage(stage_root: Path, tmp_path: Path) -> None:
    params = load_params(stage_root / "params.yaml")
    paths = dataclasses.replace(params.paths, pool=str(tmp_path / "pool"))
    fused = read_table(params.paths.pool_dir("tiny") / "candidates.parquet")
    pool_stage.run("tiny", dataclasses.replace(params.pool, order="shuffled"), params.retrieve, paths)
    shuffled = read_table(paths.pool_dir("tiny") / "candidates.parquet")
    key = ["query_id", "doc_id"]
    f = fused[fused.method == POOL_METHOD].sort_values(key).reset_index(drop=True)
    s = shuffled[shuffled.method == POOL_METHOD].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(f.drop(columns="rank"), s.drop(columns="rank"))
    assert not (f["rank"] == s["rank"]).all()
