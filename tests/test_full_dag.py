"""The whole default DAG shape with `dvc repro` in a throw-away copy of the repository, on the fixture collection:
prepare → index → encode → retrieve → synthesize → pool → teach → build → train → rerank → evaluate.

The teacher is the local OpenAI-compatible test server (InPars query generation and pointwise yes/no
log-probabilities); the dense retriever is the real MiniLM; the student is a tiny random BERT cross-encoder.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_repo_copy, run_cli, save_tiny_cross_encoder, tiny_params
from pipeline.teacher.chat_server import OpenAIServer

pytestmark = pytest.mark.slow

STUDENT = "tiny-ce"
METHODS = ["bm25", "bm25-rm3", "dense", "rrf"]
STAGES = {
    "prepare@tiny",
    "index@tiny",
    "encode@tiny",
    "retrieve@tiny",
    "synthesize@tiny",
    "pool@tiny",
    "teach-synthetic@tiny",
    "build-synthetic@tiny",
    f"train@{STUDENT}",
    f"rerank@{STUDENT}",
    "evaluate",
}
GENERATION_MARK = "\nRelevant query:"  # the inpars-query template's user part ends so
POINTWISE_MARK = "Does the passage answer the query?"  # the pointwise-yes-no template's question
WORD = re.compile(r"[a-z]{4,}")  # content-ish words: short ones (the, of, in) would make everything overlap


def teacher_responder(body: dict) -> str:
    """A teacher that makes sense for both prompts the DAG sends.

    InPars generation: a query made of the document's first words. Pointwise: "Yes" when the query and the
    passage share a content word, else "No" (the server derives the top log-probabilities from the answer:
    Yes -0.1 / No -2.5, or the other way round).
    """
    last = str(body["messages"][-1]["content"])
    if GENERATION_MARK in last:
        document = last.removeprefix("Document: ").split(GENERATION_MARK)[0]
        return f"what about {' '.join(document.split()[:5]).lower()}"
    if POINTWISE_MARK in last:
        query = last.split("\nPassage:")[0].removeprefix("Query:")
        passage = last.split("\nPassage:")[1].split(POINTWISE_MARK)[0]
        shared = set(WORD.findall(query.lower())) & set(WORD.findall(passage.lower()))
        return "Yes" if shared else "No"
    raise AssertionError(f"the DAG sent a prompt this test does not know: {last[:200]!r}")


def tiny_backbone(folder: Path) -> Path:
    """A random 2-layer BERT with a one-logit head and MiniLM's tokenizer, saved as a backbone folder."""
    return save_tiny_cross_encoder(folder)


def full_params(base_url: str, backbone: Path) -> dict:
    params = tiny_params(
        # per_collection and rrf spelled out as params.yaml does: dvc.yaml's encode stage names those keys, and DVC
        # refuses a stage whose named params are missing from params.yaml (pipeline/config.py's defaults aside)
        retrieve={
            "methods": METHODS,
            "dense": {"max_length": 64},
            "per_collection": {},
            "rrf": {"k": 60, "methods": ["bm25", "bm25-rm3", "dense"]},
        },
        teacher={
            "backend": "openai",
            "method": "pointwise",
            "endpoint": {"base_url": base_url, "model": "dag-teacher", "api_key_env": None, "max_retries": 0},
        },
    )
    params["synthesize"] = {
        "tiny": {
            "cropped": 6,
            "generated": 2,
            "generator": "llm",
            "template": "inpars-query",
            "min_words": 3,
            "max_words": 10,
            "dev_fraction": 0.3,
        }
    }
    params["pool"] = {"methods": METHODS, "depth_per_method": 5, "size": 5}
    params["teach"] = {
        "collection": {},
        "synthetic": {"tiny": {"split": "train,dev", "depth": 5, "candidates": "pool"}},
    }
    params["build"] = {}
    params["students"] = {
        STUDENT: {
            "kind": "cross-encoder",
            "backbone": str(backbone),
            "labels": "tiny",
            "max_length": 64,
            "max_steps": 4,
            "eval_every": 2,
        }
    }
    params["rerank"] = {"depth": 10, "first_stage": "bm25"}
    params["evaluation"] = {"tiny": {"split": "test"}}
    return params


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@dataclass
class Reproduced:
    repo: Path
    server: OpenAIServer
    stdout: str
    seconds: float
    requests: int  # what the server had received when the first `dvc repro` ended


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reproduced]:
    root = tmp_path_factory.mktemp("full-dag")
    backbone = tiny_backbone(root / "backbone")
    with OpenAIServer(responder=teacher_responder) as server:
        repo = make_repo_copy(root / "repo", full_params(server.base_url, backbone))
        started = time.perf_counter()
        result = run_cli(["dvc", "repro"], repo, timeout=900)
        seconds = time.perf_counter() - started
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        yield Reproduced(repo, server, result.stdout, seconds, server.total)


def test_every_stage_runs(reproduced: Reproduced) -> None:
    print(f"first dvc repro: {reproduced.seconds:.1f} s, {reproduced.requests} teacher requests")
    assert ran_stages(reproduced.stdout) == STAGES
    lock = yaml.safe_load((reproduced.repo / "dvc.lock").read_text())
    assert STAGES <= set(lock["stages"])


def test_retrieval_and_synthesis_outputs(reproduced: Reproduced) -> None:
    repo = reproduced.repo
    candidates = pd.read_parquet(repo / "data/retrieval/tiny/candidates.parquet")
    assert set(candidates.method) == set(METHODS)
    for method in METHODS:
        assert (repo / f"data/retrieval/tiny/runs/{method}.trec").is_file()

    synthetic = pd.read_parquet(repo / "data/synthetic/tiny/queries.parquet")
    assert set(synthetic.origin) == {"cropped", "generated-llm"}
    assert (synthetic.origin == "cropped").sum() == 6 and (synthetic.origin == "generated-llm").sum() == 2
    assert set(synthetic.split) == {"train", "dev"}
    generated = synthetic[synthetic.origin == "generated-llm"]
    assert generated.text.str.startswith("what about ").all()
    synth_metrics = json.loads((repo / "metrics/synthesize/tiny.json").read_text())
    assert synth_metrics["generation"]["calls"]["paid"] == 2

    pool = pd.read_parquet(repo / "data/pool/tiny/candidates.parquet")
    assert set(pool.method) == {*METHODS, "pool"}
    assert set(pool.query_id) == set(synthetic.query_id)
    assert pool[pool.method == "pool"].groupby("query_id").size().max() <= 5
    retrieval = json.loads((repo / "metrics/retrieval/tiny.json").read_text())
    recall = retrieval["synthetic"]["tiny"]["source_recall"]
    # the source document's recall, per method and in the pool (pool.recall_depths defaults: 1, 10, 30)
    assert set(recall) == {*METHODS, "pool"}
    assert all(set(depths) == {"@1", "@10", "@30"} for depths in recall.values())
    # a span cropped from a document, or its first words, finds that document by BM25 in a 15-document corpus
    assert recall["bm25"]["@10"] >= 0.75 and recall["pool"]["@10"] >= recall["bm25"]["@10"] - 1e-9
    assert set(retrieval["evaluation"]["tiny"]) == set(METHODS)


def test_teacher_and_training_examples(reproduced: Reproduced) -> None:
    repo = reproduced.repo
    synthetic = pd.read_parquet(repo / "data/synthetic/tiny/queries.parquet")
    labels = pd.read_parquet(repo / "data/teacher/tiny/teacher_rankings.parquet")
    assert set(labels.query_id) == set(synthetic.query_id)  # train and dev both labelled
    assert set(labels.method) == {"pointwise"} and set(labels.model) == {"dag-teacher"}
    assert labels.groupby("query_id").size().max() <= 5
    # the server's log-probabilities: Yes -0.1 / No -2.5 → ±2.4; both answers occur (the teacher discriminates)
    assert set(labels.score.round(6)) == {2.4, -2.4}
    ordered = labels.sort_values(["query_id", "teacher_rank"])
    assert (ordered.groupby("query_id").score.diff().dropna() <= 0).all()  # the ranking follows the score
    assert (ordered.groupby("query_id").teacher_rank.min() == 1).all()
    teacher_metrics = json.loads((repo / "metrics/teacher/tiny.json").read_text())
    assert teacher_metrics["queries_from"] == "synthetic"
    assert teacher_metrics["calls"]["paid"] == len(labels)  # one call per (query, candidate)
    assert teacher_metrics["no_answer_token"] == 0
    # every synthesized query shares content words with its own source document: the teacher says Yes to it
    assert teacher_metrics["source_doc"]["source_in_pool"] == 1.0
    assert teacher_metrics["source_doc"]["teacher_mrr"] >= 0.5
    # every request the server got: the 2 generations and the pointwise calls, nothing else
    assert reproduced.requests == 2 + len(labels)

    examples = pd.read_parquet(repo / "data/training/tiny/examples.parquet")
    assert set(examples.split) == {"train", "dev"}
    dev = set(synthetic.query_id[synthetic.split == "dev"])
    assert set(examples.query_id[examples.split == "dev"]) == dev


def test_student_rerank_and_evaluation(reproduced: Reproduced) -> None:
    repo = reproduced.repo
    student = repo / "data/students" / STUDENT
    info = json.loads((student / "distillrank_student.json").read_text())
    assert info["kind"] == "cross-encoder"
    assert (student / "README.md").read_text().strip()

    student_metrics = json.loads((repo / f"metrics/students/{STUDENT}.json").read_text())
    assert student_metrics["dev_queries"] >= 1 and student_metrics["steps"] == 4
    dev = student_metrics["dev"]  # fidelity to the teacher on the dev split
    assert set(dev) == {"nDCG@10", "nDCG@5", "kendall_tau", "groups"} and 0.0 < dev["nDCG@10"] <= 1.0
    assert 0.0 < dev["nDCG@5"] <= 1.0
    assert (repo / f"plots/training/{STUDENT}.csv").is_file()

    reranked = pd.read_parquet(repo / f"data/reranked/{STUDENT}/reranked.parquet")
    assert set(reranked.query_id) == {"q1", "q2", "q3", "q4"}  # the test split
    assert reranked.groupby("query_id").size().max() <= 10
    assert (repo / f"data/reranked/{STUDENT}/runs/tiny.trec").is_file()

    metrics = json.loads((repo / "metrics/eval.json").read_text())
    runs = metrics["tiny"]["runs"]
    assert {*METHODS, STUDENT, f"{STUDENT}:untrained", "shipped-weak"} <= set(runs)
    # the teacher labelled synthesized queries only: it has no run on the test split
    assert "teacher" not in runs and "teacher_queries" not in metrics["tiny"]
    assert 0.0 <= runs[STUDENT]["nDCG@10"] <= 1.0
    assert STUDENT in metrics["tiny"]["vs_bm25"]
    assert STUDENT in metrics["students"]


def test_student_loads_in_sentence_transformers(reproduced: Reproduced) -> None:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(reproduced.repo / "data/students" / STUDENT), device="cpu")
    scores = model.predict([("how do bees dance", "Honey bees dance"), ("volcano lava", "Honey bees dance")])
    assert len(scores) == 2 and all(float(s) == float(s) for s in scores)  # finite, not NaN


def test_second_repro_runs_nothing_and_calls_nobody(reproduced: Reproduced) -> None:
    result = run_cli(["dvc", "repro"], reproduced.repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ran_stages(result.stdout) == set()
    assert "Data and pipelines are up to date" in result.stdout
    assert reproduced.server.total == reproduced.requests
