"""Reason-to-Rank rationales: the teacher ranks a window of passages and explains every one of them, as JSON.

R2R (arXiv 2410.05168) asks the teacher, for each passage of a window, for a *direct* reason (how the passage
addresses the query, with the answer sentence it found) and a *comparative* reason (why it ranks above or
below the others). The answer this module asks for and reads is one JSON object::

    {"ranking": [3, 1, 2],
     "passages": [{"id": 3, "direct_reason": "...", "answer_sentence": "..." or null, "comparative_reason": "..."}]}

with the window's 1-based ``[i]`` identifiers. ``teach`` walks a pool's queries window by window with it (the
walk is ``windows.walk_windows``, as for listwise); all the rest here is pure. Positions are 0-based.

Reading is forgiving, because small models break JSON: ``json.loads`` first, then the ``json_repair`` library
(truncated answers, trailing commas, code fences, prose around the object); ids are checked against the window
(out-of-range ones and repeats dropped, missing ones appended in window order, as ``parse_permutation`` does).
An ``answer_sentence`` is kept exactly as given: whether it really is in the passage is checked later.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import json_repair
import pandas as pd

from pipeline.teacher.listwise import rankgpt_messages
from pipeline.teacher.outcome import RATIONALE_COLUMNS, Pool, TeachOutcome
from pipeline.teacher.templates import PromptTemplate, load_template
from pipeline.teacher.windows import (
    Message,
    WindowCall,
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

DEFAULT_TEMPLATE = "r2r-rationales"
# R2R's windows: 5 passages, not overlapping.
DEFAULT_WINDOW = 5
DEFAULT_STEP = 5
FIELDS = ("direct_reason", "answer_sentence", "comparative_reason")

Status = Literal["ok", "repaired", "failed"]

_INTEGER = re.compile(r"\d+")


def rationale_schema(n: int) -> dict[str, Any]:
    """The JSON schema of an answer for a window of ``n`` passages (ids 1..n, exactly n of each list).

    It follows OpenAI's strict structured outputs (every property required, no additional ones; a nullable
    ``answer_sentence`` as a type union), which llama.cpp's server also turns into a decoding grammar.

    >>> s = rationale_schema(2)
    >>> s["required"], s["properties"]["ranking"]["items"]["enum"], s["properties"]["ranking"]["maxItems"]
    (['ranking', 'passages'], [1, 2], 2)
    >>> s["properties"]["passages"]["items"]["properties"]["answer_sentence"]
    {'type': ['string', 'null']}
    """
    if n < 1:
        raise ValueError(f"a window needs at least one passage (got {n})")
    ids = list(range(1, n + 1))
    passage = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "enum": ids},
            "direct_reason": {"type": "string"},
            "answer_sentence": {"type": ["string", "null"]},
            "comparative_reason": {"type": "string"},
        },
        "required": ["id", *FIELDS],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "ranking": {"type": "array", "items": {"type": "integer", "enum": ids}, "minItems": n, "maxItems": n},
            "passages": {"type": "array", "items": passage, "minItems": n, "maxItems": n},
        },
        "required": ["ranking", "passages"],
        "additionalProperties": False,
    }


def rationale_response_format(n: int) -> dict[str, Any]:
    """The OpenAI ``response_format`` that constrains an answer to ``rationale_schema(n)``.

    >>> f = rationale_response_format(3)
    >>> f["type"], f["json_schema"]["name"], f["json_schema"]["strict"]
    ('json_schema', 'r2r_rationales', True)
    """
    return {
        "type": "json_schema",
        "json_schema": {"name": "r2r_rationales", "strict": True, "schema": rationale_schema(n)},
    }


def rationale_messages(template: PromptTemplate, query: str, passages: Sequence[str], max_words: int) -> list[Message]:
    """The prompt: RankGPT's multi-turn layout (one exchange per passage) with R2R's JSON instruction at the end.

    >>> m = rationale_messages(load_template("r2r-rationales"), "q?", ["alpha beta", "gamma"], max_words=1)
    >>> len(m), m[3]["content"], '"direct_reason"' in m[-1]["content"]
    (8, '[1] alpha', True)
    """
    return rankgpt_messages(template, query, passages, max_words)


@dataclass(frozen=True)
class PassageRationale:
    """What the teacher said about one passage. A reason it left out is ``""`` (counted, not invented)."""

    direct_reason: str
    answer_sentence: str | None
    comparative_reason: str


@dataclass(frozen=True)
class ParsedRationales:
    """A window's answer, read and repaired.

    ``order``: a complete permutation of the window's positions (0-based), best first. ``rationales``: window
    position -> its reasons (positions the answer did not explain are absent). ``json_status``: how the JSON
    was read (``ok`` as it stood, ``repaired`` by json_repair, ``failed`` unreadable). ``status``: ``failed``
    when nothing usable came back (no id in the ranking and no explained passage; ``order`` is then the
    identity), ``repaired`` when anything had to be fixed or was missing, else ``ok``. Empty reasons do not
    change the status; ``empty_reasons`` counts them.
    """

    order: tuple[int, ...]
    rationales: Mapping[int, PassageRationale]
    status: Status
    json_status: Status
    missing: int = 0  # window ids the ranking left out (appended in window order)
    duplicates: int = 0  # repeated ids in the ranking
    out_of_range: int = 0  # ids outside 1..n in the ranking
    ranking_from_passages: bool = False  # no usable "ranking": the order of the "passages" entries was used
    missing_rationales: int = 0  # window passages with no entry in "passages"
    dropped_entries: int = 0  # entries with no usable id, or a second entry for one id
    missing_fields: int = 0  # fields absent from an entry (a missing answer_sentence included)
    empty_reasons: int = 0  # direct or comparative reasons given as empty strings (or missing)
    answer_sentences: int = 0  # entries with a non-empty answer sentence
    notes: tuple[str, ...] = field(default=())


def read_json(text: str) -> tuple[Any, Status]:
    """The JSON value in ``text`` and how it was read: ``json.loads``, else ``json_repair``; ``failed`` when
    neither gives an object or an array.

    >>> read_json('{"ranking": [2, 1]}')
    ({'ranking': [2, 1]}, 'ok')
    >>> read_json('Here you go: ```json\\n{"ranking": [2, 1],}\\n```')
    ({'ranking': [2, 1]}, 'repaired')
    >>> read_json('{"ranking": [2, 1], "passages": [{"id": 2, "direct_reason": "cut sh')[1]
    'repaired'
    >>> read_json("I cannot rank these."), read_json('"just a string"')
    ((None, 'failed'), (None, 'failed'))
    """
    try:
        value = json.loads(text)
        status: Status = "ok"
    except ValueError:
        try:
            value = json_repair.loads(text)
        except Exception:  # a repair library on arbitrary model text: any failure of it means unreadable
            return None, "failed"
        status = "repaired"
    if not isinstance(value, dict | list) or not value:
        return None, "failed"
    return value, status


def _id_index(value: object) -> int | None:
    """A 0-based index from an id as models write it: ``2``, ``"2"``, ``"[2]"``, ``"passage 2"``, ``2.0``.

    >>> [_id_index(v) for v in (2, "2", "[2]", "passage 2", 2.0, True, "x", None)]
    [1, 1, 1, 1, 1, None, None, None]
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value - 1
    if isinstance(value, float) and value.is_integer():
        return int(value) - 1
    if isinstance(value, str):
        match = _INTEGER.search(value)
        return int(match.group()) - 1 if match else None
    return None


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_rationales(text: str, n: int) -> ParsedRationales:
    """Read a window's answer over ``n`` passages (see ``ParsedRationales`` for what is counted).

    A complete answer:

    >>> good = ('{"ranking": [2, 1], "passages": [{"id": 2, "direct_reason": "d2", "answer_sentence": "s2", '
    ...         '"comparative_reason": "c2"}, {"id": 1, "direct_reason": "d1", "answer_sentence": null, '
    ...         '"comparative_reason": "c1"}]}')
    >>> p = parse_rationales(good, 2)
    >>> p.order, p.status, p.json_status, p.rationales[1].answer_sentence, p.rationales[0].answer_sentence
    ((1, 0), 'ok', 'ok', 's2', None)

    A partial one (passage 3 neither ranked nor explained; no comparative reason for 1):

    >>> p = parse_rationales('{"ranking": [2, 1], "passages": [{"id": 1, "direct_reason": "d1"}]}', 3)
    >>> p.order, p.status, p.missing, p.missing_rationales, p.missing_fields, p.empty_reasons
    ((1, 0, 2), 'repaired', 1, 2, 2, 1)

    Nothing usable: the window keeps its order.

    >>> p = parse_rationales("I think passage two is best.", 3)
    >>> p.order, p.status, p.json_status
    ((0, 1, 2), 'failed', 'failed')
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    value, json_status = read_json(text)
    notes: list[str] = []
    if isinstance(value, list):  # a bare array: either the ranking or the passages' entries
        value = {"passages": value} if any(isinstance(v, dict) for v in value) else {"ranking": value}
        notes.append("top-level array")
    if not isinstance(value, dict):
        return ParsedRationales(tuple(range(n)), {}, "failed", "failed", missing=n, missing_rationales=n)

    # --- the entries: one per passage, the first one for an id wins
    raw_entries = value.get("passages")
    if isinstance(raw_entries, dict):  # {"1": {...}, "2": {...}}: ids as keys
        raw_entries = [{"id": k, **v} for k, v in raw_entries.items() if isinstance(v, dict)]
        notes.append("passages keyed by id")
    entries: dict[int, PassageRationale] = {}
    entry_order: list[int] = []
    dropped = missing_fields = empty = answers = 0
    for entry in raw_entries if isinstance(raw_entries, list) else []:
        index = _id_index(entry.get("id", entry.get("passage_id"))) if isinstance(entry, dict) else None
        if index is None or not 0 <= index < n or index in entries:
            dropped += 1
            continue
        assert isinstance(entry, dict)
        missing_fields += sum(name not in entry for name in FIELDS)
        direct, comparative = _text(entry.get("direct_reason")), _text(entry.get("comparative_reason"))
        answer = entry.get("answer_sentence")
        answer_text = None if answer is None else _text(answer)  # kept as given: checked against the passage later
        empty += (not direct.strip()) + (not comparative.strip())
        answers += bool(answer_text and answer_text.strip())
        entries[index] = PassageRationale(direct, answer_text, comparative)
        entry_order.append(index)

    # --- the ranking: the "ranking" list (or a "[2] > [1]" string), else the order of the entries
    ranking = value.get("ranking")
    if isinstance(ranking, str):
        ranking = _INTEGER.findall(ranking)
    ids = [_id_index(v) for v in ranking] if isinstance(ranking, list) else []
    from_passages = not any(i is not None and 0 <= i < n for i in ids) and bool(entry_order)
    order: list[int] = []
    duplicates = out_of_range = 0
    if from_passages:
        order = list(entry_order)
    else:
        for index in ids:
            if index is None or not 0 <= index < n:
                out_of_range += 1
            elif index in order:
                duplicates += 1
            else:
                order.append(index)
    usable = len(order)
    order.extend(i for i in range(n) if i not in order)
    missing = n - usable
    missing_rationales = n - len(entries)

    if (usable == 0 and n > 0) or json_status == "failed":
        status: Status = "failed"
    elif (
        json_status == "repaired"
        or missing
        or duplicates
        or out_of_range
        or from_passages
        or missing_rationales
        or dropped
        or missing_fields
    ):
        status = "repaired"
    else:
        status = "ok"
    return ParsedRationales(
        order=tuple(order),
        rationales=entries,
        status=status,
        json_status=json_status,
        missing=missing,
        duplicates=duplicates,
        out_of_range=out_of_range,
        ranking_from_passages=from_passages,
        missing_rationales=missing_rationales,
        dropped_entries=dropped,
        missing_fields=missing_fields,
        empty_reasons=empty,
        answer_sentences=answers,
        notes=tuple(notes),
    )


def rationale_windows(n: int, window: int = DEFAULT_WINDOW, step: int = DEFAULT_STEP) -> list[tuple[int, int]]:
    """The windows ``(start, end)`` over ``n`` passages, anchored at the top (R2R's chunks: the first-stage top
    ``window`` passages are judged together), in the order they are asked: bottom first, as RankGPT walks,
    so that overlapping windows (``step < window``) let a passage climb. The last window may be short.

    >>> rationale_windows(12, 5, 5)
    [(10, 12), (5, 10), (0, 5)]
    >>> rationale_windows(7, 5, 3), rationale_windows(5, 5, 5), rationale_windows(0, 5, 5)
    ([(3, 7), (0, 5)], [(0, 5)], [])
    """
    if window < 1 or not 1 <= step <= window:
        raise ValueError(f"need 1 <= step <= window (got window {window}, step {step})")
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    windows = []
    start = 0
    while start < n:
        end = min(start + window, n)
        windows.append((start, end))
        if end == n:
            break
        start += step
    return windows[::-1]


def ranked_window(call: WindowCall[ParsedRationales]) -> list[tuple[int, int, PassageRationale | None]]:
    """A window's ``(input index, rank in the window (1-based), its reasons or None)``, best first.

    >>> p = parse_rationales('{"ranking": [2, 1], "passages": [{"id": 2, "direct_reason": "d"}]}', 2)
    >>> [(i, r, x and x.direct_reason) for i, r, x in ranked_window(WindowCall(0, 2, (7, 9), (), "", p, ("k",)))]
    [(9, 1, 'd'), (7, 2, None)]
    """
    reasons = call.parsed.rationales
    return [(call.passages[j], rank, reasons.get(j)) for rank, j in enumerate(call.parsed.order, start=1)]


def rationale_rows(pool: Pool, walks: Mapping[str, WindowWalk[ParsedRationales]]) -> pd.DataFrame:
    """Two rows (``RATIONALE_COLUMNS``) per explained passage of every window: its direct reason (with the answer
    sentence) and its comparative one (with the other documents of the window, in the teacher's order)."""
    groups = pool.by_query()
    rows = []
    for query_id, walk in walks.items():
        doc_ids = groups[query_id].doc_id.tolist()
        for call in walk.calls:
            ranked = ranked_window(call)
            window_docs = [doc_ids[index] for index, _, _ in ranked]  # the window, in the teacher's order
            for index, window_rank, reasons in ranked:
                if reasons is None:  # not explained: no rows (teacher_explained shows it with null reasons)
                    continue
                doc_id, others = doc_ids[index], [d for d in window_docs if d != doc_ids[index]]
                common = (window_rank, call.parsed.status, call.key)
                rows.append((query_id, doc_id, "direct", reasons.direct_reason, reasons.answer_sentence, [], *common))
                rows.append((query_id, doc_id, "comparative", reasons.comparative_reason, None, others, *common))
    return pd.DataFrame(rows, columns=RATIONALE_COLUMNS)


def rationale_stats(walks: Mapping[str, WindowWalk[ParsedRationales]], template: str, json_schema: bool) -> dict:
    """``window_stats`` with how the JSON was read and what the rationales lacked."""
    parsed = [call.parsed for walk in walks.values() for call in walk.calls]
    json_status = Counter(p.json_status for p in parsed)
    stats = window_stats(walks, template)
    stats["parse"].update(
        json_ok=json_status["ok"],
        json_repaired=json_status["repaired"],
        json_failed=json_status["failed"],
        ranking_from_passages=sum(p.ranking_from_passages for p in parsed),
    )
    stats["rationales"] = {
        "passages_explained": sum(len(p.rationales) for p in parsed),
        "passages_unexplained": sum(p.missing_rationales for p in parsed),
        "dropped_entries": sum(p.dropped_entries for p in parsed),
        "missing_fields": sum(p.missing_fields for p in parsed),
        "empty_reasons": sum(p.empty_reasons for p in parsed),
        "answer_sentences": sum(p.answer_sentences for p in parsed),
    }
    stats["json_schema"] = json_schema
    return stats


def teach(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """Reason-to-Rank: each query's candidates in windows (R2R: 5, not overlapping), each window ranked with a
    direct and a comparative reason for every passage. With non-overlapping windows the final ranking is every
    window's ranking, the windows concatenated in first-stage order (the teacher never compares passages of two
    windows, so no cross-window order is invented). Queries run concurrently, the windows of one in turn.

    The answer is constrained by a JSON schema (``response_format``) unless ``use_json_schema`` is off, and read
    forgivingly anyway (json_repair); a window with nothing usable is asked again with a new seed, and one that
    stays so keeps its order and has its answers marked unusable in the cache.
    """
    cfg = teacher.rationales
    template = load_template(cfg.template)
    base = dataclasses.replace(teacher.sampling, max_tokens=cfg.max_tokens)

    def ask(messages: list[Message], n: int, attempt: int) -> tuple[str, str]:
        response_format = rationale_response_format(n) if cfg.use_json_schema else None
        sampling = retry_sampling(base, attempt, cfg.retry_temperature)
        result = client.complete(messages, sampling_override=sampling, response_format=response_format)
        return result.text, result.key

    def walk(query: str, passages: list[str]) -> WindowWalk[ParsedRationales]:
        windows = rationale_windows(len(passages), cfg.window, cfg.step)
        prompt = partial(rationale_messages, template, query, max_words=cfg.max_words)
        return walk_windows(passages, windows, prompt, parse_rationales, ask, cfg.parse_retries)

    walks, stopped = walk_pool(pool, walk, client, "teacher (rationales)")
    stats = rationale_stats(walks, f"{template.name}@v{template.version}", cfg.use_json_schema)
    stats["parse"]["marked_unusable"] = mark_failed_windows(
        walks, client, "rationales", "no usable id or rationale in the answer"
    )
    return TeachOutcome(walk_rankings(pool, walks), stats, stopped, windows_table(walks), rationale_rows(pool, walks))
