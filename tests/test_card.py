"""Hub-ready model cards: every kind of tiny random student gets a card whose YAML front matter parses with
pipeline_tag, base_model, license (only where the base model's own card states one), datasets and model-index
results equal to the evaluate stage's held-out figures, a plain comparison with BM25, and a usage snippet that runs
outside the repository with sentence-transformers or plain transformers and scores as the student does."""

from __future__ import annotations

import copy
import doctest
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_students import BUILDERS, tiny_cross_encoder

from conftest import REPO, tiny_params, write_params
from pipeline.config import StudentConfig, parse_params
from pipeline.students import card, export
from pipeline.students.base import STUDENT_FILE
from pipeline.students.outputs import provenance_section, write_student_info
from pipeline.students.registry import load_student

KINDS = ["cross-encoder", "bi-encoder", "twolar-seq2seq", "twolar-causal"]
NAME = "s"
FIGURES = {  # what the evaluate stage wrote for "s": the held-out dev queries of its own collection, another one
    "dev": {"nDCG@10": 0.6652, "RR@10": 0.7879, "R@100": 0.4736},
    "other": {"nDCG@10": 0.5575, "RR@10": 0.5115, "R@100": 0.9253},
}
METRICS = {
    "tiny": {
        "baseline": "bm25",
        "queries": 40,
        # the whole split holds the queries "s" trained on: these figures must not reach the card
        "runs": {"bm25": {"nDCG@10": 0.5}, NAME: {"nDCG@10": 0.9, "RR@10": 0.9, "R@100": 0.9}},
        "vs_bm25": {NAME: {"delta": 0.4, "p_value": 0.001, "wins": 30, "losses": 2, "ties": 8, "queries": 40}},
        "held_out": {
            "target": "tiny",
            "queries": 11,
            "baseline": "bm25",
            "runs": {
                "bm25": {"nDCG@10": 0.5243, "RR@10": 0.7403, "R@100": 0.4736},
                NAME: FIGURES["dev"],
                f"{NAME}:untrained": {"nDCG@10": 0.6647, "RR@10": 0.7909, "R@100": 0.4736},
            },
            "vs_bm25": {
                NAME: {
                    "measure": "nDCG@10",
                    "delta": 0.1409,
                    "p_value": 0.0445,
                    "wins": 7,
                    "losses": 4,
                    "ties": 0,
                    "queries": 11,
                },
            },
        },
    },
    "other": {
        "baseline": "shipped-bm25",
        "queries": 300,
        "runs": {"shipped-bm25": {"nDCG@10": 0.5799, "RR@10": 0.5461, "R@100": 0.9253}, NAME: FIGURES["other"]},
        "vs_shipped-bm25": {
            NAME: {
                "measure": "nDCG@10",
                "delta": -0.0224,
                "p_value": 0.229,
                "wins": 64,
                "losses": 68,
                "ties": 168,
                "queries": 300,
            },
        },
    },
    "students": {NAME: {"best_step": None}},
}


def params_for(root: Path):
    """Params whose student "s" learns from the tiny collection's own test queries (dev queries held out), and is
    also evaluated on another collection."""
    raw = tiny_params(
        root,
        collections={"tiny": {"source": "unused"}, "other": {"source": "unused"}},
        evaluation={"tiny": {"split": "test", "held_out": "tiny"}, "other": {"split": "test"}},
        teach={"collection": {"tiny": {"split": "test"}}, "synthetic": {}},
        rerank={"depth": 100},
    )
    return raw, parse_params(raw)


def test_the_card_module_doctests() -> None:
    assert doctest.testmod(card, optionflags=doctest.ELLIPSIS).failed == 0


def test_held_out_results_take_the_dev_block_of_the_students_own_collection(tmp_path: Path) -> None:
    _, params = params_for(tmp_path)
    results = {r.collection: r for r in card.held_out_results(NAME, "tiny", METRICS, params)}
    assert (
        results["tiny"].scope == "dev" and results["tiny"].queries == 11 and results["tiny"].figures == FIGURES["dev"]
    )
    assert results["other"].scope == "split" and results["other"].queries == 300
    assert results["other"].baseline == "shipped-bm25" and results["other"].comparison["wins"] == 64
    # a checkpoint chosen on the dev queries (keep_best) makes their figure slightly optimistic: the card says so
    chosen = copy.deepcopy(METRICS)
    chosen["students"][NAME]["best_step"] = 4
    assert "keep_best" in card.held_out_results(NAME, "tiny", chosen, params)[0].note
    assert "keep_best" not in results["tiny"].note
    # no held-out block on its own collection: the split's figures include its training queries, so none at all
    without = copy.deepcopy(METRICS)
    del without["tiny"]["held_out"]
    assert [r.collection for r in card.held_out_results(NAME, "tiny", without, params)] == ["other"]
    # a student taught on another collection never saw the tiny queries: the whole split is held out for it
    assert {r.collection: r.scope for r in card.held_out_results(NAME, "elsewhere", without, params)} == {
        "tiny": "split",
        "other": "split",
    }


def save_student(kind: str, root: Path, backbone_name: str | None = None) -> tuple[Path, dict]:
    """A tiny random student of ``kind`` saved as the train stage leaves one (its native folder, the library's card
    for sentence-transformers kinds, distillrank_student.json, the train stage's card), in ``root/s``."""
    from pipeline.students.registry import kind_module

    backbone_dir = root / "backbone"
    BUILDERS.get(kind, tiny_cross_encoder)(backbone_dir)
    if kind == "twolar-seq2seq":  # a local base model whose own card states its licence
        (backbone_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny t5\n", encoding="utf-8")
    cfg = StudentConfig(kind=kind, backbone=str(backbone_dir), labels="tiny", max_length=48, precision="fp32")
    student = kind_module(kind).untrained(cfg, device="cpu")
    folder = root / NAME
    source = backbone_name or str(backbone_dir)
    if kind in ("cross-encoder", "bi-encoder"):
        card.prime_library_card(student.model, NAME, source)
        student.model.save_pretrained(str(folder))
        info = {"kind": kind, "backbone": source, "max_length": 48, "precision": "fp32"}
    else:
        info = {**student.save(folder), "backbone": source}
    info = {**info, "name": NAME, "labels": "tiny", "init_from": None}
    write_student_info(folder, info)
    section = provenance_section(NAME, cfg, {"dev": {"nDCG@10": 0.5}}, {"model": "teacher-llm"})
    card.write_card(folder, info, section, model_ref=NAME, datasets=card.training_datasets("scifact"))
    return folder, info


def snippet_of(text: str) -> str:
    usage = text.split("<!-- distillrank:usage -->", 1)[1].split("<!-- /distillrank:usage -->", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", usage, flags=re.DOTALL)
    return code


def run_snippet(code: str, cwd: Path) -> list[tuple[float, str]]:
    """Run ``code`` as a user would, outside the repository: its own process, offline, no PYTHONPATH."""
    assert not Path(cwd).resolve().is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("\t", 1) for line in done.stdout.strip().splitlines()]
    return [(float(score), passage) for score, passage in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_a_student_exports_with_a_hub_ready_card(kind: str, tmp_path: Path) -> None:
    backbone = "all-MiniLM-L6-v2" if kind == "cross-encoder" else None  # a base with a Hub id and a stated licence
    folder, _ = save_student(kind, tmp_path / "train", backbone)

    # the train stage's card: our keys, no figures yet (and it says so)
    meta, _ = card.split_front_matter((folder / "README.md").read_text(encoding="utf-8"))
    assert meta["pipeline_tag"] == "text-ranking" and "distillrank" in meta["tags"]
    assert meta["datasets"] == ["irds/beir_scifact"]
    assert not any(r["task"]["type"] == "text-ranking" for m in meta.get("model-index", []) for r in m["results"])
    assert "Not measured in this copy" in (folder / "README.md").read_text(encoding="utf-8")

    _, params = params_for(tmp_path)
    results = card.held_out_results(NAME, "tiny", METRICS, params)
    out = tmp_path / "hub" / NAME
    summary = export.export(folder, out, fmt="hub", results=results, rerank={"depth": 100})
    assert summary["results"] == 2 and not (out / "onnx").exists()
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert {"pipeline_tag", "tags", "library_name", "datasets", "model-index"} <= set(meta)
    assert meta["pipeline_tag"] == "text-ranking"
    if kind == "cross-encoder":  # the library's own card, extended
        assert meta["library_name"] == "sentence-transformers" and "sentence-transformers" in meta["tags"]
        assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
        assert "# s\n" in text and "**License:** apache-2.0" in text
    elif kind == "twolar-seq2seq":  # the local base's own card states MIT; a local folder has no Hub id
        assert meta["license"] == "mit" and "base_model" not in meta and "`base_model` is not set" in text
    else:  # nothing states a licence: none is invented, and the card says so
        assert "license" not in meta and "base_model" not in meta and "`license` is not set" in text
    if kind == "bi-encoder":
        assert meta["library_name"] == "sentence-transformers" and "sentence-similarity" in meta["tags"]
    # model-index: the evaluate stage's held-out figures, exactly
    ours = {
        r["dataset"]["name"]: {m["name"]: m["value"] for m in r["metrics"]}
        for entry in meta["model-index"]
        for r in entry["results"]
        if r["task"]["type"] == "text-ranking"
    }
    assert ours == {
        "tiny (11 dev queries held out from training)": FIGURES["dev"],
        "other test (300 queries)": FIGURES["other"],
    }
    types = {m["type"] for entry in meta["model-index"] for r in entry["results"] for m in r["metrics"]}
    assert {"ndcg_at_10", "mrr_at_10", "recall_at_100"} <= types
    # the comparison with BM25, in words and with the query counts
    assert "`s` scores nDCG@10 0.6652 against BM25's 0.5243" in text and "+0.1409" in text
    assert "better on 7 queries, worse on 4" in text and "**better than BM25**" in text
    assert "no significant difference from BM25 (p ≥ 0.05)" in text and "300 queries" in text
    assert "0.9000" not in text  # the split's figures, which include its training queries
    # exporting the export again replaces the figures, never repeats them
    again = tmp_path / "hub2" / NAME
    export.export(out, again, fmt="hub", results=results)
    twice = yaml.safe_load((again / "README.md").read_text(encoding="utf-8").split("---\n", 2)[1])
    assert twice["model-index"] == meta["model-index"] and twice["tags"] == meta["tags"]
    assert (again / "README.md").read_text(encoding="utf-8").count("### Held-out evaluation") == 1

    # the usage snippet, as a user would run it: from the folder that holds the student, without distillrank
    code = snippet_of(text)
    assert "pipeline" not in code and ("CrossEncoder(" in code) == (kind == "cross-encoder")
    assert ("transformers import" in code and "sentence_transformers" not in code) == kind.startswith("twolar")
    printed = run_snippet(code, out.parent)
    expected = load_student(out, device="cpu", precision="fp32").score(card.USAGE_QUERY, list(card.USAGE_PASSAGES))
    assert sorted(p for _, p in printed) == sorted(card.USAGE_PASSAGES)
    got = np.array([dict((p, s) for s, p in printed)[p] for p in card.USAGE_PASSAGES])
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert [s for s, _ in printed] == sorted((s for s, _ in printed), reverse=True)


def test_the_export_command_reads_the_figures_through_params(tmp_path: Path, capsys) -> None:
    folder, _ = save_student("cross-encoder", tmp_path / "train")
    raw, _ = params_for(tmp_path)
    metrics = Path(raw["paths"]["metrics"])
    metrics.mkdir(parents=True)
    (metrics / "eval.json").write_text(json.dumps(METRICS), encoding="utf-8")
    params_file = write_params(tmp_path / "params.yaml", raw)
    out = tmp_path / "published"
    argv = ["--model", str(folder), "--out", str(out), "--format", "hub", "--params", str(params_file)]
    assert export.main([*argv, "--repo-id", "someone/tiny-reranker"]) == 0
    captured = capsys.readouterr()
    assert f"{out}/README.md: model card with 2 held-out result(s)" in captured.out
    # a local backbone folder: no licence and no Hub id, said on the console as well as in the card
    assert "the card has no license" in captured.err and "the card has no base_model" in captured.err
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "CrossEncoder('someone/tiny-reranker')" in text
    assert json.loads((out / STUDENT_FILE).read_text())["name"] == NAME
    # figures the evaluate stage has not written are a warning, not an error: the card says they are missing
    (metrics / "eval.json").unlink()
    assert (
        export.main(
            ["--model", str(folder), "--out", str(tmp_path / "b"), "--format", "hub", "--params", str(params_file)]
        )
        == 0
    )
    assert "no held-out figures in the card" in capsys.readouterr().err
    assert "Not measured in this copy" in (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    # the onnx format still refuses the LM kinds, and names the format that exports them
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / STUDENT_FILE).write_text(json.dumps({"kind": "twolar-seq2seq"}), encoding="utf-8")
    assert export.main(["--model", str(lm), "--out", str(tmp_path / "x")]) == 2
    assert "--format hub exports any kind" in capsys.readouterr().err
    assert export.main([*argv[:4], "--format", "hub", "--quantize", "int8"]) == 2
    assert "--quantize: only with --format onnx" in capsys.readouterr().err
