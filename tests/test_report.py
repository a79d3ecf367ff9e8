"""``distillrank report``: the tables a user reads at the end of ``make run``, from ``metrics/eval.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.report import main, render


def comparison(delta: float, p: float, wins: int, losses: int, queries: int) -> dict:
    return {"delta": delta, "p_value": p, "wins": wins, "losses": losses, "queries": queries, "measure": "nDCG@10"}


METRICS = {
    "trec-dl-2019": {
        "baseline": "shipped-bm25",
        "queries": 43,
        "runs": {
            "teacher:gpt@bm25": {"nDCG@10": 0.68},
            "student": {"nDCG@10": 0.66},
            "student:untrained": {"nDCG@10": 0.64},
            "shipped-bm25": {"nDCG@10": 0.5058},
        },
        "vs_shipped-bm25": {
            "student": comparison(0.1553, 0.00001, 34, 9, 43),
            "student:untrained": comparison(0.1372, 0.0001, 30, 13, 43),
            "teacher:gpt@bm25": comparison(0.1741, 0.00001, 36, 2, 43),
        },
        "held_out": {
            "target": "trec-dl-2019",
            "queries": 11,
            "baseline": "shipped-bm25",
            "runs": {"shipped-bm25": {"nDCG@10": 0.5243}, "student": {"nDCG@10": 0.6652}},
            "vs_shipped-bm25": {"student": comparison(0.1409, 0.0445, 7, 4, 11)},
        },
    },
    "students": {
        "student": {
            "kind": "bi-encoder",
            "labels": "trec-dl-2019",
            "dev": {"nDCG@10": 0.32, "kendall_tau": 0.31},
            "steps": 48,
            "seconds": 289.7,
        },
    },
}


def test_report_shows_in_sample_and_held_out_tables_with_students_next_to_their_start() -> None:
    text = render(METRICS, "nDCG@10", "bm25", {"student"})
    lines = text.splitlines()
    assert "trec-dl-2019: all 43 queries (students trained on 32 of them: in sample)" in lines
    held_header = next(i for i, line in enumerate(lines) if "11 held-out queries" in line)
    held_rows = {line.split()[0]: line.split() for line in lines[held_header + 3 : held_header + 5]}
    assert held_rows["student"][1:5] == ["0.6652", "+0.1409", "0.0445", "7/4"]
    assert held_rows["shipped-bm25"][1:] == ["0.5243"]  # the baseline: no delta against itself
    # first stage, then the untrained start right before its student, then the teacher's lists
    order = [line.split()[0] for line in lines[3:7]]
    assert order == ["shipped-bm25", "student:untrained", "student", "teacher:gpt@bm25"]
    fidelity = next(line for line in lines if line.startswith("student ") and "bi-encoder" in line)
    assert fidelity.split() == ["student", "bi-encoder", "trec-dl-2019", "0.3200", "0.3100", "48", "290"]


def test_report_without_an_evaluation_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = Path("params.yaml").read_text(encoding="utf-8").replace("metrics: metrics", f"metrics: {tmp_path}")
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "no evaluation yet (run `dvc repro` or `make run`)" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text(json.dumps(METRICS), encoding="utf-8")
    assert main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert "held-out queries" in capsys.readouterr().out
