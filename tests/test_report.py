"""``distillrank report`` and the headline metrics: the tables a user reads at the end of ``make run`` (from
``metrics/eval.json``), and what ``dvc metrics show`` prints (``metrics/headline/``), on made-up figures and on the
repository's committed ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tool_env
from pipeline import headline
from pipeline.config import load_params
from pipeline.report import WIDTH, dvc_remotes, main, outputs_text, read_teachers, render, tables

DVC = str(Path(sys.executable).parent / "dvc")


def comparison(delta: float, p: float, wins: int, losses: int, queries: int, ties: int = 0) -> dict:
    return {
        "delta": delta,
        "p_value": p,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "queries": queries,
        "measure": "nDCG@10",
    }


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
            "teacher:gpt@bm25": comparison(0.1741, 0.00001, 36, 2, 43, ties=5),
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
            "backbone": "all-MiniLM-L6-v2",
            "labels": "trec-dl-2019",
            "loss": "kl",
            "dev": {"nDCG@10": 0.32, "nDCG@5": 0.27, "kendall_tau": 0.31},
            "steps": 48,
            "seconds": 289.7,
        },
    },
}


@pytest.fixture(scope="module")
def committed() -> dict:
    """The repository's committed evaluation, its params, and the teachers' figures."""
    params = load_params(REPO / "params.yaml")
    metrics_dir = REPO / params.paths.metrics
    return {
        "params": params,
        "metrics_dir": metrics_dir,
        "metrics": json.loads((metrics_dir / "eval.json").read_text(encoding="utf-8")),
        "teachers": read_teachers(metrics_dir),
    }


def test_report_shows_in_sample_and_held_out_tables_with_students_next_to_their_start() -> None:
    text = render(METRICS, ["nDCG@10"], {"student"})
    lines = text.splitlines()
    assert lines[0] == "trec-dl-2019: all 43 queries (against shipped-bm25, students trained on 32: in sample)"
    held_header = next(i for i, line in enumerate(lines) if "11 held-out queries, never trained on" in line)
    held_rows = {line.split()[0]: line.split() for line in lines[held_header + 3 : held_header + 5]}
    assert held_rows["student"][1:] == ["0.6652", "+0.1409", "0.0445", "7/4/0"]
    assert held_rows["shipped-bm25"][1:] == ["0.5243", "baseline", "-", "-"]  # no delta against itself
    # first stage, then the untrained start right before its student, then the teacher's lists
    order = [line.split()[0] for line in lines[3:7]]
    assert order == ["shipped-bm25", "student:untrained", "student", "teacher:gpt@bm25"]
    assert lines[6].split()[1:] == ["0.6800", "+0.1741", "1e-05", "36/2/5"]
    fidelity = next(line for line in lines if line.startswith("student ") and "bi-encoder" in line)
    assert fidelity.split() == [
        "student", "bi-encoder", "all-MiniLM-L6-v2", "trec-dl-2019", "kl", "48", "290", "0.3200", "0.2700", "0.3100"
    ]  # fmt: skip


def test_report_without_an_evaluation_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = Path("params.yaml").read_text(encoding="utf-8").replace("metrics: metrics", f"metrics: {tmp_path}")
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    assert main(["--params", str(tmp_path / "params.yaml")]) == 2
    assert "no evaluation yet (run `dvc repro` or `make run`)" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text(json.dumps(METRICS), encoding="utf-8")
    assert main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert "held-out queries" in capsys.readouterr().out


def test_teachers_table_has_a_figure_in_every_cell_whatever_the_method() -> None:
    """A synthetic target has no qrels (its figure is where the teacher puts the source document), an imported one
    no calls and several lists, a listwise one an identity share: no cell is left blank."""
    teachers = {
        "scifact": {
            "method": "pointwise",
            "model": "qwen",
            "queries": {"labelled": 12},
            "queries_from": "synthetic",
            "calls": {"paid": 0, "cached": 120},
            "quality": {},
            "source_doc": {"teacher_mrr": 0.6743, "first_stage_mrr": 0.8869},
        },
        "dl19": {
            "method": "imported",
            "model": "vicuna, gpt",
            "queries": {"labelled": 43},
            "queries_from": "collection",
            "files": [{}, {}],
            "quality": {
                "measure": "nDCG@10", "first_stage": 0.7203, "lists": {"a": {"nDCG@10": 0.66}, "b": {"nDCG@10": 0.75}}
            },
        },
        "nf": {
            "method": "listwise",
            "model": "gpt-4o-mini",
            "queries": {"labelled": 4},
            "queries_from": "collection",
            "calls": {"paid": 4, "cached": 0},
            "identity_share": 0.25,
            "quality": {"measure": "nDCG@10", "first_stage": 0.5, "teacher": 0.55, "lists": {"gpt-4o-mini": {}}},
            "stopped_early": "budget",
        },
    }  # fmt: skip
    (table,) = [t for t in tables({}, teachers=teachers) if t.title.startswith("teachers")]
    assert table.headers[-1] == "identity windows"
    rows = {row[0]: row for row in table.rows}
    assert rows["scifact"][5:] == [("source doc", "MRR"), "0.6743", "0.8869", "n/a (pointwise)"]
    assert rows["dl19"][4:] == ["none (2 files)", "nDCG@10", ("0.6600-0.7500", "(2 lists)"), "0.7203", "n/a (imported)"]
    assert rows["nf"][4:] == ["4/0", "nDCG@10", "0.5500", "0.5000", "25%"]
    assert all(cell for row in table.rows for cell in row)
    assert table.notes == ["nf: the teacher stopped early (budget): it labelled what it had"]


# --- the committed figures ----------------------------------------------------------------------------------


def test_headline_files_have_few_keys_and_the_detailed_files_figures(committed: dict) -> None:
    """metrics/headline/ is eval.json's figures, file for file: one per collection × query set × run, each with
    the measures, the delta and p only (what keeps `dvc metrics show` narrow)."""
    metrics, measures = committed["metrics"], committed["params"].evaluate.measures
    folder = committed["metrics_dir"] / headline.FOLDER
    on_disk = {p.relative_to(folder).as_posix(): json.loads(p.read_text()) for p in folder.rglob("*.json")}
    assert on_disk == headline.files(metrics, measures)  # written from the committed eval.json
    allowed = {*measures, headline.DELTA, headline.P_VALUE}
    assert all(set(figures) <= allowed for figures in on_disk.values())
    for collection, part, section in headline.sections(metrics):
        assert {f"{collection}/{part}/{headline.file_stem(run)}.json" for run in section["runs"]} <= set(on_disk)
    # the student on the held-out TREC-DL 2019 queries, against eval.json itself
    held = metrics["trec-dl-2019"]["held_out"]
    student = on_disk["trec-dl-2019/held-out/minilm-bi.json"]
    assert {m: student[m] for m in measures} == held["runs"]["minilm-bi"]
    versus = held[f"vs_{held['baseline']}"]["minilm-bi"]
    assert (student["delta"], student["p"]) == (versus["delta"], versus["p_value"])
    baseline = on_disk[f"trec-dl-2019/held-out/{held['baseline']}.json"]
    assert set(baseline) == set(measures)  # no delta against itself


def test_dvc_declares_only_the_headline_as_metrics() -> None:
    """Every other stage's figures are plain outputs: `dvc metrics show` prints one table of few columns."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    declared = {name: stage.get("do", stage).get("metrics") for name, stage in stages.items()}
    assert {name: m for name, m in declared.items() if m} == {
        "evaluate": [{"${paths.metrics}/headline": {"cache": False}}]
    }
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages["evaluate"]["outs"]}
    assert "${paths.metrics}/eval.json" in outs


def test_dvc_metrics_show_prints_one_narrow_row_per_collection_and_run(committed: dict) -> None:
    shown = subprocess.run(
        [DVC, "metrics", "show"], cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=120, check=True
    )
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["Path", "R@100", "RR@10", "delta", "nDCG@10", "p"]
    files = headline.files(committed["metrics"], committed["params"].evaluate.measures)
    assert len(lines) == 1 + len(files)
    assert max(map(len, lines)) <= 130  # the 300+ columns of eval.json were 8,800 characters wide
    row = next(line.split() for line in lines if line.startswith("metrics/headline/trec-dl-2019/held-out/minilm-bi."))
    figures = files["trec-dl-2019/held-out/minilm-bi.json"]
    assert [float(x) for x in row[1:]] == [figures[k] for k in ("R@100", "RR@10", "delta", "nDCG@10", "p")]


def test_report_of_the_committed_evaluation_fits_120_columns_with_its_real_figures(
    committed: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("pipeline.report.dvc_remotes", lambda root: [])
    assert main(["--params", "params.yaml", "--outputs"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    metrics, params = committed["metrics"], committed["params"]
    # every run of every query set, with eval.json's figures
    for collection, part, section in headline.sections(metrics):
        title = next(
            i
            for i, line in enumerate(lines)
            if line.startswith(f"{collection}: ") and (("held-out" in line) == (part == headline.HELD_OUT))
        )
        start = next(i for i in range(title, len(lines)) if lines[i].startswith("run ")) + 2
        end = lines.index("", start)
        rows = {line.split()[0]: line.split() for line in lines[start:end] if not line.startswith(("Δ", " "))}
        assert set(rows) == set(section["runs"]), (collection, part)
        for run, figures in section["runs"].items():
            shown = rows[run][1 : 1 + len(params.evaluate.measures)]
            assert shown == [f"{figures[m]:.4f}" for m in params.evaluate.measures], (collection, part, run)
            versus = section[f"vs_{section['baseline']}"].get(run)
            if versus:
                wins = f"{versus['wins']}/{versus['losses']}/{versus['ties']}"
                assert rows[run][-3:] == [f"{versus['delta']:+.4f}", f"{versus['p_value']:.3g}", wins]
    # the teachers and the students, by name
    teachers = lines.index(next(line for line in lines if line.startswith("teachers:")))
    assert {line.split()[0] for line in lines[teachers + 3 :] if line[:1].strip()} >= set(committed["teachers"])
    for student in params.students:
        assert any(line.startswith(f"{student} ") and params.students[student].kind in line for line in lines)
        # the closing message names the student's folder, its reranked runs and its training plot
        assert f"data/students/{student}/" in text and f"data/reranked/{student}/runs/" in text
        assert f"plots/training/{student}.png" in text
    assert "make serve" in text and "dvc push" not in text


def test_outputs_suggest_dvc_push_only_with_a_remote(committed: dict) -> None:
    params = committed["params"]
    assert "dvc push" not in outputs_text(params, REPO, [])
    assert "dvc push" not in outputs_text(params, REPO, None)  # could not tell
    assert "none configured" in outputs_text(params, REPO, [])
    assert "dvc push (remote: backup)" in outputs_text(params, REPO, ["backup"])
    assert all(len(line) <= WIDTH for line in outputs_text(params, REPO, ["backup"]).splitlines())


def test_dvc_remotes_reads_the_repositorys_config(tmp_path: Path) -> None:
    env = tool_env()
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    assert dvc_remotes(tmp_path) == []
    subprocess.run([DVC, "remote", "add", "-d", "backup", str(tmp_path / "store")], cwd=tmp_path, env=env, check=True)
    assert dvc_remotes(tmp_path) == ["backup"]
