"""The window walk that listwise and rationale teaching share, and what they share to run it over a pool.

``walk_windows`` asks the teacher about one window of a ranking at a time, bottom to top, applying each answer
to the *current* ranking (RankGPT's sliding window; R2R's chunks are the case ``step == window``). An answer
with nothing usable is asked again, up to ``retries`` times, and the last answer is kept. The walk itself is
pure: it takes the prompt builder, the parser and the function that asks the LLM (``ask``) from its caller, so
it runs the same against the cached client, a test double or a replay of the cache. Positions are 0-based.

Below it, the pool side: ``walk_pool`` walks every query of a ``Pool`` (queries concurrently, the windows of
one in turn), ``walk_rankings`` / ``windows_table`` / ``window_stats`` turn the walks into the stage's tables
and figures, and ``mark_failed_windows`` tells the cache which answers could not be used.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import pandas as pd
from tqdm import tqdm

from pipeline.config import SamplingConfig
from pipeline.teacher.client import BudgetExceeded, CachedTeacher, EndpointDown, TeacherCallError
from pipeline.teacher.outcome import RANKING_COLUMNS, WINDOW_COLUMNS, Pool

T = TypeVar("T")

Message = dict[str, str]
# ask(messages, window_size, attempt) -> (answer text, cache key of the call that gave it). ``window_size`` lets
# the caller build a window's JSON schema; attempt > 0 is a retry after an unusable answer (the caller changes
# the seed or temperature, so the retry is a different cached call with a key of its own).
Ask = Callable[[list[Message], int, int], tuple[str, str]]


class MarksUnusable(Protocol):
    """The client's side of a window that stayed unusable: its answers are marked in the cache (True when an ok
    answer was marked), so that a later run asks again rather than being served them."""

    def mark_unusable(self, key: str, reason: str) -> bool: ...


class ParsedWindow(Protocol):
    """What the walk needs of a parsed answer: a complete permutation of the window (0-based), whether the
    answer was usable (``status`` ``failed``: not, and ``order`` is the identity), and the ids it repaired."""

    @property
    def order(self) -> tuple[int, ...]: ...

    @property
    def status(self) -> str: ...

    @property
    def missing(self) -> int: ...

    @property
    def duplicates(self) -> int: ...

    @property
    def out_of_range(self) -> int: ...


P = TypeVar("P", bound=ParsedWindow)


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


def retry_sampling(base: SamplingConfig, attempt: int, temperature: float) -> SamplingConfig:
    """The sampling of ``attempt``: ``base`` for the first one; a retry samples at ``temperature`` with a seed of
    its own (``base.seed + attempt``), so it is a new call with a new cache key.

    >>> base = SamplingConfig(temperature=0.0, max_tokens=8, seed=3)
    >>> retry = retry_sampling(base, 2, 0.7)
    >>> retry_sampling(base, 0, 0.7) == base, retry.seed, retry.temperature, retry.max_tokens
    (True, 5, 0.7, 8)
    """
    if not attempt:
        return base
    return dataclasses.replace(base, temperature=temperature, seed=(base.seed or 0) + attempt)


@dataclass(frozen=True)
class WindowCall(Generic[P]):
    """One window of the walk: which positions it covered, what was asked, what came back.

    ``passages`` are the input indices in the window in the order they were shown (``[1]`` first);
    ``response`` and ``parsed`` are the last attempt's; ``attempt_keys`` the cache keys of every attempt, first
    to last (all but the last are answers that had nothing usable).

    >>> from pipeline.teacher.listwise import parse_permutation
    >>> call = WindowCall(2, 4, (3, 2), (), "[1] > [2]", parse_permutation("[1] > [2]", 2), ("k0", "k1"))
    >>> call.attempts, call.key, call.identity
    (2, 'k1', True)
    """

    start: int
    end: int
    passages: tuple[int, ...]
    messages: tuple[Message, ...]
    response: str
    parsed: P
    attempt_keys: tuple[str, ...]

    @property
    def attempts(self) -> int:
        """Calls made for this window: 1 + retries after unusable answers."""
        return len(self.attempt_keys)

    @property
    def key(self) -> str:
        """The cache key of the answer kept (the last attempt's)."""
        return self.attempt_keys[-1]

    @property
    def identity(self) -> bool:
        return is_identity(self.parsed.order)


@dataclass(frozen=True)
class WindowWalk(Generic[P]):
    """The teacher's final ranking (``order[r]`` is the input index at rank r) and the windows that made it."""

    order: tuple[int, ...]
    calls: tuple[WindowCall[P], ...]

    @property
    def identity_calls(self) -> int:
        return sum(call.identity for call in self.calls)

    @property
    def failed_calls(self) -> int:
        return sum(call.parsed.status == "failed" for call in self.calls)


def ask_window(
    messages: list[Message], n: int, ask: Ask, parse: Callable[[str, int], P], retries: int
) -> tuple[str, P, tuple[str, ...]]:
    """Ask about one window of ``n`` passages until the answer parses (``retries`` more times at most): the last
    answer, how it parsed, and the keys of every attempt.

    >>> from pipeline.teacher.listwise import parse_permutation
    >>> answers = {0: "no idea", 1: "[2] > [1]"}
    >>> text, parsed, keys = ask_window([], 2, lambda m, n, a: (answers[a], f"k{a}"), parse_permutation, 3)
    >>> text, parsed.order, keys
    ('[2] > [1]', (1, 0), ('k0', 'k1'))
    """
    response, key = ask(messages, n, 0)
    parsed, keys = parse(response, n), [key]
    while parsed.status == "failed" and len(keys) <= retries:
        response, key = ask(messages, n, len(keys))
        parsed = parse(response, n)
        keys.append(key)
    return response, parsed, tuple(keys)


def walk_windows(
    passages: Sequence[str],
    windows: Sequence[tuple[int, int]],
    prompt: Callable[[list[str]], list[Message]],
    parse: Callable[[str, int], P],
    ask: Ask,
    retries: int = 0,
) -> WindowWalk[P]:
    """Rank ``passages`` (in first-stage order) window by window, in the order ``windows`` lists them: each
    window's passages (as they stand now) go through ``prompt`` to ``ask``, each answer through ``parse``, and
    its order is applied to the current ranking.

    A teacher that reverses every window: (1, 4) turns [0, 1, 2, 3] into [0, 3, 2, 1], then (0, 2) swaps the top.

    >>> from pipeline.teacher.listwise import parse_permutation
    >>> reverse = lambda messages, n, attempt: (" > ".join(f"[{i}]" for i in range(n, 0, -1)), "key")
    >>> shown = lambda texts: [{"role": "user", "content": " ".join(texts)}]
    >>> walk = walk_windows(["a", "b", "c", "d"], [(1, 4), (0, 2)], shown, parse_permutation, reverse)
    >>> [(c.start, c.end, c.messages[0]["content"]) for c in walk.calls], walk.order
    ([(1, 4, 'b c d'), (0, 2, 'a d')], (3, 0, 2, 1))
    """
    ranking = list(range(len(passages)))
    calls: list[WindowCall[P]] = []
    for start, end in windows:
        shown = tuple(ranking[start:end])
        messages = prompt([passages[i] for i in shown])
        response, parsed, keys = ask_window(messages, end - start, ask, parse, retries)
        ranking = apply_permutation(ranking, start, end, parsed.order)
        calls.append(WindowCall(start, end, shown, tuple(messages), response, parsed, keys))
    return WindowWalk(tuple(ranking), tuple(calls))


# --- over a pool ------------------------------------------------------------------------------------------------


def run_per_query(
    query_ids: list[str],
    one: Callable[[str], tuple[str, T]],
    client: CachedTeacher,
    desc: str,
    **postfix: object,
) -> tuple[dict[str, T], str | None]:
    """``one(query_id)`` for every query, concurrently up to the endpoint's limit, with a progress bar; a budget
    stop skips the queries it hits and is returned (with the results of the others) instead of raised.

    A query whose call fails does not stop the others (their answers are stored too); the failure is raised at
    the end, as ``EndpointDown`` when the client's breaker stopped calling (the queries after it fail at once)."""
    results: dict[str, T] = {}
    stopped: str | None = None
    failures: list[TeacherCallError] = []
    bar = tqdm(total=len(query_ids), desc=desc, unit=" queries")
    with ThreadPoolExecutor(max_workers=client.endpoint.max_concurrency) as pool_executor:
        futures = [pool_executor.submit(one, query_id) for query_id in query_ids]
        for future in futures:
            try:
                query_id, result = future.result()
            except BudgetExceeded as err:
                stopped = stopped or str(err)
                continue
            except TeacherCallError as err:
                failures.append(err)
                continue
            results[query_id] = result
            counters = client.counters
            bar.set_postfix(calls=counters.calls, cached=counters.cached, **postfix)
            bar.update(1)
    bar.close()
    if failures:
        if any(isinstance(err, EndpointDown) for err in failures):
            raise client.endpoint_down() from failures[0]
        raise TeacherCallError(
            f"{len(failures)} of {len(query_ids)} queries stopped on a failed teacher call (stored as error "
            f"records; a re-run retries only them); the first: {failures[0]}",
            key=failures[0].key,
            cause=failures[0].cause,
        ) from failures[0]
    return results, stopped


def walk_pool(
    pool: Pool,
    walk: Callable[[str, list[str]], WindowWalk[P]],
    client: CachedTeacher,
    desc: str,
    **postfix: object,
) -> tuple[dict[str, WindowWalk[P]], str | None]:
    """``walk(query text, passages)`` for every query of ``pool`` (see ``run_per_query``): the walks by query,
    and why the teacher stopped early (a budget), if it did."""
    groups = pool.by_query()
    texts = pool.texts()

    def one(query_id: str) -> tuple[str, WindowWalk[P]]:
        return query_id, walk(texts[query_id], groups[query_id].passage.tolist())

    return run_per_query(list(groups), one, client, desc, **postfix)


def walk_rankings(pool: Pool, walks: Mapping[str, WindowWalk]) -> pd.DataFrame:
    """The walks' final rankings as labels (query_id, doc_id, teacher_rank, score): a walk ranks, it gives no
    score (null).

    >>> pool = Pool(pd.DataFrame({"query_id": ["q"], "text": [""]}),
    ...             pd.DataFrame({"query_id": "q", "doc_id": ["a", "b"], "rank": [1, 2], "passage": ""}))
    >>> walk_rankings(pool, {"q": WindowWalk((1, 0), ())})[["doc_id", "teacher_rank"]].values.tolist()
    [['b', 1], ['a', 2]]
    """
    groups = pool.by_query()
    rows = []
    for query_id, walk in walks.items():
        doc_ids = groups[query_id].doc_id.tolist()
        for teacher_rank, index in enumerate(walk.order, start=1):
            rows.append((query_id, doc_ids[index], teacher_rank, float("nan")))
    return pd.DataFrame(rows, columns=RANKING_COLUMNS)


def windows_table(walks: Mapping[str, WindowWalk]) -> pd.DataFrame:
    """One row per window asked (``WINDOW_COLUMNS``): how its last answer parsed, and after how many attempts.

    ``missing``/``duplicates``/``out_of_range`` are read from the parsed answers (both parsers count them).
    """
    rows = [
        (
            query_id,
            call.start,
            call.end,
            call.parsed.status,
            call.parsed.missing,
            call.parsed.duplicates,
            call.parsed.out_of_range,
            call.identity,
            call.attempts,
            call.response,
        )
        for query_id, walk in walks.items()
        for call in walk.calls
    ]
    return pd.DataFrame(rows, columns=WINDOW_COLUMNS)


def window_stats(walks: Mapping[str, WindowWalk], template: str) -> dict:
    """The figures every window method reports: windows asked, how their answers parsed, identity windows.

    >>> from pipeline.teacher.listwise import parse_permutation
    >>> calls = (WindowCall(0, 2, (0, 1), (), "", parse_permutation("", 2), ("k0", "k1")),)
    >>> stats = window_stats({"q": WindowWalk((0, 1), calls)}, "t@v1")
    >>> stats["windows"], stats["parse"]["failed"], stats["parse"]["retried_windows"], stats["identity_share"]
    (1, 1, 1, 1.0)
    """
    calls = [call for walk in walks.values() for call in walk.calls]
    parsed = [call.parsed for call in calls]
    status = Counter(p.status for p in parsed)
    identity = sum(call.identity for call in calls)
    return {
        "windows": len(calls),
        "parse": {
            "ok": status["ok"],
            "repaired": status["repaired"],
            "failed": status["failed"],
            "missing_ids": sum(p.missing for p in parsed),
            "duplicate_ids": sum(p.duplicates for p in parsed),
            "out_of_range_ids": sum(p.out_of_range for p in parsed),
            "retried_windows": sum(call.attempts > 1 for call in calls),
        },
        "identity_windows": identity,
        "identity_share": round(identity / len(calls), 4) if calls else None,
        "template": template,
    }


def mark_failed_windows(walks: Mapping[str, WindowWalk], client: MarksUnusable, method: str, problem: str) -> int:
    """Mark every attempt of every window that stayed unusable (status ``failed`` after its retries) in the cache,
    with the reason ``"<method>: <problem> after <n> attempts"``: the number of answers marked.

    >>> from pipeline.teacher.listwise import parse_permutation
    >>> class Client:
    ...     def mark_unusable(self, key, reason):
    ...         print(key, reason)
    ...         return True
    >>> failed = WindowCall(0, 2, (0, 1), (), "?", parse_permutation("?", 2), ("k0", "k1"))
    >>> ok = WindowCall(2, 4, (2, 3), (), "[1]", parse_permutation("[1]", 2), ("k2",))
    >>> mark_failed_windows({"q": WindowWalk((0, 1, 2, 3), (ok, failed))}, Client(), "listwise", "no usable id")
    k0 listwise: no usable id after 2 attempts
    k1 listwise: no usable id after 2 attempts
    2
    """
    marked = 0
    for walk in walks.values():
        for call in walk.calls:
            if call.parsed.status != "failed":
                continue
            reason = f"{method}: {problem} after {call.attempts} attempt{'s' if call.attempts != 1 else ''}"
            marked += sum(bool(client.mark_unusable(key, reason)) for key in call.attempt_keys)
    return marked
