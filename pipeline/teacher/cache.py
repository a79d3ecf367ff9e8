"""The teacher call cache: every completed LLM call, keyed by what determines its answer, kept forever.

It is the most valuable artifact of the pipeline (it holds what was paid for), so it is built to survive a
kill at any moment and to be read by anything:

- Storage is append-only JSONL *shards* in one folder, one shard per writing process
  (``calls-<utc timestamp>-<pid>-<random>.jsonl``), one JSON object per completed call, each written with
  ``flush()`` + ``os.fsync()``. A SIGKILL loses at most the calls in flight; a torn last line (a record cut
  short by a crash) is skipped and counted on reading. Since no process ever appends to another's shard, a torn
  line is never glued to a later record.
- Why not SQLite: DuckDB reads JSONL natively (``read_json``, built in), whereas reading SQLite from DuckDB
  needs the sqlite extension, a download that is impossible offline here; a JSONL shard is also greppable and
  diffable, and two processes appending to their own files need no locking.
- Why not Parquet shards: Parquet is written a file at a time, so one file per call would mean thousands of
  tiny files, and batching calls into one file would lose the whole batch on a kill.
- The fsync per record costs about a millisecond, against the seconds an LLM call takes.

Only ``ok`` records are served from the cache; ``error`` records are kept for inspection and the call is made
again on the next run. An answer that came back but cannot be used (empty, or not parseable after the method's
retries) is ``unusable``: stored with its cost, never served as a usable answer, asked again by a later run until
it has been tried ``max_tries`` times (then served as it is, so the method falls back as it did). An answer found
unusable after it was stored as ``ok`` gets an ``unusable`` marker record (no tokens: the ``ok`` line keeps the
cost). Records never hold HTTP headers or the API key, by construction.

``purge`` rewrites the shards without some keys' records (``distillrank cache purge``); it must run while nothing
else writes to the folder.

In memory, an open cache keeps an index of where each key's answer lies (shard number, byte offset), never the
answers themselves: a record is read back from its shard when ``get`` asks for it (one seek and one line, far
below a call's cost). Measured with tracemalloc over 60,000 pointwise records (an 80-word passage, 20 top
log-probabilities; a 100 MiB shard): the index takes 241 bytes a call, 13.8 MiB for 60K calls (the 64-character
key, its dict slot and a (shard, offset) pair), where holding the records took 8,520 bytes a call (488 MiB):
``.venv/bin/python bench/cache_index.py --calls 60000``. The index grows with the keys, not with the answers.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from pipeline.io import atomic_path

SHARD_GLOB = "calls-*.jsonl"

Status = Literal["ok", "error", "unusable"]
# What a key is in the cache as a whole: its last usable-or-not answer decides; "error": only failed calls.
KeyState = Literal["ok", "error", "unusable"]


def _normalise(value: Any) -> Any:
    """JSON-ready ``value`` in one canonical form: integral floats as ints (``0.0`` and ``0``, as YAML or code
    may spell a temperature, must give one key), tuples as lists, mappings as dicts."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_normalise(v) for v in value]
    raise TypeError(f"cannot key a value of type {type(value).__name__}: {value!r}")


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no whitespace, UTF-8 kept as is, integral floats as ints.

    >>> canonical_json({"b": 1.0, "a": [0.5, (1, 2)]})
    '{"a":[0.5,[1,2]],"b":1}'
    """
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_key(model: str, template_hash: str, messages: Sequence[Mapping[str, Any]], sampling: Mapping[str, Any]) -> str:
    """The cache key of a call: sha256 of the canonical JSON of exactly the four things that decide its answer.

    The order of keys in ``sampling`` (or in a message) does not matter; any change to the messages does:

    >>> msgs = [{"role": "user", "content": "Rank [1] [2]"}]
    >>> k = call_key("qwen", "abc123", msgs, {"temperature": 0.0, "max_tokens": 8})
    >>> k == call_key("qwen", "abc123", msgs, {"max_tokens": 8, "temperature": 0})
    True
    >>> other = [{"role": "user", "content": "Rank [2] [1]"}]
    >>> k == call_key("qwen", "abc123", other, {"temperature": 0.0, "max_tokens": 8})
    False
    >>> len(k)
    64
    """
    payload = {"model": model, "template_hash": template_hash, "messages": messages, "sampling": sampling}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def utc_now() -> str:
    """The current time as ISO 8601 UTC (``2025-01-02T03:04:05.123456+00:00``); DuckDB reads it as TIMESTAMPTZ."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class CallRecord:
    """One completed call, as stored (one JSONL line). ``request`` holds the messages and sampling parameters;
    ``logprobs`` the per-token log-probabilities the endpoint returned (``[{token, logprob, top_logprobs}]``)."""

    key: str
    model: str
    template_hash: str
    request: dict[str, Any]
    response_text: str | None
    logprobs: list[dict[str, Any]] | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: Status
    error: str | None
    timestamp: str
    run_id: str
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CallRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        # unknown keys are ignored, so a shard written by a later version with more fields still loads
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class CacheStats:
    shards: int
    records: int  # lines read that parsed
    ok: int  # ok records (duplicates of a key included)
    errors: int  # error records
    keys: int  # distinct keys served from the cache
    unusable_keys: int  # keys whose last answer is unusable (asked again until their tries are spent)
    torn_lines: int  # unreadable lines skipped (a torn last line after a kill)
    written: int  # records this process appended


@dataclass(frozen=True)
class ShardRead:
    records: list[CallRecord]
    torn_lines: int


def read_shard(path: Path) -> ShardRead:
    """The records of one shard. An unreadable line (a record cut short by a kill: partial JSON, or a line
    whose fields do not make a record) is skipped and counted, wherever it is, so one bad line loses one call."""
    records, torn = [], 0
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                records.append(CallRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                torn += 1
    return ShardRead(records, torn)


def scan_shard(path: Path) -> Iterator[tuple[int, CallRecord | None]]:
    r"""Every non-blank line of a shard as (byte offset, record), None for an unreadable (torn) line.

    >>> import tempfile
    >>> shard = Path(tempfile.mkdtemp()) / "calls-x.jsonl"
    >>> _ = shard.write_bytes(b'{"key": "a"}\n\n{"key": "b", "model"')
    >>> list(scan_shard(shard))
    [(0, None), (14, None)]
    """
    with path.open("rb") as handle:
        offset = 0
        for line in handle:
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                yield start, CallRecord.from_dict(json.loads(line))
            except (ValueError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                yield start, None


def shard_paths(folder: Path | str) -> list[Path]:
    """The folder's shards, oldest first (the names start with their UTC creation time)."""
    return sorted(Path(folder).glob(SHARD_GLOB))


def new_shard_name() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"calls-{stamp}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"


class Location(NamedTuple):
    """Where a record lies: the shard's number in the cache's list of shards, and the byte offset of its line."""

    shard: int
    offset: int


class UnusableAnswer(NamedTuple):
    """A key's latest unusable answer: the record at ``location`` as it is (``error`` None), or, for an ``unusable``
    marker, the ok answer at ``location`` with the marker's ``error``."""

    location: Location
    error: str | None


class CacheIndexError(RuntimeError):
    """A shard changed under an open cache (another process purged it): open the cache again."""


class TeacherCache:
    """The cache folder, loaded into an in-memory index ``key -> location of its ok record`` when opened (see the
    module's docstring for its size); ``get`` reads the record from its shard.

    ``put`` appends to this process's own shard (created on the first ``put``, so a read-only open leaves no
    file behind) and is thread-safe. Records that other processes append after the open are not seen until
    the cache is opened again.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._shard: Path | None = None
        self._handle: IO[bytes] | None = None
        self._written = 0
        self._load()

    def _load(self) -> None:
        """(Re)build the index and the counts from the shards on disk."""
        self._paths: list[Path] = []  # Location.shard indexes this list
        self._index: dict[str, Location] = {}
        # the keys whose latest answer is unusable, with where that answer is (such a key is not in _index) ...
        self._unusable: dict[str, UnusableAnswer] = {}
        # ... and how many answers to a key were found unusable over time (kept when a later answer is ok, so
        # that a teacher repeating one bad answer is asked a bounded number of times, not once per run)
        self._unusable_tries: Counter[str] = Counter()
        self._error_keys: set[str] = set()  # keys with an error record
        self._shards = self._records = self._ok = self._errors = self._torn = 0
        for path in shard_paths(self.folder):
            self._paths.append(path)
            self._shards += 1
            for offset, record in scan_shard(path):
                if record is None:
                    self._torn += 1
                else:
                    self._count(record, Location(len(self._paths) - 1, offset))

    def _count(self, record: CallRecord, location: Location) -> None:
        self._records += 1
        if record.ok:
            self._ok += 1
            if self._unusable.pop(record.key, None) is not None:
                self._index[record.key] = location  # asked again after an unusable answer: the new answer stands
            else:
                # the first ok answer for a key wins: later duplicates (two runs racing on one key) are one call
                self._index.setdefault(record.key, location)
        elif record.status == "unusable":
            # a marker of an ok answer (no text of its own), or an answer stored as unusable when it came back
            answer = self._index.pop(record.key, None)
            if record.response_text is None and answer is not None:
                self._unusable[record.key] = UnusableAnswer(answer, record.error)
            else:
                self._unusable[record.key] = UnusableAnswer(location, None)
            self._unusable_tries[record.key] += 1
        else:
            self._errors += 1
            self._error_keys.add(record.key)

    def _read(self, key: str, location: Location) -> CallRecord:
        """The record of ``key`` at ``location`` (the caller holds the lock)."""
        path = self._paths[location.shard]
        try:
            with path.open("rb") as handle:
                handle.seek(location.offset)
                record = CallRecord.from_dict(json.loads(handle.readline()))
        except (OSError, ValueError, TypeError) as err:
            raise CacheIndexError(f"{path}: cannot read the record of {key} at byte {location.offset}: {err}") from err
        if record.key != key:
            raise CacheIndexError(f"{path}: byte {location.offset} holds another key than {key}: reopen the cache")
        return record

    def _unusable_record(self, key: str) -> CallRecord | None:
        latest = self._unusable.get(key)
        if latest is None:
            return None
        record = self._read(key, latest.location)
        return record if latest.error is None else dataclasses.replace(record, status="unusable", error=latest.error)

    def get(self, key: str) -> CallRecord | None:
        """The ok record for ``key``, or None (error and unusable records are never served as ok)."""
        with self._lock:
            location = self._index.get(key)
            return None if location is None else self._read(key, location)

    def unusable(self, key: str) -> tuple[int, CallRecord | None]:
        """How many answers to ``key`` were found unusable so far, and the latest answer if it is one of them
        (None when the key's latest answer is ok, or it has none).

        >>> import tempfile
        >>> cache = TeacherCache(tempfile.mkdtemp())
        >>> cache.put(CallRecord("k", "m", "t", {}, "", None, 3, 0, 0.1, "unusable", "empty answer", "", "r"))
        >>> tries, record = cache.unusable("k")
        >>> tries, record.error, cache.get("k"), cache.key_states()
        (1, 'empty answer', None, {'k': 'unusable'})
        """
        with self._lock:
            return self._unusable_tries[key], self._unusable_record(key)

    def mark_unusable(self, key: str, reason: str, run_id: str) -> bool:
        """Record that the ok answer to ``key`` cannot be used (``reason``); a later run asks again. False (and
        nothing written) when ``key`` has no ok answer to mark."""
        answer = self.get(key)
        if answer is None:
            return False
        marker = dataclasses.replace(
            answer,
            response_text=None,
            logprobs=None,
            prompt_tokens=0,
            completion_tokens=0,
            latency_s=0.0,
            status="unusable",
            error=reason,
            timestamp=utc_now(),
            run_id=run_id,
        )
        self.put(marker)
        return True

    def key_states(self) -> dict[str, KeyState]:
        """Every key's state: ``ok`` (served), ``unusable`` (its latest answer: asked again, or served as it is
        once its tries are spent) or ``error`` (only failed calls)."""
        with self._lock:
            states: dict[str, KeyState] = dict.fromkeys(self._error_keys, "error")
            states.update(dict.fromkeys(self._index, "ok"))
            states.update(dict.fromkeys(self._unusable, "unusable"))
            return states

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __iter__(self) -> Iterator[CallRecord]:
        """The ok records, read one at a time (the keys as they were when the iteration began)."""
        with self._lock:
            keys = list(self._index)
        for key in keys:
            record = self.get(key)
            if record is not None:
                yield record

    @property
    def shard(self) -> Path | None:
        """This process's shard, once something was written."""
        return self._shard

    def put(self, record: CallRecord) -> None:
        """Append ``record`` to this process's shard and make it durable (fsync) before returning."""
        line = (record.to_json() + "\n").encode("utf-8")
        with self._lock:
            if self._handle is None:
                self._shard = self.folder / new_shard_name()
                self._handle = self._shard.open("ab")
                self._paths.append(self._shard)
                self._shards += 1
            location = Location(len(self._paths) - 1, self._handle.tell())
            # one write of the whole line, then flush + fsync: after a kill the line is either whole or torn
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._written += 1
            self._count(record, location)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                shards=self._shards,
                records=self._records,
                ok=self._ok,
                errors=self._errors,
                keys=len(self._index),
                unusable_keys=len(self._unusable),
                torn_lines=self._torn,
                written=self._written,
            )

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def purge(self, keys: set[str]) -> int:
        """Remove every record of ``keys`` from the folder; returns how many records went.

        Each shard that holds one is rewritten without them (a new file renamed over the old: a crash leaves
        the old shard or the new, never half of one), and the index is rebuilt from the shards (the offsets moved).
        Only run it when no other process writes to the folder.
        """
        removed = 0
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
                self._shard = None
            for path in shard_paths(self.folder):
                lines = path.read_bytes().splitlines(keepends=True)
                kept = [line for line in lines if _line_key(line) not in keys]
                if len(kept) == len(lines):
                    continue
                removed += len(lines) - len(kept)
                if not kept:
                    path.unlink()
                    continue
                with atomic_path(path) as tmp, tmp.open("wb") as handle:
                    handle.writelines(kept)
                    handle.flush()
                    os.fsync(handle.fileno())
            self._load()
        return removed


def _line_key(line: bytes) -> str | None:
    """The key of a stored line (None for a torn one, which a purge keeps: it is skipped on reading anyway)."""
    try:
        return json.loads(line).get("key")
    except (ValueError, AttributeError):
        return None


# The columns of the ``teacher_calls`` view, typed explicitly so that an empty shard, a torn line or a shard
# of an older version (fewer fields) reads the same. JSON columns stay JSON for DuckDB's ``->>`` operators.
TEACHER_CALLS_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "model": "VARCHAR",
    "template_hash": "VARCHAR",
    "request": "JSON",
    "response_text": "VARCHAR",
    "logprobs": "JSON",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "latency_s": "DOUBLE",
    "status": "VARCHAR",
    "error": "VARCHAR",
    "timestamp": "TIMESTAMPTZ",
    "run_id": "VARCHAR",
    "finish_reason": "VARCHAR",
}


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def teacher_calls_view_sql(folder: Path | str) -> str:
    """A ``SELECT`` over every shard in ``folder`` (or in every folder a pattern matches: ``cache/*``, or
    ``cache/**`` for every depth): one row per stored record (ok and error alike), plus the ``shard`` it came from.
    Wrap it as ``CREATE VIEW teacher_calls AS <this>``.

    ``ignore_errors`` turns a torn line into a row of NULLs, which ``key IS NOT NULL`` drops. DuckDB's
    ``read_json`` fails on a glob that matches no file, so a folder without shards (checked now, when the SQL is
    made) gives an empty SELECT with the same columns and types instead.
    """
    columns = ", ".join(f"{name}: {_sql_string(kind)}" for name, kind in TEACHER_CALLS_COLUMNS.items())
    names = ", ".join(TEACHER_CALLS_COLUMNS)
    pattern = str(Path(folder).resolve() / SHARD_GLOB)
    # glob.glob, not Path.glob: ``folder`` may itself be a pattern; ``**`` is recursive in glob and DuckDB alike
    if not glob.glob(pattern, recursive=True):
        nulls = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in TEACHER_CALLS_COLUMNS.items())
        return f"SELECT {nulls}, CAST(NULL AS VARCHAR) AS shard WHERE false"
    return (
        f"SELECT {names}, filename AS shard FROM read_json({_sql_string(pattern)}, "
        f"format = 'newline_delimited', ignore_errors = true, filename = true, columns = {{{columns}}}) "
        f"WHERE key IS NOT NULL"
    )
