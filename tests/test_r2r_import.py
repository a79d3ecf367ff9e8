"""Reason-to-Rank teacher files (``format: r2r-jsonl``): read with their quirks counted, prepared as a collection,
imported by the teach stage as rankings *and* rationales, and turned into training examples with a query-level
dev split (tests/fixtures/r2r/teacher.jsonl, written by hand in the format of ../shared/data/r2r-msmarco)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_params
from pipeline.config import parse_params, teacher_for
from pipeline.r2r_jsonl import R2RFileError, read_r2r_jsonl
from pipeline.sources import CollectionError
from pipeline.stages import build, prepare, teach
from pipeline.students.r2r.reasons import answer_sentence_in_passage, reason_targets

FIXTURE = Path(__file__).parent / "fixtures" / "r2r" / "teacher.jsonl"
REAL_FILE = Path(__file__).resolve().parents[2] / "shared/data/r2r-msmarco/r2r-gpt4-msmarco-train.jsonl"


def test_reads_rankings_rationales_and_collection_with_every_quirk_counted() -> None:
    r2r = read_r2r_jsonl(FIXTURE)
    assert r2r.quirks == {
        "placeholder_ids": 2,  # "2" in query 101, "0" in query 103
        "ids_with_several_texts": 1,  # 7777
        "passages_renamed": 4,  # the two placeholders and both passages behind 7777
        "string_scores": 11,  # query 104 has one number
        "no_answer_sentences": 3,
        "passages_without_reasons": 0,
        "duplicate_reasons": 0,
        "empty_reasons": 0,
    }
    # the teacher's permutation of positions, best first, with renamed passages keyed by query and position
    ranked = r2r.rankings.groupby("query_id").doc_id.apply(list).to_dict()
    assert ranked == {
        "101": ["101:2", "5001", "5003"],
        "102": ["5003", "102:3", "5004"],
        "103": ["5004", "103:3", "103:1"],
        "104": ["5001", "5005", "5006"],
    }
    assert r2r.rankings.score.tolist()[:3] == [1.0, 0.0, 0.0]
    # one id with two texts is never merged: each text is a document of its own
    corpus = dict(zip(r2r.corpus.doc_id, r2r.corpus.text, strict=True))
    assert corpus["102:3"] == "Magma pressure builds until the volcano erupts."
    assert corpus["103:1"] == "Etna towers over Catania." and "7777" not in corpus
    # a passage shown for two queries with one id and one text is one document
    assert len(corpus) == 9 and corpus["5001"] == "Bees live in hives and make honey."
    # two rationale rows (direct, comparative) per passage, each with its place in the teacher's order
    assert len(r2r.rationales) == 24 and set(r2r.rationales.kind) == {"direct", "comparative"}
    top = r2r.rationales[(r2r.rationales.query_id == "101") & (r2r.rationales.window_rank == 1)]
    assert set(top.doc_id) == {"101:2"} and top.answer_sentence.iloc[0].startswith("The passage states:")
    assert sorted(top.compared_doc_ids.iloc[0]) == ["5001", "5003"]
    assert r2r.rationales[r2r.rationales.doc_id == "5003"].answer_sentence.isna().any()  # "N/A" is no answer
    assert r2r.sha256 == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()


def test_the_quoted_answer_sentence_is_found_in_its_passage_once_normalised() -> None:
    r2r = read_r2r_jsonl(FIXTURE)
    corpus = dict(zip(r2r.corpus.doc_id, r2r.corpus.text, strict=True))
    answers = r2r.rationales.dropna(subset=["answer_sentence"]).drop_duplicates(["query_id", "doc_id"])
    found = [
        answer_sentence_in_passage(a, corpus[d]) for a, d in zip(answers.answer_sentence, answers.doc_id, strict=True)
    ]
    assert len(found) == 9 and all(found)  # the curly-quoted "The passage states: …" one included
    targets = reason_targets(r2r.rationales, with_answer=True)
    assert targets[("104", "5001")] == (
        "Direct: The passage says bees make honey. Comparative: It answers most directly. "
        "Answer: Bees live in hives and make honey."
    )
    assert "Answer:" not in targets[("101", "5001")]  # "Not applicable": no answer part


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(re_rank_id=[1, 1, 2]), "not a permutation of 1..3"),
        (lambda r: r["reason"]["ranked_passages"][0].update(identifier=9), "reason identifier 9"),
        (lambda r: r.update(sorted_docids=["a", "b"]), "2 sorted_docids for 3 unsorted_docs"),
        (lambda r: r.pop("qid"), "missing field 'qid'"),
        (lambda r: r.update(scores=["high", "0", "0"]), "score 'high' is not a number"),
        (lambda r: r.update(query=" "), "empty text"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, change, message: str) -> None:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    change(record)
    lines[1] = json.dumps(record)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(R2RFileError, match=rf"bad\.jsonl:2: .*{message}"):
        read_r2r_jsonl(path)


def test_malformed_json_and_repeated_queries_are_refused(tmp_path: Path) -> None:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n" + lines[1][:40] + "\n", encoding="utf-8")
    with pytest.raises(R2RFileError, match=r"broken\.jsonl:2: malformed JSON"):
        read_r2r_jsonl(broken)
    twice = tmp_path / "twice.jsonl"
    twice.write_text("\ufeff" + lines[0] + "\n" + lines[0] + "\n", encoding="utf-8")  # a BOM is accepted
    with pytest.raises(R2RFileError, match=r"twice\.jsonl:2: query 101 again \(first on line 1\)"):
        read_r2r_jsonl(twice)


def r2r_params(root: Path) -> dict:
    target = {
        "split": "train",
        "depth": 5,
        "candidates": "shipped-union",
        "method": "imported",
        "imported": {
            "files": [{"path": str(FIXTURE), "teacher": "gpt-4", "first_stage": "bm25", "format": "r2r-jsonl"}]
        },
    }
    params = tiny_params(root)
    params.update(
        collections={"r2r": {"source": str(FIXTURE), "format": "r2r-jsonl"}},
        train={"collection": "r2r", "split": "train"},
        evaluation={},
        teach={"collection": {"r2r": target}, "synthetic": {}},
        build={"dev_fraction": 0.25, "seed": 0},
    )
    return params


def test_prepare_teach_and_build_from_one_r2r_file(tmp_path: Path) -> None:
    params = parse_params(r2r_params(tmp_path))
    paths = params.paths
    summary = prepare.run("r2r", params.collection("r2r"), params.prepare, paths)
    assert summary["documents"] == 9 and summary["queries"] == {"train": 4} and summary["qrels"] == {}
    shipped = pd.read_parquet(paths.collection_dir("r2r") / "shipped_runs.parquet")
    assert shipped[shipped.query_id == "103"].sort_values("rank").doc_id.tolist() == ["103:1", "5004", "103:3"]

    target = params.teach["r2r"]
    taught = teach.run("r2r", target, teacher_for(params.teacher, target), paths)
    assert taught["files"][0]["quirks"]["passages_renamed"] == 4 and taught["files"][0]["rationales"] == 24
    labels = pd.read_parquet(paths.teacher_dir("r2r") / "teacher_rankings.parquet")
    digest = hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    assert len(labels) == 12 and set(labels.model) == {"gpt-4"} and set(labels.template_hash) == {digest}
    q101 = labels[labels.query_id == "101"].sort_values("teacher_rank")
    assert q101.doc_id.tolist() == ["101:2", "5001", "5003"] and q101.first_stage_rank.tolist() == [2, 1, 3]
    rationales = pd.read_parquet(paths.teacher_dir("r2r") / "rationales.parquet")
    assert len(rationales) == 24 and set(rationales.model) == {"gpt-4"} and set(rationales.template_hash) == {digest}
    assert set(rationales.collection) == {"r2r"} and rationales.run_id.nunique() == 1

    built = build.run("r2r", target, params.build, paths)
    examples = pd.read_parquet(paths.training_dir("r2r") / "examples.parquet")
    assert built["queries"] == {"dev": 1, "train": 3}
    splits = examples.groupby("query_id").split.agg(set)
    assert all(len(s) == 1 for s in splits)  # a query is dev or train, never both
    assert examples[examples.doc_id == "102:3"].passage.iloc[0] == "Magma pressure builds until the volcano erupts."


def test_a_collection_file_with_an_error_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    from pipeline.sources import load_r2r_file

    with pytest.raises(CollectionError, match=r"bad\.jsonl:1: malformed JSON"):
        load_r2r_file(bad, "r2r")


@pytest.mark.skipif(not REAL_FILE.is_file(), reason="../shared/data/r2r-msmarco is not beside the repository")
def test_the_real_gpt4_file_reads_with_its_documented_quirks() -> None:
    r2r = read_r2r_jsonl(REAL_FILE)
    assert len(r2r.queries) == 100 and len(r2r.rankings) == 500 and len(r2r.rationales) == 1000
    assert r2r.quirks["placeholder_ids"] == 2 and r2r.quirks["ids_with_several_texts"] == 1
    assert r2r.quirks["string_scores"] == 500 and len(r2r.corpus) == 500
    assert not any(d == "7886063" for d in r2r.corpus.doc_id)  # its two texts are two documents
