"""Prompt templates, RankGPT prompts, permutation parsing, sliding windows and the window walk (no LLM)."""

from __future__ import annotations

import doctest
import importlib
import json
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from pipeline.config import SamplingConfig
from pipeline.teacher.listwise import (
    ParsedPermutation,
    parse_permutation,
    rankgpt_messages,
    sliding_windows,
    truncate_words,
)
from pipeline.teacher.templates import (
    PromptTemplate,
    TemplateError,
    available_templates,
    load_template,
    load_template_file,
)
from pipeline.teacher.windows import (
    WindowWalk,
    apply_permutation,
    is_identity,
    mark_failed_windows,
    retry_sampling,
    walk_windows,
)

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "teacher" / "templates"


@pytest.mark.parametrize("name", ["pipeline.teacher.templates", "pipeline.teacher.listwise"])
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} lost its examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"


# --- templates ----------------------------------------------------------------------------------------------


def test_the_shipped_templates_load() -> None:
    assert set(available_templates()) >= {"rankgpt-listwise", "pointwise-yes-no", "pointwise-graded"}
    for name in available_templates():
        template = load_template(name)
        assert template.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", template.sha256)
        assert template.short_hash == template.sha256[:12]
        assert template.ref == f"{name}@v{template.version}+{template.short_hash}"


def test_an_unknown_template_names_the_known_ones() -> None:
    with pytest.raises(TemplateError, match=r"unknown prompt template 'rankgpt-v9'.*rankgpt-listwise"):
        load_template("rankgpt-v9")


def test_the_template_hash_follows_the_file_content(tmp_path: Path) -> None:
    copy = tmp_path / "rankgpt-listwise.json"
    shutil.copy(TEMPLATE_DIR / "rankgpt-listwise.json", copy)
    same = load_template_file(copy)
    assert same.sha256 == load_template("rankgpt-listwise").sha256
    assert same.path == str(copy)

    raw = json.loads(copy.read_text(encoding="utf-8"))
    raw["parts"]["system"] += " "  # one stray space is a different prompt
    copy.write_text(json.dumps(raw), encoding="utf-8")
    changed = load_template_file(copy)
    assert changed.version == same.version
    assert changed.sha256 != same.sha256 and changed.short_hash != same.short_hash


def _write(tmp_path: Path, raw: object) -> Path:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parts": {"system": "s"}}, r"needs parts \['user'\]"),
        ({"parts": {"system": "s", "user": "{qeury}"}}, r"unknown placeholders \['qeury'\]"),
        ({"parts": {"system": "s", "user": "{query"}}, "not a valid format string"),
        ({"kind": "pairwise"}, "'kind' must be one of"),
        ({"version": 0}, "positive integer"),
        ({"version": True}, "positive integer"),
        ({"temperature": 0}, r"unknown keys \['temperature'\]"),
    ],
)
def test_malformed_templates_fail_at_load_time(tmp_path: Path, change: dict, message: str) -> None:
    raw = {"name": "t", "version": 1, "kind": "pointwise", "parts": {"system": "s", "user": "{query} {passage}"}}
    with pytest.raises(TemplateError, match=message):
        load_template_file(_write(tmp_path, {**raw, **change}))


def test_a_missing_or_broken_template_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="template file not found"):
        load_template_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(TemplateError, match="not valid UTF-8 JSON"):
        load_template_file(tmp_path / "bad.json")


# --- prompts ------------------------------------------------------------------------------------------------


def test_rankgpt_messages_follow_the_paper() -> None:
    passages = ["first passage", "second\n passage", "third {passage} with braces"]
    messages = rankgpt_messages(load_template("rankgpt-listwise"), "what is x", passages, max_words=300)
    assert len(messages) == 2 * len(passages) + 4
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[0]["content"].startswith("You are RankGPT, an intelligent assistant")
    assert messages[1]["content"] == (
        "I will provide you with 3 passages, each indicated by number identifier []. \n"
        "Rank the passages based on their relevance to query: what is x."
    )
    assert messages[2]["content"] == "Okay, please provide the passages."
    shown = [m["content"] for m in messages[3:-1:2]]
    assert shown == ["[1] first passage", "[2] second passage", "[3] third {passage} with braces"]
    assert [m["content"] for m in messages[4:-1:2]] == [f"Received passage [{i}]." for i in (1, 2, 3)]
    assert messages[-1]["content"].startswith("Search Query: what is x. \nRank the 3 passages above")
    assert messages[-1]["content"].endswith("Only response the ranking results, do not say any word or explain.")


def test_rankgpt_messages_truncate_and_refuse_bad_input() -> None:
    template = load_template("rankgpt-listwise")
    messages = rankgpt_messages(template, "q", ["a b c d e"], max_words=2)
    assert messages[3]["content"] == "[1] a b"
    with pytest.raises(ValueError, match="at least one passage"):
        rankgpt_messages(template, "q", [], max_words=2)
    with pytest.raises(TemplateError, match="not listwise"):
        rankgpt_messages(load_template("pointwise-yes-no"), "q", ["a"], max_words=2)


def test_truncate_words() -> None:
    assert truncate_words("a b c", 2) == "a b"
    assert truncate_words("", 5) == ""
    with pytest.raises(ValueError, match="at least 1"):
        truncate_words("a", 0)


# --- parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        # good answers, in the formats models actually use
        ("[3] > [1] > [2]", 3, ParsedPermutation((2, 0, 1), "ok")),
        ("3 > 1 > 2", 3, ParsedPermutation((2, 0, 1), "ok")),
        ("[2]>[1]", 2, ParsedPermutation((1, 0), "ok")),
        ("[1] > [2] > [3]", 3, ParsedPermutation((0, 1, 2), "ok")),
        # prose around the ids
        ("Sure! The ranking is: [2] > [3] > [1]. Hope this helps", 3, ParsedPermutation((1, 2, 0), "ok")),
        ("Ranking: [3], [1]", 3, ParsedPermutation((2, 0, 1), "repaired", missing=1)),
        # partial: the missing ids are appended in their original order
        ("[4] > [2]", 5, ParsedPermutation((3, 1, 0, 2, 4), "repaired", missing=3)),
        # duplicates: the first mention counts
        ("[2] > [1] > [2] > [1]", 2, ParsedPermutation((1, 0), "repaired", duplicates=2)),
        ("[2] > [2] > [3]", 3, ParsedPermutation((1, 2, 0), "repaired", missing=1, duplicates=1)),
        # out of range: 0 and > n are dropped
        ("[0] > [3] > [12] > [1] > [2]", 3, ParsedPermutation((2, 0, 1), "repaired", out_of_range=2)),
        # nothing usable: the identity, failed
        ("", 3, ParsedPermutation((0, 1, 2), "failed", missing=3)),
        ("   \n", 2, ParsedPermutation((0, 1), "failed", missing=2)),
        ("I cannot rank these passages.", 3, ParsedPermutation((0, 1, 2), "failed", missing=3)),
        ("[] > [] > []", 3, ParsedPermutation((0, 1, 2), "failed", missing=3)),
        ("[7] > [9]", 3, ParsedPermutation((0, 1, 2), "failed", missing=3, out_of_range=2)),
        # degenerate sizes
        ("[1]", 1, ParsedPermutation((0,), "ok")),
        ("", 0, ParsedPermutation((), "ok")),
    ],
)
def test_parse_permutation(text: str, n: int, expected: ParsedPermutation) -> None:
    parsed = parse_permutation(text, n)
    assert parsed == expected
    assert sorted(parsed.order) == list(range(n))  # always a complete permutation


def test_parse_permutation_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError):
        parse_permutation("[1]", -1)


# --- windows ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "window", "step", "expected"),
    [
        (100, 20, 10, [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50), (20, 40), (10, 30), (0, 20)]),
        (30, 20, 10, [(10, 30), (0, 20)]),
        (25, 20, 10, [(5, 25), (0, 15)]),  # the top window is clipped at 0
        (20, 20, 10, [(0, 20)]),  # n = window
        (7, 20, 10, [(0, 7)]),  # n < window
        (10, 20, 10, [(0, 10)]),
        (1, 20, 10, [(0, 1)]),
        (0, 20, 10, []),
        (40, 20, 20, [(20, 40), (0, 20)]),  # step = window: no overlap
        (45, 20, 20, [(25, 45), (5, 25), (0, 5)]),
        (7, 4, 2, [(3, 7), (1, 5), (0, 3)]),
        (5, 3, 1, [(2, 5), (1, 4), (0, 3)]),
    ],
)
def test_sliding_windows(n: int, window: int, step: int, expected: list[tuple[int, int]]) -> None:
    assert sliding_windows(n, window, step) == expected


def test_sliding_windows_cover_every_position_once_per_pass() -> None:
    for n in range(0, 60):
        for window in range(1, 12):
            for step in range(1, window + 1):
                windows = sliding_windows(n, window, step)
                assert len(set(windows)) == len(windows)
                assert {i for s, e in windows for i in range(s, e)} == set(range(n))
                assert all(0 <= s < e <= n and e - s <= window for s, e in windows)
                assert [e for _, e in windows] == sorted((e for _, e in windows), reverse=True)


@pytest.mark.parametrize(("window", "step"), [(0, 1), (5, 0), (5, 6)])
def test_sliding_windows_reject_bad_sizes(window: int, step: int) -> None:
    with pytest.raises(ValueError):
        sliding_windows(10, window, step)


# --- permutations -------------------------------------------------------------------------------------------


def test_apply_permutation() -> None:
    ranking = [10, 11, 12, 13]
    assert apply_permutation(ranking, 0, 4, (3, 2, 1, 0)) == [13, 12, 11, 10]
    assert apply_permutation(ranking, 2, 4, (1, 0)) == [10, 11, 13, 12]
    assert apply_permutation(ranking, 1, 1, ()) == ranking
    assert ranking == [10, 11, 12, 13]  # the input is not modified
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutation(ranking, 0, 2, (0, 0))
    with pytest.raises(ValueError, match="does not fit"):
        apply_permutation(ranking, 2, 5, (0, 1, 2))


def test_is_identity() -> None:
    assert is_identity((0, 1, 2, 3))
    assert not is_identity((0, 1, 3, 2))
    assert is_identity(())


# --- the window walk with RankGPT's prompt and parser -------------------------------------------------------

Teacher = Callable[[list[dict[str, str]], int], str]  # (messages, attempt) -> answer


def rerank(
    passages: list[str],
    teacher: Teacher,
    window: int = 20,
    step: int = 10,
    max_words: int = 300,
    template: PromptTemplate | None = None,
    parse_retries: int = 0,
) -> WindowWalk[ParsedPermutation]:
    """What ``listwise.teach`` does for one query: RankGPT's windows, prompt and parser through ``walk_windows``
    (the cache key of each answer is ``key<attempt>``)."""
    prompt = partial(rankgpt_messages, template or load_template("rankgpt-listwise"), "q", max_words=max_words)

    def ask(messages: list[dict[str, str]], n: int, attempt: int) -> tuple[str, str]:
        return teacher(messages, attempt), f"key{attempt}"

    windows = sliding_windows(len(passages), window, step)
    return walk_windows(passages, windows, prompt, parse_permutation, ask, parse_retries)


def passages_shown(messages: list[dict[str, str]]) -> list[str]:
    """The passage texts of a RankGPT prompt, in order (``[i] text`` user messages)."""
    return [m["content"].split("] ", 1)[1] for m in messages[3:-1:2]]


def reverse_each_window(messages: list[dict[str, str]], attempt: int = 0) -> str:
    """A fake teacher that ranks every window bottom-up: ``[k] > ... > [1]``."""
    k = len(passages_shown(messages))
    return " > ".join(f"[{i}]" for i in range(k, 0, -1))


def test_the_walk_on_seven_passages_by_hand() -> None:
    # n=7, window=4, step=2 gives windows (3,7), (1,5), (0,3); each is reversed in the *current* ranking:
    #   start          [0, 1, 2, 3, 4, 5, 6]
    #   (3,7) 3 4 5 6 -> 6 5 4 3:  [0, 1, 2, 6, 5, 4, 3]
    #   (1,5) 1 2 6 5 -> 5 6 2 1:  [0, 5, 6, 2, 1, 4, 3]
    #   (0,3) 0 5 6   -> 6 5 0:    [6, 5, 0, 2, 1, 4, 3]
    passages = [f"passage {i}" for i in range(7)]
    seen: list[list[str]] = []

    def ask(messages: list[dict[str, str]], attempt: int = 0) -> str:
        seen.append(passages_shown(messages))
        return reverse_each_window(messages)

    result = rerank(passages, ask, window=4, step=2, max_words=50)
    assert isinstance(result, WindowWalk)
    assert result.order == (6, 5, 0, 2, 1, 4, 3)
    assert [(c.start, c.end) for c in result.calls] == [(3, 7), (1, 5), (0, 3)]
    assert [c.passages for c in result.calls] == [(3, 4, 5, 6), (1, 2, 6, 5), (0, 5, 6)]
    assert seen == [[passages[i] for i in c.passages] for c in result.calls]
    assert [c.response for c in result.calls] == ["[4] > [3] > [2] > [1]", "[4] > [3] > [2] > [1]", "[3] > [2] > [1]"]
    assert all(c.parsed.status == "ok" and not c.identity for c in result.calls)
    assert all(len(c.messages) == 2 * (c.end - c.start) + 4 for c in result.calls)
    assert all(c.attempt_keys == ("key0",) and c.key == "key0" for c in result.calls)
    assert result.identity_calls == 0 and result.failed_calls == 0


def test_identity_and_failed_windows_leave_the_ranking_alone() -> None:
    passages = [f"p{i}" for i in range(7)]
    keep = rerank(passages, lambda m, attempt=0: "[1] > [2] > [3] > [4]", window=4, step=2)
    # the last window has 3 passages: "[4]" is out of range there, so that call is repaired, still the identity
    assert keep.order == tuple(range(7))
    assert [c.identity for c in keep.calls] == [True, True, True]
    assert [c.parsed.status for c in keep.calls] == ["ok", "ok", "repaired"]
    assert keep.identity_calls == 3

    silent = rerank(passages, lambda m, attempt=0: "", window=4, step=2)
    assert silent.order == tuple(range(7))
    assert silent.failed_calls == 3 and silent.identity_calls == 3


def test_a_model_that_prefers_one_passage_carries_it_to_the_top() -> None:
    # The relevant passage starts last; each window puts it first, so it climbs through every window.
    passages = [f"filler {i}" for i in range(9)] + ["the answer"]

    def ask(messages: list[dict[str, str]], attempt: int = 0) -> str:
        shown = passages_shown(messages)
        first = shown.index("the answer") + 1 if "the answer" in shown else 1
        return f"[{first}]"  # partial answers: the rest keep their order

    result = rerank(passages, ask, window=4, step=3)
    assert result.order[0] == 9
    assert result.order[1:] == tuple(range(9))
    assert all(c.parsed.status == "repaired" for c in result.calls)


def test_the_walk_with_few_or_no_passages() -> None:
    one_window = rerank(["a", "b"], reverse_each_window)
    assert one_window.order == (1, 0) and len(one_window.calls) == 1
    assert one_window.calls[0].start == 0 and one_window.calls[0].end == 2

    def never(messages: list[dict[str, str]], attempt: int = 0) -> str:
        raise AssertionError("no call for an empty list")

    empty = rerank([], never)
    assert empty.order == () and empty.calls == ()


def test_the_walk_uses_the_given_template(tmp_path: Path) -> None:
    raw = json.loads((TEMPLATE_DIR / "rankgpt-listwise.json").read_text(encoding="utf-8"))
    raw["parts"]["system"] = "You rank passages."
    custom = load_template_file(_write(tmp_path, raw))
    assert isinstance(custom, PromptTemplate)
    result = rerank(["a", "b"], reverse_each_window, template=custom)
    assert result.calls[0].messages[0]["content"] == "You rank passages."


def test_failed_parse_is_asked_again_with_the_attempt_number() -> None:
    """A garbage answer is retried (the caller changes seed/temperature by attempt), then kept and reported."""
    attempts: list[int] = []

    def garbage_then_good(messages: list[dict[str, str]], attempt: int = 0) -> str:
        attempts.append(attempt)
        return "I cannot rank these." if attempt == 0 else "[2] > [1]"

    fixed = rerank(["a", "b"], garbage_then_good, parse_retries=2)
    assert attempts == [0, 1]
    assert fixed.order == (1, 0)
    assert fixed.calls[0].attempts == 2 and fixed.failed_calls == 0
    assert fixed.calls[0].attempt_keys == ("key0", "key1") and fixed.calls[0].key == "key1"

    attempts.clear()
    hopeless = rerank(["a", "b"], lambda m, attempt=0: attempts.append(attempt) or "no", parse_retries=2)
    assert attempts == [0, 1, 2]
    assert hopeless.order == (0, 1) and hopeless.failed_calls == 1 and hopeless.calls[0].attempts == 3
    assert hopeless.calls[0].attempt_keys == ("key0", "key1", "key2")  # every attempt's answer, to be marked


def test_retries_sample_with_a_seed_of_their_own() -> None:
    base = SamplingConfig(temperature=0.0, max_tokens=160, seed=None)
    assert retry_sampling(base, 0, 0.7) is base  # the first attempt is the configured call, key unchanged
    assert [retry_sampling(base, a, 0.7).seed for a in (1, 2)] == [1, 2]
    assert retry_sampling(base, 1, 0.7).temperature == 0.7 and retry_sampling(base, 1, 0.7).max_tokens == 160


def test_only_the_windows_that_stayed_unusable_are_marked() -> None:
    passages = [f"p{i}" for i in range(7)]
    marked: list[tuple[str, str]] = []

    class Client:
        def mark_unusable(self, key: str, reason: str) -> bool:
            marked.append((key, reason))
            return True

    # windows (3,7), (1,5), (0,3): the middle one never gets an id it can use, the others parse at once
    def teacher(messages: list[dict[str, str]], attempt: int = 0) -> str:
        return "none" if passages_shown(messages)[0] == "p1" else "[1]"

    walk = rerank(passages, teacher, window=4, step=2, parse_retries=1)
    assert [c.parsed.status for c in walk.calls] == ["repaired", "failed", "repaired"]
    assert mark_failed_windows({"q": walk}, Client(), "listwise", "no usable id in the answer") == 2
    assert marked == [(k, "listwise: no usable id in the answer after 2 attempts") for k in ("key0", "key1")]
