"""Imported teacher files and prompt templates as users write them: a UTF-8 byte order mark is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.teacher.imported import import_rankings
from pipeline.teacher.templates import load_template, load_template_file

BOM = b"\xef\xbb\xbf"
REQUESTS = [
    {"query": {"qid": 7, "text": "q"}, "candidates": [{"docid": "b", "score": 2}, {"docid": "a", "score": 1}]},
    {"query": {"qid": 8, "text": "r"}, "candidates": [{"docid": "c", "score": 5}]},
]


def with_bom(path: Path, text: str) -> Path:
    path.write_bytes(BOM + text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("name", "fmt", "text"),
    [
        ("run.trec", "trec", "7 Q0 b 1 2.0 t\n7 Q0 a 2 1.0 t\n8 Q0 c 1 5.0 t\n"),
        ("out.json", "rank_llm-json", json.dumps(REQUESTS)),
        ("out.jsonl", "rank_llm-json", "\n".join(json.dumps(r) for r in REQUESTS) + "\n"),
    ],
)
def test_a_byte_order_mark_is_accepted_in_imported_labels(tmp_path: Path, name: str, fmt: str, text: str) -> None:
    rankings, _, _ = import_rankings(with_bom(tmp_path / name, text), fmt)  # type: ignore[arg-type]
    rows = rankings[["query_id", "doc_id", "teacher_rank"]].values.tolist()
    assert rows == [["7", "b", 1], ["7", "a", 2], ["8", "c", 1]]


def test_a_byte_order_mark_is_accepted_in_a_template_file(tmp_path: Path) -> None:
    shipped = load_template("rankgpt-listwise")
    assert shipped.path is not None
    copy = with_bom(tmp_path / "mine.json", Path(shipped.path).read_text(encoding="utf-8"))
    template = load_template_file(copy)
    assert (template.name, template.parts) == (shipped.name, shipped.parts)
