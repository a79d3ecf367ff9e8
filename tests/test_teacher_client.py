"""The cached teacher client against a real OpenAI-compatible HTTP server (``pipeline/teacher/chat_server.py``).

Nothing of the ``openai`` client is mocked: retries, timeouts and response parsing are its own. The client
timeout is 0.5 s and ``max_retries`` 2, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

from pipeline.config import BreakerConfig
from pipeline.teacher.cache import TeacherCache, teacher_calls_view_sql
from pipeline.teacher.chat_server import Fault, HangingServer, OpenAIServer, body_hash
from pipeline.teacher.client import (
    Budget,
    BudgetExceeded,
    CachedTeacher,
    EndpointConfig,
    EndpointDown,
    SamplingConfig,
    TeacherCallError,
    TeacherConfigError,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


def prompt(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You rank passages."}, {"role": "user", "content": text}]


def make_teacher(
    server: OpenAIServer,
    folder: Path,
    sampling: SamplingConfig | None = None,
    budget: Budget | None = None,
    **endpoint: object,
) -> CachedTeacher:
    config = {"base_url": server.base_url, "model": "test-model", "api_key_env": None, "timeout_s": 0.5}
    config |= {"max_retries": 2, "max_concurrency": 4, **endpoint}
    return CachedTeacher(
        EndpointConfig(**config),
        sampling or SamplingConfig(max_tokens=16),
        TeacherCache(folder),
        template_hash="tpl-v1",
        run_id="test-run",
        budget=budget,
        progress=False,
    )


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("calls-*.jsonl")) for line in path.read_text().splitlines()]


# -- success and caching ------------------------------------------------------------------------------------
def test_a_call_is_made_once_then_served_from_the_cache(server: OpenAIServer, tmp_path: Path) -> None:
    sampling = SamplingConfig(max_tokens=4, seed=7, top_logprobs=2)
    teacher = make_teacher(server, tmp_path, sampling)
    first = teacher.complete(prompt("Is this relevant?"))
    assert (first.text, first.cached, first.finish_reason) == ("Yes", False, "stop")
    assert first.logprobs == [{"Yes": -0.1, "No": -2.5}]
    assert (first.prompt_tokens, first.completion_tokens) == (6, 1)
    sent = server.requests[0]
    assert (sent["model"], sent["max_tokens"], sent["seed"], sent["temperature"]) == ("test-model", 4, 7, 0.0)
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)

    second = teacher.complete(prompt("Is this relevant?"))
    assert second.cached and second.text == first.text and second.logprobs == first.logprobs
    assert server.total == 1
    assert (teacher.counters.calls, teacher.counters.cached, teacher.counters.prompt_tokens) == (1, 1, 6)

    # a fresh process (a new cache object over the same folder) pays nothing either
    again = make_teacher(server, tmp_path, sampling).complete(prompt("Is this relevant?"))
    assert again.cached and server.total == 1
    # another sampling config is another call
    teacher.complete(prompt("Is this relevant?"), sampling_override=SamplingConfig(max_tokens=5))
    assert server.total == 2
    [stored, *_] = records(tmp_path)
    assert stored["status"] == "ok" and stored["run_id"] == "test-run" and stored["template_hash"] == "tpl-v1"
    assert stored["request"]["sampling"] == {"temperature": 0.0, "max_tokens": 4, "seed": 7, "top_logprobs": 2}


def test_listwise_answer_and_empty_content(server: OpenAIServer, tmp_path: Path) -> None:
    teacher = make_teacher(server, tmp_path)
    assert teacher.complete(prompt("q [1] a [2] b [3] c")).text == "[1] > [2] > [3]"
    server.inject("empty", "empty")
    empty = teacher.complete(prompt("an empty answer"))
    # an empty answer is never ok: stored as unusable (with its cost) and asked again, not served
    assert empty.text == "" and not empty.cached
    assert records(tmp_path)[-1]["status"] == "unusable" and records(tmp_path)[-1]["prompt_tokens"] > 0
    assert teacher.complete(prompt("an empty answer")).text == "" and server.total == 3
    assert teacher.counters.unusable == 2


def test_unusable_answers_are_asked_again_a_bounded_number_of_times(server: OpenAIServer, tmp_path: Path) -> None:
    # a teacher that always answers the same unusable thing: 3 answers over all runs, then served as it is
    server.inject(*["empty"] * 10)
    for run in range(5):
        teacher = make_teacher(server, tmp_path)
        result = teacher.complete(prompt("always empty"))
        assert result.text == "" and result.cached == (run >= 3)
    assert server.total == 3
    # an ok answer the method could not use is marked, and asked again by the next run
    teacher = make_teacher(server, tmp_path)
    server.faults.clear()
    first = teacher.complete(prompt("q [1] a [2] b"))
    assert teacher.mark_unusable(first.key, "listwise: no usable id") and not teacher.mark_unusable(first.key, "x")
    again = make_teacher(server, tmp_path).complete(prompt("q [1] a [2] b"))
    assert not again.cached and server.total == 5
    assert make_teacher(server, tmp_path).complete(prompt("q [1] a [2] b")).cached  # the new answer stands


# -- faults the openai client retries -----------------------------------------------------------------------
def test_429_is_retried_after_the_retry_after_delay(server: OpenAIServer, tmp_path: Path) -> None:
    server.inject(Fault("429", retry_after=0.01))
    started = time.perf_counter()
    result = make_teacher(server, tmp_path).complete(prompt("rate limited once"))
    assert result.text == "Yes" and server.total == 2
    # Retry-After (0.01 s) honoured, not the default backoff (0.5 s less up to 25% jitter)
    assert time.perf_counter() - started < 0.3
    assert [r["status"] for r in records(tmp_path)] == ["ok"]


def test_500_twice_then_success(server: OpenAIServer, tmp_path: Path) -> None:
    server.inject("500", "500")
    assert make_teacher(server, tmp_path).complete(prompt("flaky")).text == "Yes"
    assert server.total == 3 and [r["status"] for r in records(tmp_path)] == ["ok"]


def test_retries_run_out_an_error_is_recorded_and_the_next_run_retries(server: OpenAIServer, tmp_path: Path) -> None:
    server.inject("500", "500", "500")
    teacher = make_teacher(server, tmp_path)
    with pytest.raises(TeacherCallError, match="InternalServerError") as raised:
        teacher.complete(prompt("down"))
    assert isinstance(raised.value.cause, openai.InternalServerError) and server.total == 3
    [error] = records(tmp_path)
    assert error["status"] == "error" and "500" in error["error"] and error["response_text"] is None
    assert teacher.counters.errors == 1 and len(teacher.cache) == 0
    # the error is not served: the call is made again, and now succeeds
    assert not teacher.complete(prompt("down")).cached and server.total == 4
    assert [r["status"] for r in records(tmp_path)] == ["error", "ok"]


def test_a_timeout_is_retried(server: OpenAIServer, tmp_path: Path) -> None:
    server.inject(Fault("delay", delay_s=1.5))  # longer than the 0.5 s client timeout
    assert make_teacher(server, tmp_path).complete(prompt("slow once")).text == "Yes"
    assert server.total == 2 and server.served_ok == 1


def test_a_connection_dropped_mid_body_is_retried(server: OpenAIServer, tmp_path: Path) -> None:
    server.inject("disconnect")
    assert make_teacher(server, tmp_path).complete(prompt("dropped once")).text == "Yes"
    assert server.total == 2


# -- broken 200 replies: the openai client does not retry them ----------------------------------------------
@pytest.mark.parametrize(
    ("fault", "cause", "message"),
    [
        (Fault("truncated"), json.JSONDecodeError, "JSONDecodeError"),
        (Fault("garbage", content_type="application/json"), UnicodeDecodeError, "UnicodeDecodeError"),
        # labelled text/html, the body comes back from openai as a str, not an error: we reject it
        (Fault("garbage", content_type="text/html"), ValueError, "str instead of a chat completion"),
    ],
    ids=["truncated-json", "garbage-json", "garbage-html"],
)
def test_a_broken_body_is_recorded_as_an_error(
    server: OpenAIServer, tmp_path: Path, fault: Fault, cause: type, message: str
) -> None:
    # retried with backoff (the openai client does not), up to max_retries (2) times ...
    server.inject(fault, fault)
    teacher = make_teacher(server, tmp_path)
    assert teacher.complete(prompt("broken twice")).text == "Yes" and server.total == 3
    assert [r["status"] for r in records(tmp_path)] == ["ok"]
    # ... and an error record only when every try was broken
    server.inject(fault, fault, fault)
    with pytest.raises(TeacherCallError, match=message) as raised:
        teacher.complete(prompt("broken reply"))
    assert isinstance(raised.value.cause, cause)
    assert server.total == 6
    error = records(tmp_path)[-1]
    assert error["status"] == "error" and message in error["error"]
    assert teacher.complete(prompt("broken reply")).text == "Yes" and server.total == 7


# -- many calls ---------------------------------------------------------------------------------------------
def test_complete_many_runs_calls_concurrently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with OpenAIServer(responder=lambda body: "echo " + body["messages"][-1]["content"], latency_s=0.2) as server:
        teacher = make_teacher(server, tmp_path, max_concurrency=8)
        teacher.progress = True
        batch = [prompt(f"question {i}") for i in range(16)]
        started = time.perf_counter()
        results = teacher.complete_many(batch)
        elapsed = time.perf_counter() - started
    assert elapsed < 1.6, elapsed  # one at a time: 16 x 0.2 = 3.2 s; 8 at a time: about 0.4 s
    assert [r.text for r in results] == [f"echo question {i}" for i in range(16)]
    assert not any(r.cached for r in results) and server.served_ok == 16 and len(teacher.cache) == 16
    assert "teacher" in capsys.readouterr().err  # the progress bar


def test_complete_many_serves_the_cache_and_calls_duplicates_once(server: OpenAIServer, tmp_path: Path) -> None:
    teacher = make_teacher(server, tmp_path)
    teacher.complete(prompt("a"))
    results = teacher.complete_many([prompt("a"), prompt("b"), prompt("a"), prompt("c"), prompt("b")])
    assert [r.cached for r in results] == [True, False, True, False, True]
    assert results[1].key == results[4].key
    assert server.total == 3  # a once before, then b and c
    counters = teacher.counters
    assert (counters.calls, counters.cached) == (3, 3)


def test_complete_many_stores_what_succeeds_and_raises_for_failures(server: OpenAIServer, tmp_path: Path) -> None:
    teacher = make_teacher(server, tmp_path, max_concurrency=1)
    server.inject("500", "500", "500")  # one call's three tries
    with pytest.raises(TeacherCallError, match="1 of 3 teacher calls failed"):
        teacher.complete_many([prompt(f"p{i}") for i in range(3)])
    assert len(teacher.cache) == 2 and server.total == 5
    before = server.total
    assert len(make_teacher(server, tmp_path).complete_many([prompt(f"p{i}") for i in range(3)])) == 3
    assert server.total == before + 1  # only the failed call is made again


# -- budget ---------------------------------------------------------------------------------------------------
def test_budget_stops_new_calls_but_not_the_cache(server: OpenAIServer, tmp_path: Path) -> None:
    # every prompt is 3 + 3 words = 6 prompt tokens for the test server; 20 tokens allow 3 calls (18)
    teacher = make_teacher(server, tmp_path, budget=Budget(max_prompt_tokens=20))
    for i in range(3):
        teacher.complete(prompt(f"question number {i}"))
    with pytest.raises(BudgetExceeded, match="prompt tokens: 18 spent"):
        teacher.complete(prompt("question number 3"))
    assert teacher.complete(prompt("question number 0")).cached  # cached calls are always served
    assert server.total == 3 and len(TeacherCache(tmp_path)) == 3


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_in_complete_many(server: OpenAIServer, tmp_path: Path, concurrency: int) -> None:
    budget = Budget(max_cost_usd=0.02, price_per_1k_prompt=1.0, price_per_1k_completion=0.0)  # 0.006 per call
    teacher = make_teacher(server, tmp_path, budget=budget, max_concurrency=concurrency)
    with pytest.raises(BudgetExceeded) as raised:
        teacher.complete_many([prompt(f"question number {i}") for i in range(12)])
    made = raised.value.counters.calls
    # in order: 3 calls (0.018); at once: the first wave goes out before any cost is known
    assert made == 3 if concurrency == 1 else 3 <= made <= concurrency, (made, str(raised.value))
    assert len(TeacherCache(tmp_path)) == made == server.total == teacher.counters.calls


# -- secrets and configuration ------------------------------------------------------------------------------
def test_the_api_key_is_never_written(server: OpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-secret-123"
    monkeypatch.setenv("DISTILLRANK_TEST_KEY", secret)
    teacher = make_teacher(server, tmp_path / "cache", api_key_env="DISTILLRANK_TEST_KEY")
    teacher.complete(prompt("one"))
    server.inject("429")
    teacher.complete(prompt("two"))
    server.inject("401")  # the error body echoes the Authorization header
    with pytest.raises(TeacherCallError, match="<redacted>") as raised:
        teacher.complete(prompt("three"))
    assert secret not in str(raised.value)
    assert server.authorizations[0] == f"Bearer {secret}"  # the key was used...
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and all(secret.encode() not in p.read_bytes() for p in files)  # ...and never stored
    assert "<redacted>" in records(tmp_path / "cache")[-1]["error"]


def test_a_missing_key_variable_is_a_clear_error(server: OpenAIServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DISTILLRANK_MISSING_KEY", raising=False)
    make_teacher(server, tmp_path).complete(prompt("asked before"))
    teacher = make_teacher(server, tmp_path, api_key_env="DISTILLRANK_MISSING_KEY")
    # a fully cached run needs no key: it is read only when a call has to be made
    assert teacher.complete(prompt("asked before")).cached
    with pytest.raises(TeacherConfigError, match=r"'DISTILLRANK_MISSING_KEY'.*1 answers came from the cache"):
        teacher.complete(prompt("never asked"))
    assert server.total == 1


def test_a_dead_endpoint_fails_fast(tmp_path: Path) -> None:
    # accepts connections and never answers; at the default timeout (120 s) and retries (5), a call takes 12 min
    with HangingServer() as dead:
        endpoint = EndpointConfig(base_url=dead.base_url, model="m", api_key_env=None)
        teacher = CachedTeacher(
            endpoint, SamplingConfig(), TeacherCache(tmp_path), "tpl", breaker=BreakerConfig(probe_timeout_s=1.0)
        )
        started = time.perf_counter()
        with pytest.raises(EndpointDown, match=r"did not answer a probe.*paid for 0 calls.*pays only for the rest"):
            teacher.complete_many([prompt(f"q{i}") for i in range(20)])
        elapsed = time.perf_counter() - started
        # every later call (another query's) fails at once: no second probe
        started = time.perf_counter()
        with pytest.raises(EndpointDown):
            teacher.complete(prompt("another query"))
        assert time.perf_counter() - started < 0.5
    assert elapsed < 5, elapsed  # one probe of 1 s
    assert dead.connections == 1


def test_the_breaker_stops_calls_after_consecutive_failures(server: OpenAIServer, tmp_path: Path) -> None:
    teacher = CachedTeacher(
        EndpointConfig(base_url=server.base_url, model="m", api_key_env=None, timeout_s=0.5, max_retries=0),
        SamplingConfig(),
        TeacherCache(tmp_path),
        "tpl",
        breaker=BreakerConfig(consecutive_failures=3),
        progress=False,
    )
    teacher.complete(prompt("ok first"))
    server.inject(*["500"] * 50)
    with pytest.raises(EndpointDown, match=r"3 calls in a row failed.*paid for 1 calls"):
        teacher.complete_many([prompt(f"q{i}") for i in range(20)])
    assert server.total <= 1 + 3 + 4  # the calls in flight when it tripped finish, no new one starts
    with pytest.raises(EndpointDown):
        teacher.complete(prompt("after the trip"))


def test_endpoint_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="max_concurrency"):
        EndpointConfig(base_url="http://127.0.0.1:1/v1", model="m", max_concurrency=0)
    with pytest.raises(ValidationError, match="max_retry"):
        EndpointConfig(base_url="http://127.0.0.1:1/v1", model="m", max_retry=3)


def test_records_written_by_the_client_read_through_the_view(server: OpenAIServer, tmp_path: Path) -> None:
    import duckdb

    teacher = make_teacher(server, tmp_path, SamplingConfig(max_tokens=2, top_logprobs=3))
    teacher.complete(prompt("q [1] a [2] b"))
    server.inject("truncated", "truncated", "truncated")  # every try broken: an error record
    with pytest.raises(TeacherCallError):
        teacher.complete(prompt("q2"))
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT status, response_text, model, logprobs->>'$[0].top_logprobs[2].token', run_id "
            f"FROM ({teacher_calls_view_sql(tmp_path)}) ORDER BY timestamp"
        )
        .fetchall()
    )
    assert rows == [
        ("ok", "[1] > [2]", "test-model", "maybe", "test-run"),
        ("error", None, "test-model", None, "test-run"),
    ]


# -- a killed run resumes without paying twice --------------------------------------------------------------
RUNNER = textwrap.dedent(
    """
    import json, sys
    from pipeline.teacher.cache import TeacherCache
    from pipeline.teacher.client import CachedTeacher, EndpointConfig, SamplingConfig

    base_url, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    endpoint = EndpointConfig(base_url=base_url, model="test-model", api_key_env=None, timeout_s=5,
                              max_retries=2, max_concurrency=2)
    teacher = CachedTeacher(endpoint, SamplingConfig(max_tokens=8), TeacherCache(folder), "tpl-v1", progress=False)
    batch = [[{"role": "user", "content": f"prompt {i}: [1] one [2] two"}] for i in range(n)]
    results = teacher.complete_many(batch)
    assert len(results) == n
    print(json.dumps({"calls": teacher.counters.calls, "cached": teacher.counters.cached}))
    """
)


def test_a_killed_run_resumes_and_pays_for_no_call_twice(tmp_path: Path) -> None:
    script = tmp_path / "run_teacher.py"
    script.write_text(RUNNER, encoding="utf-8")
    folder, distinct, concurrency = tmp_path / "cache", 30, 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with OpenAIServer(latency_s=0.1) as server:
        command = [sys.executable, str(script), server.base_url, str(folder), str(distinct)]
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while server.served_ok < 8 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL
        served_before = server.served_ok
        cached_before = len(TeacherCache(folder))
        assert 0 < cached_before < distinct
        assert served_before - cached_before <= concurrency  # lost: at most the calls in flight

        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout)
        assert summary == {"calls": distinct - cached_before, "cached": cached_before}
        assert server.served_ok - served_before == distinct - cached_before
        assert server.served_ok <= distinct + concurrency
        assert len(server.successes) == distinct
        assert sum(count - 1 for count in server.successes.values()) == served_before - cached_before
    final = TeacherCache(folder)
    assert len(final) == distinct and final.stats().ok == distinct
    body = {"messages": [{"role": "user", "content": "prompt 0: [1] one [2] two"}], "model": "test-model"}
    assert body_hash({**body, "max_tokens": 8, "temperature": 0.0}) in server.successes
