"""The replaying teacher (``teacher.backend: replay``): a recorded ranking served through the real client and cache."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_teach, tiny_params
from pipeline.config import ConfigError, parse_params
from pipeline.metrics import evaluate_run
from pipeline.teacher.listwise import rankgpt_messages
from pipeline.teacher.replay import ListwisePromptReader, RecordedRanking, ReplayError, replay_model_name
from pipeline.teacher.templates import load_template

SHARED_DL19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl-2019"


def recorded_reverse_bm25(root: Path, depth: int) -> tuple[Path, pd.DataFrame]:
    """A recorded 'teacher' that ranks each query's BM25 top ``depth`` in reverse, as a TREC run."""
    candidates = pd.read_parquet(root / "data/retrieval/tiny/candidates.parquet")
    top = candidates[(candidates.method == "bm25") & (candidates["rank"] <= depth)]
    lines, order = [], []
    for query_id, group in top.groupby("query_id"):
        for rank, doc_id in enumerate(group.sort_values("rank", ascending=False).doc_id, start=1):
            lines.append(f"{query_id} Q0 {doc_id} {rank} {100 - rank} recorded")
            order.append((query_id, doc_id, rank))
    path = root / "recorded.trec"
    path.write_text("\n".join(lines) + "\n")
    return path, pd.DataFrame(order, columns=["query_id", "doc_id", "recorded_rank"])


def replay_params(root: Path, recorded: Path, window: int, step: int, **replay: object) -> dict:
    params = tiny_params(root)
    params["teacher"] = {
        "backend": "replay",
        "method": "listwise",
        "replay": {"path": str(recorded), **replay},
        "listwise": {"window": window, "step": step, "max_words": 5},  # passages cut: matched by their first words
    }
    params["teach"] = {"collection": {"tiny": {"split": "test", "depth": 6, "candidates": "bm25"}}, "synthetic": {}}
    return params


def labels(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "data/teacher/tiny/teacher_rankings.parquet")


def test_one_window_over_every_candidate_reproduces_the_recording(teach_root: Path) -> None:
    recorded, order = recorded_reverse_bm25(teach_root, depth=6)
    summary = run_teach(replay_params(teach_root, recorded, window=6, step=6))
    got = labels(teach_root).merge(order, on=["query_id", "doc_id"], how="left")
    assert len(got) and (got.teacher_rank == got.recorded_rank).all()
    assert summary["replay"]["windows"] == summary["windows"] == summary["calls"]["paid"] > 0
    assert summary["replay"]["unknown_passages"] == summary["replay"]["unranked_passages"] == 0
    assert summary["model"] == replay_model_name(parse_params(replay_params(teach_root, recorded, 6, 6)).teacher.replay)
    assert summary["model"].startswith("replay:recorded.trec@")
    # the recording's model name is in every label and cache key: a changed file is never served old answers
    assert labels(teach_root).model.unique().tolist() == [summary["model"]]


def test_the_sliding_window_brings_the_recordings_top_to_the_top(teach_root: Path) -> None:
    recorded, order = recorded_reverse_bm25(teach_root, depth=6)
    summary = run_teach(replay_params(teach_root, recorded, window=4, step=2))
    got = labels(teach_root).merge(order, on=["query_id", "doc_id"])
    for _, group in got.groupby("query_id"):
        if len(group) >= 4:  # the bottom-up walk carries the best window - step of the rest into the last window
            top = group.sort_values("teacher_rank").head(2)
            assert top.recorded_rank.tolist() == [1, 2]
    assert summary["identity_windows"] < summary["windows"]


def test_faults_are_survived_in_one_run_and_the_labels_are_the_clean_ones(teach_root: Path) -> None:
    recorded, order = recorded_reverse_bm25(teach_root, depth=6)
    faulty = run_teach(
        replay_params(teach_root, recorded, window=6, step=6, fault_rate=0.4, seed=1, faults=["truncated", "500"])
    )
    assert sum(faulty["replay"]["faults_injected"].values()) > 0
    assert faulty["replay"]["requests"] > faulty["calls"]["paid"]  # the faults were retried, not labelled
    got = labels(teach_root).merge(order, on=["query_id", "doc_id"])
    assert (got.teacher_rank == got.recorded_rank).all()


def test_a_query_the_recording_lacks_keeps_its_order_and_is_counted(teach_root: Path) -> None:
    recorded, order = recorded_reverse_bm25(teach_root, depth=6)
    kept = order.query_id.unique()[0]
    lines = [line for line in recorded.read_text().splitlines() if line.split()[0] == kept]
    recorded.write_text("\n".join(lines) + "\n")
    summary = run_teach(replay_params(teach_root, recorded, window=6, step=6))
    assert summary["replay"]["unrecorded_queries"] == summary["windows"] - 1
    others = labels(teach_root).query(f"query_id != '{kept}'")
    assert (others.teacher_rank == others.first_stage_rank).all()


def test_replay_needs_a_file_and_the_listwise_method(teach_root: Path) -> None:
    params = replay_params(teach_root, Path("x.trec"), 3, 2)
    del params["teacher"]["replay"]
    with pytest.raises(ConfigError, match=r"teacher.replay.path: backend 'replay' needs the recorded ranking file"):
        parse_params(params)
    params = replay_params(teach_root, Path("x.trec"), 3, 2)
    params["teacher"]["method"] = "pointwise"
    with pytest.raises(ConfigError, match=r"teacher.method: backend 'replay' answers listwise prompts only"):
        parse_params(params)
    params = replay_params(teach_root, Path("x.trec"), 3, 2, fault_rate=1.5)
    with pytest.raises(ConfigError, match=r"teacher.replay.fault_rate"):
        parse_params(params)


def test_a_missing_recording_names_the_file(teach_root: Path) -> None:
    with pytest.raises(Exception, match=r"missing.trec: labels file not found"):
        run_teach(replay_params(teach_root, teach_root / "missing.trec", 3, 2))


def test_the_prompt_reader_reads_back_what_rankgpt_messages_wrote() -> None:
    template = load_template("rankgpt-listwise")
    passages = ["The [1] bee. dances\n a lot", "Search Query: tricky", "plain"]
    messages = rankgpt_messages(template, "what is {x}? [2]", passages, max_words=3)
    query, shown = ListwisePromptReader(template).read(messages)
    assert query == "what is {x}? [2]"
    assert shown == ["The [1] bee.", "Search Query: tricky", "plain"]
    with pytest.raises(ReplayError, match="announces 3 passages"):
        ListwisePromptReader(template).read([m for i, m in enumerate(messages) if i != 5])


def test_identical_passages_resolve_to_the_best_recorded_one() -> None:
    from pipeline.teacher.outcome import Pool

    pool = Pool(
        pd.DataFrame({"query_id": ["q"], "text": ["bees"]}),
        pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "c"], "rank": [1, 2, 3], "passage": ["same", "x", "same"]}),
    )
    book = RecordedRanking.over(
        pool, pd.DataFrame({"query_id": "q", "doc_id": ["c", "b", "a"], "teacher_rank": [1, 2, 3]})
    )
    assert book.permutation("bees", ["x", "same"]) == [2, 1]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DL19.is_dir(), reason="needs ../shared/data/trec-dl-2019")
def test_our_window_walk_over_replayed_gpt35_matches_the_recorded_run(tmp_path: Path) -> None:
    """Our sliding window (20/10) over GPT-3.5's replayed decisions on DL19's BM25 top 100 scores what RankGPT's own
    walk scored (0.6799 nDCG@10), in RankGPT's 9 calls a query (bench/replay.py prints the same figures)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import replay as bench  # bench/replay.py

    pool, qrels = bench.bm25_pool(43, depth=100)
    ours, figures, _ = bench.teach_once(pool, bench.replay_teacher(0.0, 0), tmp_path)
    recorded = pd.read_csv(
        bench.RECORDED, sep=" ", header=None, names=["query_id", "q0", "doc_id", "rank", "score", "tag"]
    )
    recorded = recorded.astype({"query_id": str, "doc_id": str})
    ndcg = {
        name: evaluate_run(qrels, run, ("nDCG@10",), 2).aggregate["nDCG@10"]
        for name, run in (("ours", ours.assign(score=-ours.teacher_rank.astype(float))), ("recorded", recorded))
    }
    assert abs(ndcg["recorded"] - 0.6799) < 5e-4
    assert abs(ndcg["ours"] - ndcg["recorded"]) <= 0.01
    assert figures["paid"] == 43 * 9 and figures["unknown_passages"] == figures["unranked_passages"] == 0
    assert json.dumps(figures)  # the bench's figures are plain JSON


@pytest.mark.slow
def test_a_35_percent_fault_rate_finishes_in_one_dvc_repro(tmp_path: Path) -> None:
    """The issue's setting in miniature, through DVC: listwise teaching with 35% of the replies broken needs one
    `dvc repro`, and an unchanged re-run pays nothing."""
    from conftest import FIXTURE, make_repo_copy, run_cli

    params = tiny_params()
    params["teacher"] = {
        "backend": "replay",
        "method": "listwise",
        "replay": {"path": str(FIXTURE / "runs" / "weak.trec"), "fault_rate": 0.35, "seed": 3},
        "listwise": {"window": 3, "step": 2},
    }
    params["teach"] = {"collection": {"tiny": {"split": "train", "depth": 4}}, "synthetic": {}}
    repo = make_repo_copy(tmp_path / "repo", params)
    first = run_cli(["dvc", "repro", "teach-collection@tiny"], repo)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((repo / "metrics/teacher/tiny.json").read_text())
    assert sum(summary["replay"]["faults_injected"].values()) > 0
    assert summary["calls"]["errors"] == 0 and summary["calls"]["paid"] > 0
    assert summary["parse"]["failed"] == 0 or summary["calls"]["unusable"] > 0  # an empty answer is never "ok"
    again = run_cli(["dvc", "repro", "--force", "--single-item", "teach-collection@tiny"], repo)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((repo / "metrics/teacher/tiny.json").read_text())
    # only the answers that came back unusable are asked again (their prompts' windows may follow them)
    assert rerun["calls"]["paid"] <= summary["calls"]["unusable"] * 2
