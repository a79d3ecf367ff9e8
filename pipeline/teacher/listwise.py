"""Listwise teaching: RankGPT's permutation prompt, response parsing, and the sliding window over a ranking.

Everything here is pure: the driver ``rerank_sliding_window`` takes the function that sends messages to the
LLM (``ask``) from its caller, so it runs the same against the cached OpenAI client, a test double, or a replay
of the cache. Positions are 0-based throughout; only the prompt and the model's answer use RankGPT's 1-based
``[i]`` identifiers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from pipeline.teacher.templates import PromptTemplate, TemplateError, load_template

T = TypeVar("T")

Message = dict[str, str]
# ask(messages, attempt) -> response text; attempt > 0 is a retry after an unparseable answer (the caller
# changes the seed or temperature, so the retry is a different cached call).
Ask = Callable[[list[Message], int], str]

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


def is_identity(order: Sequence[int]) -> bool:
    """Whether ``order`` leaves its window as it was (a weak teacher's typical answer).

    >>> is_identity((0, 1, 2)), is_identity((1, 0, 2)), is_identity(())
    (True, False, True)
    """
    return all(position == index for position, index in enumerate(order))


def apply_permutation(ranking: Sequence[T], start: int, end: int, order: Sequence[int]) -> list[T]:
    """A copy of ``ranking`` with ``ranking[start:end]`` reordered: ``order[j]`` is the window position (0-based)
    of the item that goes to position ``start + j``.

    >>> apply_permutation(["a", "b", "c", "d", "e"], 1, 4, (2, 0, 1))
    ['a', 'd', 'b', 'c', 'e']
    """
    if not 0 <= start <= end <= len(ranking):
        raise ValueError(f"window [{start}, {end}) does not fit a ranking of {len(ranking)}")
    if sorted(order) != list(range(end - start)):
        raise ValueError(f"order {tuple(order)} is not a permutation of range({end - start})")
    window = ranking[start:end]
    return [*ranking[:start], *(window[j] for j in order), *ranking[end:]]


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


def count_rankgpt_calls(n: int, window: int = DEFAULT_WINDOW, step: int = DEFAULT_STEP) -> int:
    """The LLM calls RankGPT's published sliding window makes for one query of ``n`` candidates.

    This replays the loop of rank_llm (castorini's maintained RankGPT code) rather than deriving a formula, so
    that its quirks count too: ``while end > 0 and start + step != 0``, each window clipped at 0. It agrees with
    ``sliding_windows`` except when ``n == window - step``, where its stop test fires before the first window
    and it asks nothing. (The paper's own ``rank_gpt.py`` loop, ``while start >= 0``, also skips the clipped
    top window: 1 call for n=25, leaving ranks 1-5 unseen; rank_llm fixed that.)

    >>> count_rankgpt_calls(100, 20, 10), count_rankgpt_calls(25, 20, 10), count_rankgpt_calls(20, 20, 10)
    (9, 2, 1)
    >>> count_rankgpt_calls(10, 20, 10), len(sliding_windows(10, 20, 10))
    (0, 1)
    """
    _check_window(window, step)
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    calls, start, end = 0, n - window, n
    while end > 0 and start + step != 0:
        calls += 1
        start, end = max(start, 0) - step, end - step
    return calls


@dataclass(frozen=True)
class WindowCall:
    """One LLM call of the sliding window: which positions it covered, what was asked, what came back.

    ``passages`` are the input indices in the window in the order they were shown (``[1]`` first).
    """

    start: int
    end: int
    passages: tuple[int, ...]
    messages: tuple[Message, ...]
    response: str
    parsed: ParsedPermutation
    identity: bool
    attempts: int = 1  # calls made for this window: 1 + retries after unparseable answers


@dataclass(frozen=True)
class ListwiseResult:
    """The teacher's final ranking (``order[r]`` is the input index at rank r) and the calls that made it."""

    order: tuple[int, ...]
    calls: tuple[WindowCall, ...]

    @property
    def identity_calls(self) -> int:
        return sum(call.identity for call in self.calls)

    @property
    def failed_calls(self) -> int:
        return sum(call.parsed.status == "failed" for call in self.calls)


def rerank_sliding_window(
    query: str,
    passages: Sequence[str],
    ask: Ask,
    window: int = DEFAULT_WINDOW,
    step: int = DEFAULT_STEP,
    max_words: int = DEFAULT_MAX_WORDS,
    template: PromptTemplate | None = None,
    parse_retries: int = 0,
) -> ListwiseResult:
    """Rerank ``passages`` (in first-stage order) with RankGPT's sliding window, asking ``ask`` once a window
    (and up to ``parse_retries`` more times when an answer has no usable id; the last answer is kept).

    Windows go bottom to top and each is applied to the *current* ranking, as RankGPT does, so a passage the
    model likes can climb several windows in one pass.

    A model that reverses every window: (1, 4) turns [0, 1, 2, 3] into [0, 3, 2, 1], then (0, 2) swaps the top.

    >>> reverse = lambda messages, attempt: " > ".join(f"[{i}]" for i in range((len(messages) - 4) // 2, 0, -1))
    >>> result = rerank_sliding_window("q", ["a", "b", "c", "d"], reverse, window=3, step=2)
    >>> [(c.start, c.end) for c in result.calls], result.order
    ([(1, 4), (0, 2)], (3, 0, 2, 1))
    """
    template = template or load_template(DEFAULT_TEMPLATE)
    ranking = list(range(len(passages)))
    calls: list[WindowCall] = []
    for start, end in sliding_windows(len(passages), window, step):
        shown = tuple(ranking[start:end])
        messages = rankgpt_messages(template, query, [passages[i] for i in shown], max_words)
        attempt = 0
        response = ask(messages, attempt)
        parsed = parse_permutation(response, end - start)
        while parsed.status == "failed" and attempt < parse_retries:
            attempt += 1
            response = ask(messages, attempt)
            parsed = parse_permutation(response, end - start)
        ranking = apply_permutation(ranking, start, end, parsed.order)
        identity = is_identity(parsed.order)
        calls.append(WindowCall(start, end, shown, tuple(messages), response, parsed, identity, attempt + 1))
    return ListwiseResult(tuple(ranking), tuple(calls))
