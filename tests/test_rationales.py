"""Reason-to-Rank rationales: answer parsing, the teach stage's rationale mode against the local OpenAI-compatible
test server (pipeline/teacher/chat_server.py), the rationales table and its DuckDB view (no LLM)."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import jsonschema
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_teach, tiny_params
from pipeline import duck, schemas
from pipeline.config import Budget, EndpointConfig, SamplingConfig, parse_params
from pipeline.teacher.cache import TeacherCache, call_key
from pipeline.teacher.chat_server import PASSAGE_MARK, OpenAIServer
from pipeline.teacher.client import CachedTeacher
from pipeline.teacher.rationales import (
    ParsedRationales,
    parse_rationales,
    ranked_window,
    rationale_messages,
    rationale_response_format,
    rationale_schema,
    rationale_windows,
)
from pipeline.teacher.templates import load_template
from pipeline.teacher.windows import Ask, WindowWalk, walk_windows

KEY_ENV = "DISTILLRANK_TEST_RATIONALES_KEY"
README_SQL = """
SELECT teacher_rank, doc_id, title, direct_reason, answer_sentence, comparative_reason
FROM teacher_explained
WHERE collection = 'tiny' AND query_id = 'q1'
ORDER BY teacher_rank
"""


def entry(i: int, answer: str | None = "the answer", **fields: object) -> dict:
    return {"id": i, "direct_reason": f"d{i}", "answer_sentence": answer, "comparative_reason": f"c{i}", **fields}


def answer(ranking: list[int], entries: list[dict]) -> str:
    return json.dumps({"ranking": ranking, "passages": entries})


GOOD = answer([2, 3, 1], [entry(2), entry(3, answer=None), entry(1)])


# --- parsing ------------------------------------------------------------------------------------------------


def test_a_complete_answer_parses_ok_and_fits_the_schema() -> None:
    parsed = parse_rationales(GOOD, 3)
    assert (parsed.order, parsed.status, parsed.json_status) == ((1, 2, 0), "ok", "ok")
    assert parsed.rationales[1].direct_reason == "d2" and parsed.rationales[1].comparative_reason == "c2"
    assert parsed.rationales[2].answer_sentence is None and parsed.answer_sentences == 2
    assert parsed.missing == parsed.missing_rationales == parsed.missing_fields == parsed.empty_reasons == 0
    jsonschema.validate(json.loads(GOOD), rationale_schema(3))  # what the constrained decoder must produce
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(answer([4, 1, 2], [entry(1), entry(2), entry(4)])), rationale_schema(3))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # partial: passage 3 neither ranked nor explained (appended in window order)
        (
            answer([2, 1], [entry(2), entry(1)]),
            {"order": (1, 0, 2), "status": "repaired", "json_status": "ok", "missing": 1, "missing_rationales": 1},
        ),
        # missing fields: no comparative reason for 1, no answer sentence for 2; an empty direct reason for 3
        (
            json.dumps(
                {
                    "ranking": [1, 2, 3],
                    "passages": [
                        {"id": 1, "direct_reason": "d1", "answer_sentence": "a"},
                        {"id": 2, "direct_reason": "d2", "comparative_reason": "c2"},
                        entry(3, direct_reason=""),
                    ],
                }
            ),
            {"order": (0, 1, 2), "status": "repaired", "missing_fields": 2, "empty_reasons": 2, "answer_sentences": 2},
        ),
        # empty reasons alone are allowed (counted, status ok)
        (answer([1, 2, 3], [entry(1, direct_reason=""), entry(2), entry(3)]), {"status": "ok", "empty_reasons": 1}),
        # truncated mid-answer: the ranking and the first passage survive
        (
            GOOD[: GOOD.index('"c3"') - 5],
            {"order": (1, 2, 0), "status": "repaired", "json_status": "repaired", "missing_rationales": 1},
        ),
        # prose and a code fence around the object
        (
            f"Sure! Here is the ranking:\n```json\n{GOOD}\n```\nLet me know if you need more.",
            {"order": (1, 2, 0), "status": "repaired", "json_status": "repaired", "missing_rationales": 0},
        ),
        # trailing commas
        (GOOD.replace("]}", "],}").replace('"c1"}', '"c1",}'), {"order": (1, 2, 0), "json_status": "repaired"}),
        # ids as strings, a duplicate and an out-of-range id, an entry for an unknown passage
        (
            answer(["[3]", "3", "passage 1", 7], [entry(3), entry(1), entry(9), entry(3)]),
            {"order": (2, 0, 1), "status": "repaired", "duplicates": 1, "out_of_range": 1, "dropped_entries": 2},
        ),
        # no ranking: the entries' order is used
        (
            json.dumps({"passages": [entry(3), entry(2), entry(1)]}),
            {"order": (2, 1, 0), "status": "repaired", "ranking_from_passages": True},
        ),
        # a bare array of entries
        (json.dumps([entry(2), entry(1), entry(3)]), {"order": (1, 0, 2), "status": "repaired"}),
        # garbage: nothing usable, the window keeps its order
        ("I'm sorry, I cannot rank these passages.", {"order": (0, 1, 2), "status": "failed", "json_status": "failed"}),
        ("", {"order": (0, 1, 2), "status": "failed", "missing_rationales": 3}),
        ('{"verdict": "all relevant"}', {"order": (0, 1, 2), "status": "failed", "json_status": "ok"}),
    ],
    ids=[
        "partial",
        "missing-fields",
        "empty-reason",
        "truncated",
        "prose-fences",
        "trailing-comma",
        "bad-ids",
        "no-ranking",
        "bare-array",
        "garbage",
        "empty",
        "wrong-object",
    ],
)
def test_broken_answers_are_repaired_or_failed_and_counted(text: str, expected: dict) -> None:
    parsed = parse_rationales(text, 3)
    assert sorted(parsed.order) == [0, 1, 2]  # always a complete permutation of the window
    for name, value in expected.items():
        assert getattr(parsed, name) == value, (name, parsed)


def test_answer_sentences_are_kept_as_given() -> None:
    odd = "  Not in the passage at all!  "
    parsed = parse_rationales(answer([1], [entry(1, answer=odd)]), 1)
    assert parsed.rationales[0].answer_sentence == odd


def rank_with_rationales(
    passages: list[str], ask: Ask, window: int, step: int, parse_retries: int = 0
) -> WindowWalk[ParsedRationales]:
    """What ``rationales.teach`` does for one query: R2R's windows, prompt and parser through ``walk_windows``."""
    prompt = partial(rationale_messages, load_template("r2r-rationales"), "q", max_words=120)
    windows = rationale_windows(len(passages), window, step)
    return walk_windows(passages, windows, prompt, parse_rationales, ask, parse_retries)


def test_windows_and_the_walk_retry_an_unusable_answer() -> None:
    assert rationale_windows(30, 5, 5) == [(25, 30), (20, 25), (15, 20), (10, 15), (5, 10), (0, 5)]
    assert rationale_windows(11, 5, 5) == [(10, 11), (5, 10), (0, 5)]
    with pytest.raises(ValueError, match="step <= window"):
        rationale_windows(10, 5, 6)
    asked: list[int] = []

    def flaky(messages: list[dict[str, str]], n: int, attempt: int) -> tuple[str, str]:
        asked.append(attempt)
        if attempt == 0:
            return "no idea", "k0"
        return answer(list(range(n, 0, -1)), [entry(i) for i in range(1, n + 1)]), f"k{attempt}"

    result = rank_with_rationales(["a", "b", "c"], flaky, window=3, step=3, parse_retries=1)
    assert asked == [0, 1] and result.order == (2, 1, 0)
    (call,) = result.calls
    assert call.attempts == 2 and call.key == "k1" and call.parsed.status == "ok"
    assert call.attempt_keys == ("k0", "k1")
    assert [(i, r) for i, r, _ in ranked_window(call)] == [(2, 1), (1, 2), (0, 3)]


def test_non_overlapping_windows_concatenate_in_first_stage_order() -> None:
    def reverse(messages: list[dict[str, str]], n: int, attempt: int) -> tuple[str, str]:
        return answer(list(range(n, 0, -1)), []), "k"

    result = rank_with_rationales([str(i) for i in range(7)], reverse, window=3, step=3)
    assert result.order == (2, 1, 0, 5, 4, 3, 6)


# --- the client: response_format in the request and (only then) in the key ----------------------------------


def test_response_format_is_keyed_only_when_given(tmp_path: Path) -> None:
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None)
    sampling = SamplingConfig(temperature=0.0, max_tokens=64, seed=0)
    with TeacherCache(tmp_path) as cache:
        client = CachedTeacher(endpoint, sampling, cache, "hash", budget=Budget(), progress=False)
        messages = [{"role": "user", "content": "rank"}]
        # the key of a call without response_format is the one every existing cache record was stored under
        assert client.key(messages) == call_key("m", "hash", messages, sampling.as_dict())
        assert client.key(messages, None, None) == client.key(messages)
        with_format = client.key(messages, response_format=rationale_response_format(3))
        assert with_format != client.key(messages)
        assert with_format != client.key(messages, response_format=rationale_response_format(2))


# --- the teach stage in rationale mode ----------------------------------------------------------------------


def passages_of(body: dict) -> dict[int, str]:
    """The window's passages by id, from the ``[i] passage`` user messages."""
    shown = {}
    for message in body["messages"]:
        match = re.match(r"\[(\d+)\] (.*)", str(message.get("content") or ""), re.S)
        if message["role"] == "user" and match:
            shown[int(match.group(1))] = match.group(2)
    return shown


def json_responder(body: dict) -> str:
    """An R2R teacher that reverses every window and explains each passage (answer: its first sentence)."""
    shown = passages_of(body) or {int(n): "" for n in PASSAGE_MARK.findall(str(body["messages"]))}
    ids = sorted(shown, reverse=True)
    entries = [
        {
            "id": i,
            "direct_reason": f"Passage {i} talks about {shown[i].split()[0] if shown[i] else 'nothing'}.",
            "answer_sentence": shown[i].split(". ")[0] if i == ids[0] else None,
            "comparative_reason": f"Ranked {rank} of {len(ids)}.",
        }
        for rank, i in enumerate(ids, start=1)
    ]
    return json.dumps({"ranking": ids, "passages": entries})


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-rationales")


def rationale_params(root: Path, base_url: str, **rationales: object) -> dict:
    params = tiny_params(root)
    params["teacher"] = {
        "backend": "openai",
        "method": "rationales",
        "endpoint": {
            "base_url": base_url,
            "model": "test-teacher",
            "api_key_env": KEY_ENV,
            "timeout_s": 2,
            "max_retries": 1,
            "max_concurrency": 2,
        },
        "sampling": {"temperature": 0.0, "max_tokens": 64, "seed": 0},
        "rationales": {"window": 3, "step": 3, "max_words": 30, "max_tokens": 512, **rationales},
    }
    params["teach"] = {"collection": {"tiny": {"split": "test", "depth": 4, "candidates": "bm25"}}, "synthetic": {}}
    return params


def read(root: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(root / "data/teacher/tiny" / schemas.TABLES[table].filename)


def test_rationale_mode_end_to_end_then_a_rerun_pays_nothing(teach_root: Path) -> None:
    with OpenAIServer(responder=json_responder) as server:
        params = rationale_params(teach_root, server.base_url)
        first = run_teach(params)
        # BM25 finds 4, 3, 2 and 2 candidates for q1-q4; windows of 3: q1 (3, 4) then (0, 3), the others one each
        assert first["windows"] == 5 == first["calls"]["paid"] == server.served_ok
        assert first["parse"]["ok"] == 5 and first["parse"]["json_ok"] == 5
        assert first["rationales"]["passages_explained"] == 11 and first["rationales"]["answer_sentences"] == 5
        # the structured-output request: a json_schema for the window's size, and the stage's max_tokens
        for body in server.requests:
            n = len(passages_of(body))
            assert body["response_format"]["type"] == "json_schema"
            schema = body["response_format"]["json_schema"]["schema"]
            assert schema == rationale_schema(n) and body["max_tokens"] == 512
            jsonschema.validate(json.loads(json_responder(body)), schema)

        labels = read(teach_root, "teacher_rankings").sort_values(["query_id", "teacher_rank"])
        q1 = labels[labels.query_id == "q1"]
        # windows reversed, concatenated in first-stage order: 3 2 1 | 4
        assert q1.first_stage_rank.tolist() == [3, 2, 1, 4]
        assert set(labels.method) == {"rationales"} and labels.score.isna().all()

        table = pq.read_table(teach_root / "data/teacher/tiny/rationales.parquet")
        assert table.schema.equals(schemas.RATIONALES, check_metadata=False)
        rationales = table.to_pandas()
        assert len(rationales) == 2 * 11 and set(rationales.kind) == {"direct", "comparative"}
        direct = rationales[rationales.kind == "direct"]
        comparative = rationales[rationales.kind == "comparative"]
        assert all(len(ids) == 0 for ids in direct.compared_doc_ids)
        assert comparative.answer_sentence.isna().all()
        # the comparative rows name the window's other documents: none in q1's window of 1, 2 in a window of 3
        assert sorted(len(ids) for ids in comparative.compared_doc_ids) == [0] + [1] * 4 + [2] * 6
        q1_top = comparative[(comparative.query_id == "q1") & (comparative.window_rank == 1)]
        assert len(q1_top) == 2 and sorted(map(len, q1_top.compared_doc_ids)) == [0, 2]
        assert set(rationales.parse_status) == {"ok"} and set(rationales.model) == {"test-teacher"}
        assert set(rationales.template_hash) == {load_template("r2r-rationales").sha256}
        keys = set(TeacherCache(teach_root / "data/teacher_cache/tiny")._index)
        assert set(rationales.call_key) <= keys and len(set(rationales.call_key)) == 5
        windows = read(teach_root, "teacher_windows")
        assert len(windows) == 5 and windows.identity.tolist().count(True) == 1  # a window of 1 is its identity

        again = run_teach(params)
        assert server.served_ok == first["calls"]["paid"]  # nothing paid twice
        assert again["calls"]["paid"] == 0 and again["calls"]["cached"] == 5
        pd.testing.assert_frame_equal(
            rationales.drop(columns="run_id"), read(teach_root, "rationales").drop(columns="run_id"), check_like=True
        )


def test_a_failed_answer_is_asked_again_and_a_broken_one_repaired(teach_root: Path) -> None:
    def flaky(body: dict) -> str:
        if body.get("temperature", 0) != 0:  # a retry (sampled): a good answer
            return json_responder(body)
        if "Search query: how do honey bees" in body["messages"][-1]["content"]:  # q1's windows: garbage
            return "I think they are all relevant."
        return f"```json\n{json_responder(body)[:-2]}"  # the others: fenced and cut short

    with OpenAIServer(responder=flaky) as server:
        summary = run_teach(rationale_params(teach_root, server.base_url, use_json_schema=False))
        assert all("response_format" not in body for body in server.requests)
    parse = summary["parse"]
    assert parse["retried_windows"] == 2 and parse["failed"] == 0  # q1's two windows: the retry (seed + 1) parsed
    assert parse["marked_unusable"] == 0
    assert parse["json_repaired"] == 3 and parse["repaired"] == 3 and parse["ok"] == 2
    assert server.served_ok == summary["windows"] + 2
    windows = read(teach_root, "teacher_windows")
    assert windows[windows.query_id == "q1"].attempts.tolist() == [2, 2]
    rationales = read(teach_root, "rationales")
    assert set(rationales[rationales.query_id == "q1"].parse_status) == {"ok"}
    assert set(rationales[rationales.query_id != "q1"].parse_status) == {"repaired"}


def test_other_methods_write_an_empty_rationales_table(teach_root: Path) -> None:
    with OpenAIServer() as server:  # the default responder answers listwise prompts
        params = rationale_params(teach_root, server.base_url)
        params["teacher"]["method"] = "listwise"
        params["teacher"]["listwise"] = {"window": 3, "step": 2, "max_words": 30}
        run_teach(params)
    table = pq.read_table(teach_root / "data/teacher/tiny/rationales.parquet")
    assert table.num_rows == 0 and table.schema.equals(schemas.RATIONALES, check_metadata=False)
    # the view still answers, with null reasons
    columns, rows = duck.query(parse_params(params).paths, README_SQL, root=teach_root)
    assert len(rows) == 4 and all(row[columns.index("direct_reason")] is None for row in rows)


def test_duckdb_explains_the_teachers_ranking(teach_root: Path) -> None:
    with OpenAIServer(responder=json_responder) as server:
        params = rationale_params(teach_root, server.base_url)
        run_teach(params)
    paths = parse_params(params).paths
    statements = duck.view_statements(paths, teach_root)
    assert [s.split()[4] for s in statements[-2:]] == ["all_queries", "teacher_explained"]
    assert all("\n" not in s for s in statements)  # one a line, as `distillrank sql --print-views` prints them
    columns, rows = duck.query(paths, README_SQL, root=teach_root)
    assert columns == ["teacher_rank", "doc_id", "title", "direct_reason", "answer_sentence", "comparative_reason"]
    explained = pd.DataFrame(rows, columns=columns)
    assert explained.teacher_rank.tolist() == [1, 2, 3, 4]
    labels = read(teach_root, "teacher_rankings")
    q1 = labels[labels.query_id == "q1"].sort_values("teacher_rank")
    assert explained.doc_id.tolist() == q1.doc_id.tolist()
    assert explained.title.notna().all() and explained.direct_reason.str.startswith("Passage ").all()
    assert explained.comparative_reason.tolist() == [
        "Ranked 1 of 3.",
        "Ranked 2 of 3.",
        "Ranked 3 of 3.",
        "Ranked 1 of 1.",
    ]
    # the window's best passage carries its answer sentence, the others null
    assert explained.answer_sentence.notna().tolist() == [True, False, False, True]
    _, (row,) = duck.query(paths, "SELECT DISTINCT query FROM teacher_explained WHERE query_id = 'q1'", teach_root)
    assert row[0] == "how do honey bees tell each other where flowers are"
