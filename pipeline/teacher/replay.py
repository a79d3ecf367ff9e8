"""The replaying teacher (``teacher.backend: replay``): an OpenAI-compatible server on 127.0.0.1 that answers each
listwise prompt with the permutation a recorded ranking implies for the passages of that window.

A recorded ranking (a TREC run or rank_llm's JSON, e.g. ``trec-dl-2019/teachers/rankgpt-gpt-3.5-turbo.bm25.trec``)
says how a real LLM ordered a query's candidates. Asked about a window of them, the replaying teacher reads the
query and the passages back out of the prompt (with the template that wrote it), finds which candidates they are,
and answers ``[3] > [1] > ...`` in the order the recording ranks them. Tests, benches and demos then exercise the
whole teacher path (the ``openai`` client, retries, the call cache, the window walk, the labels) with a real
teacher's decisions and no API key, and ``fault_rate`` makes the server misbehave as a real endpoint does.

What the recording cannot answer is answered as a teacher with no opinion would, and counted (``ReplayStats``):
a query it does not know keeps its window's order; a passage it did not rank goes after the ones it did, in the
window's order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import string
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import EndpointConfig, ReplayConfig
from pipeline.teacher.chat_server import OpenAIServer
from pipeline.teacher.imported import file_hash, import_rankings
from pipeline.teacher.outcome import Pool
from pipeline.teacher.templates import PromptTemplate

log = logging.getLogger(__name__)

# the rank of a candidate the recording did not rank: after every ranked one
UNRANKED = 1 << 30
# what each placeholder of a listwise template can render to
_PLACEHOLDER_PATTERNS = {"num": r"\d+", "i": r"\d+", "query": r".*?", "passage": r".*?"}


class ReplayError(ValueError):
    """A prompt the replaying teacher cannot read, or a recording it cannot serve."""


def template_pattern(text: str) -> re.Pattern[str]:
    """A regex matching what ``text.format(...)`` renders, each placeholder a named group (a repeated one must
    render the same both times).

    >>> p = template_pattern("Search Query: {query}. Rank the {num} passages ({query})")
    >>> m = p.fullmatch("Search Query: bees?. Rank the 3 passages (bees?)")
    >>> m.group("query"), m.group("num")
    ('bees?', '3')
    >>> p.fullmatch("Search Query: bees?. Rank the 3 passages (ants)") is None
    True
    """
    parts: list[str] = []
    seen: set[str] = set()
    for literal, name, _spec, _conversion in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            parts.append(f"(?P={name})")
        else:
            seen.add(name)
            parts.append(f"(?P<{name}>{_PLACEHOLDER_PATTERNS.get(name, '.*?')})")
    return re.compile("".join(parts), re.DOTALL)


def normalise(text: str) -> str:
    """Whitespace collapsed to single spaces, as ``listwise.truncate_words`` writes passages into a prompt.

    >>> normalise("  a\\n b  ")
    'a b'
    """
    return " ".join(text.split())


@dataclass(frozen=True)
class ListwisePromptReader:
    """Reads a listwise prompt written with ``template`` back into its query and its passages (in prompt order)."""

    template: PromptTemplate

    def __post_init__(self) -> None:
        if self.template.kind != "listwise":
            raise ReplayError(f"template {self.template.name!r} is a {self.template.kind} template, not listwise")

    def read(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
        """The query and the passages of a chat written by ``listwise.rankgpt_messages``.

        >>> from pipeline.teacher.listwise import rankgpt_messages
        >>> from pipeline.teacher.templates import load_template
        >>> t = load_template("rankgpt-listwise")
        >>> ListwisePromptReader(t).read(rankgpt_messages(t, "why? ok", ["alpha beta", "gamma"], max_words=1))
        ('why? ok', ['alpha', 'gamma'])
        >>> ListwisePromptReader(t).read([{"role": "user", "content": "Write a query."}])
        Traceback (most recent call last):
        ...
        pipeline.teacher.replay.ReplayError: not a 'rankgpt-listwise' prompt: its last user message is not the ...
        """
        users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        final = template_pattern(self.template.part("final_user")).fullmatch(users[-1]) if users else None
        if final is None:
            raise ReplayError(
                f"not a {self.template.name!r} prompt: its last user message is not the ranking instruction"
            )
        passage = template_pattern(self.template.part("passage_user"))
        numbered: dict[int, str] = {}
        for content in users[:-1]:
            match = passage.fullmatch(content)
            if match is not None:
                numbered[int(match.group("i"))] = match.group("passage")
        expected = int(final.group("num"))
        if sorted(numbered) != list(range(1, expected + 1)):
            raise ReplayError(
                f"a {self.template.name!r} prompt announces {expected} passages but holds {sorted(numbered)}"
            )
        return final.group("query"), [numbered[i] for i in range(1, expected + 1)]


@dataclass
class ReplayStats:
    """What the replaying teacher answered from the recording, and what it could not."""

    windows: int = 0
    unknown_queries: int = 0  # windows whose query the pool does not have (answered in the window's order)
    unrecorded_queries: int = 0  # windows of a known query that the recording has no ranking for
    unknown_passages: int = 0  # passages no candidate of the query matches
    unranked_passages: int = 0  # candidates the recording did not rank for that query
    unreadable: int = 0  # requests that were not a listwise prompt of the template

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class RecordedRanking:
    """A recorded ranking over a pool: which candidate each prompt passage is, and where the recording ranks it.

    >>> pool = Pool(pd.DataFrame({"query_id": ["q"], "text": ["bees"]}),
    ...             pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "c"], "rank": [1, 2, 3],
    ...                           "passage": ["Bees  dance", "bees sting a lot", "honey"]}))
    >>> book = RecordedRanking.over(pool, pd.DataFrame({"query_id": "q", "doc_id": ["c", "a"], "teacher_rank": [1, 2]}))
    >>> book.permutation("bees", ["Bees dance", "bees sting", "honey"])
    [3, 1, 2]
    >>> book.permutation("ants", ["x", "y"]), book.stats.unknown_queries, book.stats.unranked_passages
    ([1, 2], 1, 1)
    """

    passages: dict[str, list[tuple[str, str]]]  # query id → (normalised passage, doc id) of its candidates
    query_ids: dict[str, list[str]]  # normalised query text → query ids
    ranks: dict[str, dict[str, int]]  # query id → doc id → the recording's rank
    stats: ReplayStats = field(default_factory=ReplayStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def over(cls, pool: Pool, rankings: pd.DataFrame) -> RecordedRanking:
        """``rankings`` (query_id, doc_id, teacher_rank) as answers about ``pool``'s candidates."""
        passages: dict[str, list[tuple[str, str]]] = {}
        for query_id, doc_id, passage in zip(
            pool.candidates.query_id, pool.candidates.doc_id, pool.candidates.passage, strict=True
        ):
            passages.setdefault(str(query_id), []).append((normalise(str(passage)), str(doc_id)))
        query_ids: dict[str, list[str]] = {}
        for query_id, text in pool.texts().items():
            query_ids.setdefault(normalise(text), []).append(str(query_id))
        ranks: dict[str, dict[str, int]] = {}
        for query_id, doc_id, rank in zip(rankings.query_id, rankings.doc_id, rankings.teacher_rank, strict=True):
            ranks.setdefault(str(query_id), {}).setdefault(str(doc_id), int(rank))
        return cls(passages, query_ids, ranks)

    def _query_id(self, query: str) -> str | None:
        candidates = self.query_ids.get(normalise(query), [])
        recorded = [q for q in candidates if q in self.ranks]
        return (recorded or candidates or [None])[0]

    def _doc_id(self, query_id: str, passage: str, ranks: Mapping[str, int]) -> str | None:
        """The candidate a prompt passage is (it is its first words); of identical ones, the best recorded."""
        shown = normalise(passage)
        matches = [
            doc_id for text, doc_id in self.passages.get(query_id, []) if text == shown or text.startswith(shown + " ")
        ]
        return min(matches, key=lambda d: ranks.get(d, UNRANKED)) if matches else None

    def permutation(self, query: str, passages: Sequence[str]) -> list[int]:
        """The 1-based prompt positions, best first, as the recording orders them; what it did not rank follows in
        the window's order."""
        with self._lock:
            self.stats.windows += 1
        identity = list(range(1, len(passages) + 1))
        query_id = self._query_id(query)
        if query_id is None or query_id not in self.ranks:
            with self._lock:
                if query_id is None:
                    self.stats.unknown_queries += 1
                else:
                    self.stats.unrecorded_queries += 1
            return identity
        ranks = self.ranks[query_id]
        doc_ids = [self._doc_id(query_id, p, ranks) for p in passages]
        unknown = sum(d is None for d in doc_ids)
        unranked = sum(d is not None and d not in ranks for d in doc_ids)
        with self._lock:
            self.stats.unknown_passages += unknown
            self.stats.unranked_passages += unranked
        return sorted(identity, key=lambda i: (ranks.get(doc_ids[i - 1] or "", UNRANKED), i))

    def responder(self, template: PromptTemplate) -> Any:
        """The chat server's responder: a listwise chat body → RankGPT's answer (``[2] > [1] > ...``)."""
        reader = ListwisePromptReader(template)

        def answer(body: dict[str, Any]) -> str:
            try:
                query, passages = reader.read(body.get("messages") or [])
            except ReplayError:
                with self._lock:
                    self.stats.unreadable += 1
                raise
            return " > ".join(f"[{i}]" for i in self.permutation(query, passages))

        return answer


def _recording_path(cfg: ReplayConfig) -> Path:
    if cfg.path is None:  # params.yaml is checked for it; a ReplayConfig built in code may lack it
        raise ReplayError("teacher.replay.path: backend 'replay' needs the recorded ranking file")
    return Path(cfg.path)


def replay_model_name(cfg: ReplayConfig) -> str:
    """The name the replayed teacher's calls are cached and labelled under: the file and its content's hash, so a
    changed recording is never served from answers replayed from the old one (nor mixed with a live model's)."""
    path = _recording_path(cfg)
    return cfg.model_name or f"replay:{path.name}@{file_hash(path)[:12]}"


@dataclass(frozen=True)
class ReplayRun:
    """A running replay server: where it listens, what it answered from the recording, the faults it injected."""

    base_url: str
    recording: RecordedRanking
    server: OpenAIServer

    def endpoint(self) -> EndpointConfig:
        """Where to call it, under the recording's model name (no key; its threads answer concurrently)."""
        return EndpointConfig(base_url=self.base_url, model=self.server.model, api_key_env=None)

    def summary(self) -> dict[str, Any]:
        """The figures a run reports: requests, windows answered, what the recording lacked, faults by kind."""
        return {
            "requests": self.server.total,
            **self.recording.stats.as_dict(),
            "faults_injected": dict(sorted(self.server.injected.items())),
        }


@contextlib.contextmanager
def replay_server(cfg: ReplayConfig, template: PromptTemplate, pool: Pool) -> Iterator[ReplayRun]:
    """Serve ``cfg.path``'s rankings of ``pool``'s candidates on 127.0.0.1 for as long as the context lasts."""
    rankings, _, _ = import_rankings(_recording_path(cfg), cfg.format)
    recording = RecordedRanking.over(pool, rankings)
    server = OpenAIServer(
        recording.responder(template),
        fault_rate=cfg.fault_rate,
        random_faults=cfg.faults,
        seed=cfg.seed,
        model=replay_model_name(cfg),
        keep_requests=False,
    )
    with server:
        yield ReplayRun(server.base_url, recording, server)
    stats = recording.stats
    lacking = stats.unknown_queries + stats.unrecorded_queries + stats.unknown_passages + stats.unranked_passages
    if lacking or stats.unreadable:
        log.warning(
            "replay of %s: %d windows; %d of unknown queries and %d of queries it has no ranking for (answered in "
            "the window's order), %d passages matching no candidate, %d candidates it did not rank (put last), "
            "%d unreadable prompts",
            cfg.path,
            stats.windows,
            stats.unknown_queries,
            stats.unrecorded_queries,
            stats.unknown_passages,
            stats.unranked_passages,
            stats.unreadable,
        )
