"""The teacher call cache: keys, durable JSONL shards, torn lines, and the DuckDB view over them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import duckdb
import pytest
import yaml

from pipeline.teacher.cache import (
    TEACHER_CALLS_COLUMNS,
    CallRecord,
    TeacherCache,
    call_key,
    read_shard,
    shard_paths,
    teacher_calls_view_sql,
    utc_now,
)

MESSAGES = [{"role": "system", "content": "You rank passages."}, {"role": "user", "content": "q [1] a [2] b"}]


def record(key: str, status: str = "ok", text: str | None = "[2] > [1]", **fields: object) -> CallRecord:
    values: dict = {
        "key": key,
        "model": "test-model",
        "template_hash": "tpl1",
        "request": {"messages": MESSAGES, "sampling": {"temperature": 0, "max_tokens": 8}},
        "response_text": text if status == "ok" else None,
        "logprobs": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [{"token": "Yes", "logprob": -0.1}]}],
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "latency_s": 0.25,
        "status": status,
        "error": None if status == "ok" else "InternalServerError: boom",
        "timestamp": utc_now(),
        "run_id": "run-1",
        "finish_reason": "stop" if status == "ok" else None,
    }
    return CallRecord(**{**values, **fields})


# -- keys ---------------------------------------------------------------------------------------------------
def test_call_key_depends_on_exactly_the_four_inputs() -> None:
    base = call_key("m", "t", MESSAGES, {"temperature": 0.0, "max_tokens": 8})
    assert base == call_key(
        "m", "t", [dict(reversed(m.items())) for m in MESSAGES], {"max_tokens": 8, "temperature": 0}
    )
    assert base == call_key("m", "t", tuple(MESSAGES), {"temperature": 0, "max_tokens": 8.0})
    changed = [
        call_key("m2", "t", MESSAGES, {"temperature": 0.0, "max_tokens": 8}),
        call_key("m", "t2", MESSAGES, {"temperature": 0.0, "max_tokens": 8}),
        call_key("m", "t", MESSAGES[:1], {"temperature": 0.0, "max_tokens": 8}),
        call_key(
            "m", "t", [MESSAGES[0], {**MESSAGES[1], "content": "q [1] a [2] b "}], {"temperature": 0, "max_tokens": 8}
        ),
        call_key("m", "t", MESSAGES, {"temperature": 0.1, "max_tokens": 8}),
        call_key("m", "t", MESSAGES, {"temperature": 0.0, "max_tokens": 8, "seed": 1}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_call_key_rejects_values_json_cannot_spell_canonically() -> None:
    with pytest.raises(TypeError, match="set"):
        call_key("m", "t", MESSAGES, {"stop": {"a"}})


# -- storage ------------------------------------------------------------------------------------------------
def test_put_get_and_reopen(tmp_path: Path) -> None:
    with TeacherCache(tmp_path) as cache:
        assert len(cache) == 0 and cache.shard is None  # a read-only open writes nothing
        assert shard_paths(tmp_path) == []
        cache.put(record("a"))
        cache.put(record("b", text=""))
        assert "a" in cache and "zz" not in cache and len(cache) == 2
        assert cache.get("a") == record("a", timestamp=cache.get("a").timestamp)
        assert cache.shard is not None and cache.shard.name.startswith("calls-")
    reopened = TeacherCache(tmp_path)
    assert len(reopened) == 2 and reopened.get("b").response_text == ""
    stats = reopened.stats()
    assert (stats.shards, stats.records, stats.ok, stats.errors, stats.torn_lines, stats.written) == (1, 2, 2, 0, 0, 0)
    # one line per record, valid JSON
    lines = shard_paths(tmp_path)[0].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]


def test_error_records_are_kept_but_never_served(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)
    cache.put(record("a", status="error"))
    assert cache.get("a") is None and "a" not in cache and cache.stats().errors == 1
    cache.put(record("a"))
    assert cache.get("a").ok
    cache.close()
    reopened = TeacherCache(tmp_path)
    assert reopened.get("a").ok and reopened.stats().errors == 1 and reopened.stats().ok == 1


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    with TeacherCache(tmp_path) as cache:
        cache.put(record("a"))
        cache.put(record("b"))
        shard = cache.shard
    # what a kill in the middle of a write leaves: the start of a record, no newline
    with shard.open("ab") as handle:
        handle.write(record("c").to_json().encode()[:57])
    cache = TeacherCache(tmp_path)
    assert len(cache) == 2 and "c" not in cache and cache.stats().torn_lines == 1
    # the next run appends to a shard of its own: the torn line is never glued to a new record
    cache.put(record("c"))
    assert cache.shard != shard
    cache.close()
    again = TeacherCache(tmp_path)
    assert len(again) == 3 and again.stats().torn_lines == 1 and again.stats().shards == 2


def test_a_corrupt_line_in_the_middle_loses_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "calls-20250101T000000000000Z-1-abcd.jsonl"
    lines = [record("a").to_json(), '{"key": "b", "model": tru', '{"not": "a record"}', record("c").to_json()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shard = read_shard(path)
    assert [r.key for r in shard.records] == ["a", "c"] and shard.torn_lines == 2


def test_concurrent_puts_write_whole_lines(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path)

    def write(thread: int) -> None:
        for i in range(50):
            cache.put(record(f"{thread}-{i}", text="x" * 5000))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    reopened = TeacherCache(tmp_path)
    assert len(reopened) == 400 and reopened.stats().torn_lines == 0


def test_purge_removes_every_record_of_the_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    for key in ("a", "b"):
        with TeacherCache(tmp_path) as cache:  # two "runs": two shards
            cache.put(record(key, status="error"))
            cache.put(record(key))
            cache.put(record("c"))
    cache = TeacherCache(tmp_path)
    assert cache.stats().shards == 2 and cache.stats().records == 6
    assert cache.purge({"a"}) == 2  # its error and its ok record
    assert "a" not in cache and "b" in cache
    cache.put(record("d"))  # the cache still writes after a purge (a shard of its own)
    cache.close()
    reopened = TeacherCache(tmp_path)
    assert sorted(r.key for r in reopened) == ["b", "c", "d"] and reopened.stats().records == 5
    assert reopened.purge({"b", "c", "d"}) == 5
    assert shard_paths(tmp_path) == [] and len(TeacherCache(tmp_path)) == 0  # emptied shards are deleted


def test_an_unusable_answer_is_not_served_and_its_tries_survive_a_later_ok(tmp_path: Path) -> None:
    with TeacherCache(tmp_path) as cache:
        cache.put(record("k"))
        assert cache.mark_unusable("k", "no usable id", "run-1")
        assert cache.get("k") is None
        tries, last = cache.unusable("k")
        # the marker carries no cost of its own but keeps the answer it marks
        assert tries == 1 and last is not None and last.response_text == "[2] > [1]" and last.error == "no usable id"
        assert not cache.mark_unusable("k", "again", "run-1")  # nothing ok left to mark: nothing written
        cache.put(record("k", text="[1] > [2]"))  # asked again: the new answer is served
    reopened = TeacherCache(tmp_path)
    assert reopened.get("k").response_text == "[1] > [2]"
    assert reopened.unusable("k") == (1, None)  # the count stays, so a repeated bad answer is asked a bounded number
    assert reopened.key_states() == {"k": "ok"}
    assert reopened.stats().records == 3 and reopened.stats().unusable_keys == 0
    assert sum(r.prompt_tokens for r in read_shard(shard_paths(tmp_path)[0]).records) == 24  # two paid answers


# -- the DuckDB view ----------------------------------------------------------------------------------------
def test_teacher_calls_view_reads_every_record(tmp_path: Path) -> None:
    with TeacherCache(tmp_path) as cache:
        cache.put(record("a"))
        cache.put(record("b", status="error"))
        shard = cache.shard
    with TeacherCache(tmp_path) as cache:
        cache.put(record("c", prompt_tokens=7))
    with shard.open("ab") as handle:  # a torn last line
        handle.write(b'{"key": "d", "model": "te')
    con = duckdb.connect()
    con.execute(f"CREATE VIEW teacher_calls AS {teacher_calls_view_sql(tmp_path)}")
    rows = con.execute(
        "SELECT key, status, error, prompt_tokens, request->>'$.sampling.max_tokens', logprobs->>'$[0].token', "
        "typeof(timestamp), shard LIKE '%calls-%.jsonl' FROM teacher_calls ORDER BY key"
    ).fetchall()
    assert rows == [
        ("a", "ok", None, 12, "8", "Yes", "TIMESTAMP WITH TIME ZONE", True),
        ("b", "error", "InternalServerError: boom", 12, "8", "Yes", "TIMESTAMP WITH TIME ZONE", True),
        ("c", "ok", None, 7, "8", "Yes", "TIMESTAMP WITH TIME ZONE", True),
    ]
    columns = [d[0] for d in con.execute("SELECT * FROM teacher_calls").description]
    assert columns == [*TEACHER_CALLS_COLUMNS, "shard"]


def test_teacher_calls_view_on_an_empty_folder(tmp_path: Path) -> None:
    for folder in (tmp_path / "never-created", tmp_path):
        cursor = duckdb.connect().execute(teacher_calls_view_sql(folder))
        assert cursor.fetchall() == []
        assert [d[0] for d in cursor.description] == [*TEACHER_CALLS_COLUMNS, "shard"]
    (tmp_path / "calls-20250101T000000000000Z-1-abcd.jsonl").write_bytes(b"")  # an empty shard reads too
    assert duckdb.connect().execute(teacher_calls_view_sql(tmp_path)).fetchall() == []


# -- distillrank cache ----------------------------------------------------------------------------------------
def test_cache_cli_stats_and_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.teacher import cache_cli

    root = tmp_path / "cache"
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["paths"]["teacher_cache"] = str(root)
    params.write_text(yaml.safe_dump(raw))
    with TeacherCache(root / "dl") as cache:
        cache.put(record("good"))
        cache.put(record("bad"))
        cache.mark_unusable("bad", "no usable id", "run-1")
        cache.put(record("failed", status="error"))
    with TeacherCache(root / "_synthesize" / "sf") as cache:
        cache.put(record("other", model="another-model"))

    assert cache_cli.main(["--params", str(params), "stats"]) == 0
    out = capsys.readouterr().out
    assert "_synthesize/sf" in out and "dl" in out

    assert cache_cli.main(["--params", str(params), "purge", "--target", "dl", "--status", "unusable"]) == 0
    assert "removed 2 records of 1 keys" in capsys.readouterr().out  # the answer and its marker
    left = TeacherCache(root / "dl")
    assert left.key_states() == {"good": "ok", "failed": "error"}
    # --model filters, --dry-run removes nothing, an unknown target names the ones there
    args = ["--params", str(params), "purge", "--target", "_synthesize/sf", "--model", "test-model"]
    assert cache_cli.main(args) == 0 and "removed 0 records" in capsys.readouterr().out
    args = ["--params", str(params), "purge", "--target", "_synthesize/sf", "--dry-run"]
    assert cache_cli.main(args) == 0 and "1 keys match" in capsys.readouterr().out
    assert len(TeacherCache(root / "_synthesize" / "sf")) == 1
    assert cache_cli.main(["--params", str(params), "purge", "--target", "nope"]) == 2
    assert "targets here: ['_synthesize/sf', 'dl']" in capsys.readouterr().err
