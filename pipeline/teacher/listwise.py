"""Listwise teaching (RankGPT): the permutation prompt, response parsing, the sliding windows over a ranking,
and ``teach``, which walks them (``windows.walk_windows``) over every query of a pool.

All but ``teach`` is pure. Positions are 0-based throughout; only the prompt and the model's answer use
RankGPT's 1-based ``[i]`` identifiers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

from pipeline.teacher.outcome import Pool, TeachOutcome
from pipeline.teacher.templates import PromptTemplate, TemplateError, load_template
from pipeline.teacher.windows import (
    Message,
    WindowWalk,
    mark_failed_windows,
    retry_sampling,
    walk_pool,
    walk_rankings,
    walk_windows,
    window_stats,
    windows_table,
)

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig
    from pipeline.teacher.client import CachedTeacher

# RankGPT's defaults: 20 passages a window, moved by 10, each passage cut to 300 words.
DEFAULT_WINDOW = 20
DEFAULT_STEP = 10
DEFAULT_MAX_WORDS = 300
DEFAULT_TEMPLATE = "rankgpt-listwise"

_INTEGER = re.compile(r"\d+")


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words of ``text``, joined by single spaces.

    Whitespace is normalised even when nothing is cut (as RankGPT does): a passage's newlines would otherwise
    blur the ``[i] passage`` framing of the prompt.

    >>> truncate_words("one  two\\nthree four", 3)
    'one two three'
    >>> truncate_words(" short ", 10)
    'short'
    """
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1 (got {max_words})")
    return " ".join(text.split()[:max_words])


def _require_kind(template: PromptTemplate, kind: str) -> None:
    if template.kind != kind:
        raise TemplateError(f"template {template.name!r} is a {template.kind} template, not {kind}")


def rankgpt_messages(
    template: PromptTemplate, query: str, passages: Sequence[str], max_words: int = DEFAULT_MAX_WORDS
) -> list[Message]:
    """RankGPT's multi-turn chat: system, the task, then one user/assistant exchange per passage (``[1]`` first),
    then the ranking instruction. 3 + 2n + 1 messages for n passages.

    >>> m = rankgpt_messages(load_template("rankgpt-listwise"), "q?", ["alpha beta", "gamma"], max_words=1)
    >>> len(m), [x["role"] for x in m[:3]]
    (8, ['system', 'user', 'assistant'])
    >>> m[3], m[4]
    ({'role': 'user', 'content': '[1] alpha'}, {'role': 'assistant', 'content': 'Received passage [1].'})
    >>> m[-1]["content"][:29]
    'Search Query: q?. \\nRank the 2'
    """
    _require_kind(template, "listwise")
    if not passages:
        raise ValueError("a listwise prompt needs at least one passage")
    num = len(passages)
    messages = [
        {"role": "system", "content": template.render("system")},
        {"role": "user", "content": template.render("prefix_user", num=num, query=query)},
        {"role": "assistant", "content": template.render("prefix_assistant", num=num, query=query)},
    ]
    for i, passage in enumerate(passages, start=1):
        text = truncate_words(passage, max_words)
        messages.append({"role": "user", "content": template.render("passage_user", i=i, passage=text)})
        messages.append({"role": "assistant", "content": template.render("passage_assistant", i=i)})
    messages.append({"role": "user", "content": template.render("final_user", num=num, query=query)})
    return messages


@dataclass(frozen=True)
class ParsedPermutation:
    """A model's ranking answer made into a complete permutation of ``range(n)`` (0-based).

    ``status``: ``ok`` when the answer was a complete permutation as it stood; ``repaired`` when ids were
    dropped (``duplicates``, ``out_of_range``) or appended (``missing``) but at least one id was usable;
    ``failed`` when no id was usable at all (``order`` is then the identity).
    """

    order: tuple[int, ...]
    status: Literal["ok", "repaired", "failed"]
    missing: int = 0
    duplicates: int = 0
    out_of_range: int = 0


def parse_permutation(text: str, n: int) -> ParsedPermutation:
    """Read a ranking such as ``[3] > [1] > [2]`` over ``n`` passages, repairing it as RankGPT/rank_llm do.

    Every integer in the text counts as a 1-based id, whatever surrounds it (brackets, ``>``, commas, prose);
    ids outside ``1..n`` and repeats are dropped, and the ids never mentioned are appended in their original
    order, so a partial answer keeps the model's top picks and leaves the rest where the window had them.

    A complete answer:

    >>> parse_permutation("[3] > [1] > [2]", 3)
    ParsedPermutation(order=(2, 0, 1), status='ok', missing=0, duplicates=0, out_of_range=0)
    >>> parse_permutation("3 > 1 > 2", 3).order
    (2, 0, 1)

    Prose around the ids, and a partial answer (2 is appended):

    >>> parse_permutation("Ranking: [3], [1]", 3)
    ParsedPermutation(order=(2, 0, 1), status='repaired', missing=1, duplicates=0, out_of_range=0)

    Duplicates and out-of-range ids are dropped:

    >>> parse_permutation("[2] > [2] > [9] > [0] > [1]", 3)
    ParsedPermutation(order=(1, 0, 2), status='repaired', missing=1, duplicates=1, out_of_range=2)

    No usable id at all (an empty answer, or only out-of-range numbers) fails to the identity:

    >>> parse_permutation("", 3)
    ParsedPermutation(order=(0, 1, 2), status='failed', missing=3, duplicates=0, out_of_range=0)
    >>> parse_permutation("[7] > [8]", 3).status
    'failed'

    A number in the prose is read as an id too (rank_llm's behaviour): "the 2 best" ranks passage [2] first.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    order: list[int] = []
    seen: set[int] = set()
    duplicates = out_of_range = 0
    for match in _INTEGER.finditer(text):
        index = int(match.group()) - 1
        if not 0 <= index < n:
            out_of_range += 1
        elif index in seen:
            duplicates += 1
        else:
            seen.add(index)
            order.append(index)
    usable = len(order)
    order.extend(i for i in range(n) if i not in seen)
    missing = n - usable
    if usable == 0 and n > 0:
        status: Literal["ok", "repaired", "failed"] = "failed"
    elif missing or duplicates or out_of_range:
        status = "repaired"
    else:
        status = "ok"
    return ParsedPermutation(tuple(order), status, missing, duplicates, out_of_range)


def _check_window(window: int, step: int) -> None:
    if window < 1:
        raise ValueError(f"window must be at least 1 (got {window})")
    # A step larger than the window would leave positions that no window ever sees.
    if not 1 <= step <= window:
        raise ValueError(f"step must be between 1 and the window size {window} (got {step})")


def sliding_windows(n: int, window: int = DEFAULT_WINDOW, step: int = DEFAULT_STEP) -> list[tuple[int, int]]:
    """RankGPT's windows ``(start, end)`` over a ranking of ``n``, from the bottom of the list to the top.

    Each window moves ``step`` positions up; the last one is clipped at 0 and ends the walk, so every position
    is seen and no window repeats a sub-range of the one before it (``(0, 20)`` is not followed by ``(0, 10)``).

    >>> sliding_windows(100, 20, 10)
    [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50), (20, 40), (10, 30), (0, 20)]
    >>> sliding_windows(25, 20, 10)
    [(5, 25), (0, 15)]
    >>> sliding_windows(7, 20, 10), sliding_windows(0, 20, 10)
    ([(0, 7)], [])
    >>> sliding_windows(45, 20, 20)
    [(25, 45), (5, 25), (0, 5)]
    """
    _check_window(window, step)
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    windows: list[tuple[int, int]] = []
    end = n
    while end > 0:
        start = max(end - window, 0)
        windows.append((start, end))
        if start == 0:
            break
        end -= step
    return windows


def teach(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """RankGPT's sliding window over each query's candidates; queries run concurrently (the windows of one in
    turn). A window with no usable id is asked again, sampled (``retry_temperature``, seed + attempt), up to
    ``parse_retries`` times; one still unusable keeps its order, and its answers are marked unusable in the cache.
    """
    cfg = teacher.listwise
    template = load_template(cfg.template)

    def ask(messages: list[Message], n: int, attempt: int) -> tuple[str, str]:
        sampling = retry_sampling(teacher.sampling, attempt, cfg.retry_temperature)
        result = client.complete(messages, sampling_override=sampling)
        return result.text, result.key

    def walk(query: str, passages: list[str]) -> WindowWalk[ParsedPermutation]:
        windows = sliding_windows(len(passages), cfg.window, cfg.step)
        prompt = partial(rankgpt_messages, template, query, max_words=cfg.max_words)
        return walk_windows(passages, windows, prompt, parse_permutation, ask, cfg.parse_retries)

    windows = sum(len(sliding_windows(len(group), cfg.window, cfg.step)) for group in pool.by_query().values())
    walks, stopped = walk_pool(pool, walk, client, "teacher (listwise)", windows=f"{windows}")
    stats = window_stats(walks, f"{template.name}@v{template.version}")
    stats["parse"]["marked_unusable"] = mark_failed_windows(walks, client, "listwise", "no usable id in the answer")
    return TeachOutcome(walk_rankings(pool, walks), stats, stopped, windows_table(walks))
