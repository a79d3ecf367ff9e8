"""The teach stage against a real OpenAI-compatible HTTP server on 127.0.0.1 (pipeline/teacher/chat_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_teach, tiny_params, tool_env, write_params
from pipeline.config import ConfigError
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.chat_server import PASSAGE_MARK, OpenAIServer, default_responder

KEY_ENV = "DISTILLRANK_TEST_TEACHER_KEY"
SECRET = "sk-test-never-written-0123456789"


def reverse_responder(body: dict) -> str:
    """A listwise teacher that reverses every window it is shown."""
    text = " ".join(str(m.get("content") or "") for m in body["messages"])
    ids = sorted({int(n) for n in PASSAGE_MARK.findall(text)}, reverse=True)
    return " > ".join(f"[{n}]" for n in ids) if ids else default_responder(body)


def bee_responder(body: dict) -> str:
    """A pointwise teacher: Yes for passages about bees, No otherwise."""
    return "Yes" if "bee" in body["messages"][-1]["content"].lower() else "No"


def teach_params(root: Path, base_url: str, **teacher: object) -> dict:
    params = tiny_params(root)
    params["teacher"] = {
        "backend": "openai",
        "method": "listwise",
        "endpoint": {
            "base_url": base_url,
            "model": "test-teacher",
            "api_key_env": KEY_ENV,
            "timeout_s": 2,
            "max_retries": 1,
            "max_concurrency": 2,
        },
        "listwise": {"window": 3, "step": 2, "max_words": 30},
        **teacher,
    }
    params["teach"] = {"collection": {"tiny": {"split": "test", "depth": 4, "candidates": "bm25"}}, "synthetic": {}}
    return params


def rankings(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "data/teacher/tiny/teacher_rankings.parquet")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def test_listwise_reverses_and_a_rerun_pays_nothing(teach_root: Path) -> None:
    with OpenAIServer(responder=reverse_responder) as server:
        params = teach_params(teach_root, server.base_url)
        first = run_teach(params)
        calls = server.served_ok
        assert first["calls"]["paid"] == calls == first["windows"] > 0
        assert first["parse"]["ok"] == first["windows"] and first["identity_windows"] == 0
        labels = rankings(teach_root)
        assert set(labels.query_id) == {"q1", "q2", "q3", "q4"}
        assert labels.model.unique().tolist() == ["test-teacher"]
        for _, group in labels.groupby("query_id"):
            group = group.sort_values("teacher_rank")
            # every window was reversed, so the first stage's top document is no longer first
            assert group.first_stage_rank.iloc[0] != 1 or len(group) == 1
        assert (teach_root / "metrics/teacher/tiny.json").is_file()
        windows = pd.read_parquet(teach_root / "data/teacher/tiny/teacher_windows.parquet")
        assert len(windows) == first["windows"] and set(windows.parse_status) == {"ok"}
        assert not windows.identity.any() and (windows.attempts == 1).all()

        again = run_teach(params)
        assert server.served_ok == calls  # nothing paid twice
        assert again["calls"]["paid"] == 0 and again["calls"]["cached"] == first["windows"]
        pd.testing.assert_frame_equal(
            labels.drop(columns="run_id"), rankings(teach_root).drop(columns="run_id"), check_like=True
        )


def test_changed_window_repays_only_the_windows_that_changed(teach_root: Path) -> None:
    with OpenAIServer(responder=reverse_responder) as server:
        run_teach(teach_params(teach_root, server.base_url, listwise={"window": 3, "step": 1, "max_words": 30}))
        before = server.served_ok
        changed = run_teach(
            teach_params(teach_root, server.base_url, listwise={"window": 3, "step": 2, "max_words": 30})
        )
        # the bottom window of each query is the same prompt in both settings: served from the cache
        assert changed["calls"]["cached"] > 0
        assert changed["calls"]["paid"] == server.served_ok - before < changed["windows"]


def test_unparseable_answers_are_retried_then_reported(teach_root: Path) -> None:
    def garbage_first(body: dict) -> str:
        return "I am not sure." if body.get("temperature", 0) == 0 else reverse_responder(body)

    with OpenAIServer(responder=garbage_first) as server:
        summary = run_teach(teach_params(teach_root, server.base_url))
        assert summary["parse"]["retried_windows"] == summary["windows"]
        assert summary["parse"]["failed"] == 0  # the retry (sampled, seed + 1) parsed
        assert summary["parse"]["marked_unusable"] == 0  # a garbage answer the retry made up for is kept as it is
        assert server.served_ok == 2 * summary["windows"]

    with OpenAIServer(responder=lambda body: "no idea") as server:
        params = teach_params(teach_root / "hopeless", server.base_url)
        for name in ("collections", "indexes", "retrieval"):
            (teach_root / "hopeless" / "data").mkdir(parents=True, exist_ok=True)
            os.symlink(teach_root / "data" / name, teach_root / "hopeless" / "data" / name)
        summary = run_teach(params)
        assert summary["parse"]["failed"] == summary["windows"]  # kept in place (first-stage order) and counted
        # every attempt of a window that stayed unusable is marked in the cache (a later run asks again)
        assert summary["parse"]["marked_unusable"] == 2 * summary["windows"]
        windows = pd.read_parquet(teach_root / "hopeless/data/teacher/tiny/teacher_windows.parquet")
        assert set(windows.parse_status) == {"failed"} and (windows.attempts == 2).all()
        assert set(windows.response) == {"no idea"}
        labels = rankings(teach_root / "hopeless")
        assert (labels.teacher_rank == labels.first_stage_rank).all()


def test_pointwise_ranks_by_yes_minus_no(teach_root: Path) -> None:
    with OpenAIServer(responder=bee_responder) as server:
        summary = run_teach(teach_params(teach_root, server.base_url, method="pointwise"))
        assert summary["pairs"] == summary["scored_pairs"] == server.served_ok
        assert all(body["max_tokens"] == 1 and body["logprobs"] for body in server.requests)
    labels = rankings(teach_root)
    q1 = labels[labels.query_id == "q1"].sort_values("teacher_rank")
    assert set(q1.doc_id.iloc[:2]) <= {"d1", "d11"} and q1.score.iloc[0] > 0
    assert summary["quality"]["queries"] == 4


def test_imported_trec_labels(teach_root: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "llm.trec"
    run_file.write_text("q1 Q0 d11 1 9.0 llm\nq1 Q0 d1 2 8.0 llm\nq2 Q0 d2 1 5.0 llm\nq99 Q0 d3 1 1.0 llm\n")
    params = teach_params(teach_root, "http://127.0.0.1:9/v1", method="imported")
    params["teacher"]["imported"] = {"files": [{"path": str(run_file), "format": "trec", "teacher": "gpt-x"}]}
    summary = run_teach(params)
    labels = rankings(teach_root).sort_values(["query_id", "teacher_rank"])
    assert labels[["query_id", "doc_id", "teacher_rank"]].values.tolist() == [
        ["q1", "d11", 1],
        ["q1", "d1", 2],
        ["q2", "d2", 1],
    ]
    assert set(labels.model) == {"gpt-x"} and set(labels.method) == {"imported"}
    assert summary["queries_in_files"] == 3 and "calls" not in summary
    assert summary["files"][0]["teacher"] == "gpt-x" and summary["files"][0]["queries_labelled"] == 2
    assert set(labels.template_hash) == {hashlib.sha256(run_file.read_bytes()).hexdigest()}  # provenance


def test_several_imported_files_keep_each_lists_provenance(teach_root: Path, tmp_path: Path) -> None:
    """Two teachers' files over two first stages: every label keeps its teacher, first stage and file hash; a
    passage both rank is a label in each list, with each list's rank."""
    first, second = tmp_path / "a.trec", tmp_path / "b.trec"
    first.write_text("q1 Q0 d11 1 9.0 a\nq1 Q0 d1 2 8.0 a\nq2 Q0 d2 1 5.0 a\n")
    second.write_text("q1 Q0 d1 1 3.0 b\nq1 Q0 d11 2 2.0 b\nq1 Q0 d5 3 1.0 b\n")
    params = teach_params(teach_root, "http://127.0.0.1:9/v1", method="imported")
    params["teacher"]["imported"] = {
        "files": [
            {"path": str(first), "teacher": "gpt-x", "first_stage": "bm25"},
            {"path": str(second), "teacher": "vicuna", "first_stage": "tas-b"},
        ]
    }
    summary = run_teach(params)
    labels = rankings(teach_root)
    by_list = {
        (m, f): g.sort_values(["query_id", "teacher_rank"]).doc_id.tolist()
        for (m, f), g in labels.groupby(["model", "first_stage"])
    }
    assert by_list == {("gpt-x", "bm25"): ["d11", "d1", "d2"], ("vicuna", "tas-b"): ["d1", "d11", "d5"]}
    hashes = dict(zip(labels.model, labels.template_hash, strict=True))
    assert hashes["vicuna"] == hashlib.sha256(second.read_bytes()).hexdigest() != hashes["gpt-x"]
    assert [f["teacher"] for f in summary["files"]] == ["gpt-x", "vicuna"]
    assert set(summary["quality"]["lists"]) == {"gpt-x@bm25", "vicuna@tas-b"}


def test_two_files_with_the_same_teacher_and_first_stage_are_refused(teach_root: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "a.trec"
    run_file.write_text("q1 Q0 d1 1 1.0 a\n")
    params = teach_params(teach_root, "http://127.0.0.1:9/v1", method="imported")
    params["teacher"]["imported"] = {"files": [{"path": str(run_file), "teacher": "x"}] * 2}
    with pytest.raises(ConfigError, match="unique"):
        run_teach(params)


def test_budget_stops_cleanly_and_the_next_run_resumes(teach_root: Path, tmp_path: Path) -> None:
    with OpenAIServer(responder=reverse_responder) as server:
        params = teach_params(teach_root, server.base_url)
        params["teacher"]["endpoint"]["max_concurrency"] = 1
        # what the whole job costs, measured in a scratch root (its own cache)
        scratch = teach_params(tmp_path / "scratch", server.base_url)
        scratch["paths"] = {**params["paths"], "teacher": str(tmp_path / "t"), "teacher_cache": str(tmp_path / "c")}
        scratch["paths"]["metrics"] = str(tmp_path / "m")
        whole = run_teach(scratch)["calls"]["prompt_tokens"]
        server.successes.clear()
        params["teacher"]["budget"] = {"max_prompt_tokens": whole // 2}
        stopped = run_teach(params)
        assert stopped["stopped_early"] and "budget" in stopped["stopped_early"]
        assert 0 < stopped["queries"]["labelled"] < stopped["queries"]["selected"]
        paid = server.served_ok
        params["teacher"]["budget"] = {}
        finished = run_teach(params)
        assert finished["stopped_early"] is None and finished["queries"]["labelled"] == 4
        assert finished["calls"]["cached"] == paid  # the budget-stopped run's calls were kept
        assert server.served_ok == paid + finished["calls"]["paid"]


def test_the_api_key_is_never_written(teach_root: Path) -> None:
    with OpenAIServer(responder=reverse_responder) as server:
        run_teach(teach_params(teach_root, server.base_url))
        assert server.authorizations and all(a == f"Bearer {SECRET}" for a in server.authorizations)
    for path in teach_root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_run_at_a_35_percent_fault_rate_finishes_and_pays_no_answer_twice(teach_root: Path) -> None:
    # broken bodies (cut short, not JSON), 500s and empty answers, a third of all replies
    with OpenAIServer(responder=reverse_responder, fault_rate=0.35, seed=3) as server:
        params = teach_params(teach_root, server.base_url)
        params["teacher"]["endpoint"]["max_retries"] = 3
        params["teacher"]["listwise"] = {"window": 2, "step": 1, "max_words": 30}  # 12 windows
        first = run_teach(params)  # one run finishes
        assert sum(server.injected.values()) >= 0.2 * server.total and len(server.injected) >= 3
        assert set(rankings(teach_root).query_id) == {"q1", "q2", "q3", "q4"}
        assert max(server.usable.values()) == 1  # no usable answer was paid for twice
        server.fault_rate = 0.0
        second = run_teach(params)
        # only the calls whose answers were unusable are asked again; then nothing is left to pay for
        assert second["calls"]["paid"] == first["calls"]["unusable"] and max(server.usable.values()) == 1
        assert run_teach(params)["calls"]["paid"] == 0


def test_unreachable_endpoint_is_a_clear_error_and_keeps_nothing_half_done(teach_root: Path) -> None:
    params = teach_params(teach_root, "http://127.0.0.1:9/v1")  # nothing listens on port 9
    params["teacher"]["endpoint"]["max_retries"] = 0
    path = write_params(teach_root / "params.yaml", params)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stage", "teach", "tiny", "--params", str(path)],
        cwd=teach_root,
        env=tool_env(**{KEY_ENV: SECRET}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert not (teach_root / "data/teacher/tiny/teacher_rankings.parquet").exists()


def test_missing_key_variable_is_named(teach_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    from pipeline.teacher.client import TeacherConfigError

    with OpenAIServer() as server, pytest.raises(TeacherConfigError, match=KEY_ENV):
        run_teach(teach_params(teach_root, server.base_url))


def test_sigkill_mid_stage_then_resume_pays_each_call_once(teach_root: Path) -> None:
    """A teach stage killed with SIGKILL mid-run; the re-run pays only for calls that had not completed."""
    with OpenAIServer(responder=reverse_responder, latency_s=0.4) as server:
        params = teach_params(teach_root, server.base_url)
        params["teacher"]["endpoint"]["max_concurrency"] = 1
        params["teacher"]["listwise"] = {"window": 2, "step": 1, "max_words": 30}  # several windows a query
        path = write_params(teach_root / "params.yaml", params)
        command = [sys.executable, "-m", "pipeline.cli", "stage", "teach", "tiny", "--params", str(path)]
        env = tool_env(**{KEY_ENV: SECRET})
        process = subprocess.Popen(command, cwd=teach_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.served_ok < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert not (teach_root / "data/teacher/tiny/teacher_rankings.parquet").exists()
        cached_before = len(TeacherCache(teach_root / "data/teacher_cache/tiny"))
        assert cached_before >= 2

        resumed = subprocess.run(command, cwd=teach_root, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        summary = json.loads(resumed.stdout)
        distinct = len(TeacherCache(teach_root / "data/teacher_cache/tiny"))
        assert summary["calls"]["paid"] == distinct - cached_before  # the resume paid only what was missing
        # over both runs, each distinct call was paid once, plus at most the one in flight at the kill
        assert distinct <= server.served_ok <= distinct + 1
    assert re.search(r'"labelled": 4', resumed.stdout)
