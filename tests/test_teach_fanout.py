"""The teach stage fanned out over shards (teacher.fan_out): Prefect's thread runner and prefect-dask's DaskTaskRunner
on a 2-worker LocalCluster, against the real OpenAI-compatible test server on 127.0.0.1."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_teach import KEY_ENV, SECRET, bee_responder, reverse_responder, teach_params

from conftest import run_teach, tiny_params
from pipeline.config import ConfigError, parse_params
from pipeline.teacher.cache import TeacherCache, shard_paths
from pipeline.teacher.chat_server import OpenAIServer
from pipeline.teacher.client import TeacherCallError

TABLES = ("teacher_rankings", "teacher_windows", "rationales")
# what differs between two runs of the same labels: when and how fast they ran
VOLATILE = ("run_id", "wall_seconds")


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server for the fanned-out runs (one per module: it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def sibling(teach_root: Path, name: str) -> Path:
    """Another root on the same collections, indexes and retrieval, with teacher outputs and a cache of its own."""
    root = teach_root / name
    (root / "data").mkdir(parents=True)
    for folder in ("collections", "indexes", "retrieval"):
        os.symlink(teach_root / "data" / folder, root / "data" / folder)
    return root


def fanned(root: Path, base_url: str, fan_out: dict, **teacher: object) -> dict:
    params = teach_params(root, base_url, **teacher)
    params["teacher"]["fan_out"] = fan_out
    return params


def tables(root: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(root / f"data/teacher/tiny/{name}.parquet").drop(columns="run_id") for name in TABLES}


def stable(summary: dict) -> dict:
    """A summary without what depends on the clock."""
    kept = {k: v for k, v in summary.items() if k not in VOLATILE}
    kept["calls"] = {k: v for k, v in summary["calls"].items() if k != "seconds_per_call"}
    return kept


def assert_same_labels(one: Path, many: Path) -> None:
    for name, frame in tables(one).items():
        pd.testing.assert_frame_equal(frame, tables(many)[name], obj=name)


def shard_pids(cache_dir: Path) -> set[int]:
    """The process ids in the cache's shard file names (``calls-<stamp>-<pid>-<random>.jsonl``)."""
    return {int(re.match(r"calls-[^-]+-(\d+)-", path.name).group(1)) for path in shard_paths(cache_dir)}


def reference(teach_root: Path, **teacher: object) -> tuple[Path, dict]:
    """The unsharded run (shards: 1, no Prefect) on a server of its own."""
    responder = bee_responder if teacher.get("method") == "pointwise" else reverse_responder
    with OpenAIServer(responder=responder) as server:
        summary = run_teach(teach_params(teach_root, server.base_url, **teacher))
    return teach_root, summary


def check_fan_out(teach_root: Path, fan_out: dict, **teacher: object) -> Path:
    """2 shards give the unsharded run's rows and figures, pay exactly the calls it pays (as many as the server
    served), write one cache file per shard, and a re-run pays nothing."""
    one, unsharded = reference(teach_root, **teacher)
    root = sibling(teach_root, "fanned")
    responder = bee_responder if teacher.get("method") == "pointwise" else reverse_responder
    with OpenAIServer(responder=responder) as server:
        params = fanned(root, server.base_url, fan_out, **teacher)
        summary = run_teach(params)
        asked = summary["windows"] if "windows" in summary else summary["pairs"]
        assert summary["calls"]["paid"] == server.served_ok == server.total == asked > 0
        assert stable(summary) == stable(unsharded)
        assert_same_labels(one, root)
        cache_dir = root / "data/teacher_cache/tiny"
        assert len(shard_paths(cache_dir)) == 2  # one file per shard, none shared
        assert len(TeacherCache(cache_dir)) == asked

        again = run_teach(params)
        assert again["calls"]["paid"] == 0 and again["calls"]["cached"] == asked
        assert server.served_ok == asked  # nothing paid twice
        assert_same_labels(one, root)
    return cache_dir


def test_thread_runner_two_shards_give_the_unsharded_labels(teach_root: Path, prefect_api: None) -> None:
    cache_dir = check_fan_out(teach_root, {"shards": 2, "task_runner": "thread", "workers": 2})
    assert shard_pids(cache_dir) == {os.getpid()}  # threads of this process


def test_dask_local_cluster_two_workers_pointwise(teach_root: Path, prefect_api: None) -> None:
    # processes: false keeps the two workers in this process (seconds, not tens); the slow test uses processes
    fan_out = {"shards": 2, "task_runner": "dask", "workers": 2, "processes": False}
    check_fan_out(teach_root, fan_out, method="pointwise")


@pytest.mark.parametrize("method", ["listwise", "pointwise"])
def test_chunks_of_one_query_give_the_one_chunk_labels(teach_root: Path, method: str) -> None:
    """scale.chunk_queries: the teach stage labels a shard's queries a chunk at a time (the passages and prompts
    of one chunk in memory), with the same rows, figures and calls as all at once; a re-run pays nothing."""
    one, whole = reference(teach_root, method=method)
    root = sibling(teach_root, f"chunked-{method}")
    responder = bee_responder if method == "pointwise" else reverse_responder
    with OpenAIServer(responder=responder) as server:
        params = teach_params(root, server.base_url, method=method)
        params["scale"] = {"chunk_queries": 1}
        summary = run_teach(params)
        assert summary["queries"]["labelled"] > 1  # more than one chunk
        asked = summary["windows"] if "windows" in summary else summary["pairs"]
        assert summary["calls"]["paid"] == server.served_ok == asked > 0
        assert stable(summary) == stable(whole)
        assert_same_labels(one, root)
        assert run_teach(params)["calls"]["paid"] == 0


def test_a_budget_stop_in_chunks_labels_what_the_one_chunk_run_labels(teach_root: Path) -> None:
    """A budget that one call exhausts: chunked or not, the same call is paid and the same labels kept (one call in
    flight at a time, so that which query's call goes first does not depend on threads)."""

    def budgeted(root: Path, base_url: str, chunk_queries: int) -> dict:
        params = teach_params(root, base_url, budget={"max_prompt_tokens": 1})
        params["teacher"]["endpoint"]["max_concurrency"] = 1
        params["scale"] = {"chunk_queries": chunk_queries}
        return run_teach(params)

    root = sibling(teach_root, "chunked-budget")
    with OpenAIServer(responder=reverse_responder) as server:
        whole = budgeted(teach_root, server.base_url, 1000)
    with OpenAIServer(responder=reverse_responder) as server:
        chunked = budgeted(root, server.base_url, 1)
    assert whole["stopped_early"] and chunked["stopped_early"] == whole["stopped_early"]
    assert chunked["calls"]["paid"] == whole["calls"]["paid"] == 1
    assert_same_labels(teach_root, root)


@pytest.mark.slow
def test_dask_worker_processes_write_their_own_cache_files(teach_root: Path, prefect_api: None) -> None:
    cache_dir = check_fan_out(teach_root, {"shards": 2, "task_runner": "dask", "workers": 2, "processes": True})
    pids = shard_pids(cache_dir)
    assert len(pids) == 2 and os.getpid() not in pids  # each shard in a worker process of its own


def test_a_failed_shard_keeps_its_calls_and_the_rerun_pays_only_the_rest(teach_root: Path, prefect_api: None) -> None:
    def no_caffeine(body: dict) -> str:
        # q4 ("which drinks contain caffeine") is in the second shard: its windows are refused (400, not retried)
        if "caffeine" in body["messages"][-1]["content"]:
            raise ValueError("this server does not rank caffeine")
        return reverse_responder(body)

    fan_out = {"shards": 2, "task_runner": "thread", "workers": 2}
    with OpenAIServer(responder=no_caffeine) as server:
        with pytest.raises(TeacherCallError, match=r"1 of 2 teach shards failed.*shard 2/2 \(2 queries\)"):
            run_teach(fanned(teach_root, server.base_url, fan_out))
        paid = server.served_ok
    cache_dir = teach_root / "data/teacher_cache/tiny"
    assert len(TeacherCache(cache_dir)) == paid > 0  # every answer the server gave is kept, the failed shard's too
    assert not (teach_root / "data/teacher/tiny/teacher_rankings.parquet").exists()

    with OpenAIServer(responder=reverse_responder) as server:
        summary = run_teach(fanned(teach_root, server.base_url, fan_out))
        assert summary["calls"]["paid"] == server.served_ok == summary["windows"] - paid > 0
        assert summary["calls"]["cached"] == paid
        assert summary["queries"]["labelled"] == 4


def test_a_budget_is_split_across_shards(teach_root: Path, prefect_api: None) -> None:
    with OpenAIServer(responder=reverse_responder) as server:
        unlimited = run_teach(teach_params(sibling(teach_root, "unlimited"), server.base_url))
        per_call = unlimited["calls"]["prompt_tokens"] / unlimited["calls"]["paid"]
    budget = {"max_prompt_tokens": int(per_call * 3)}  # 3 calls' worth: 1 per shard (a share of 1.5 calls)
    with OpenAIServer(responder=reverse_responder) as server:
        params = fanned(teach_root, server.base_url, {"shards": 2, "workers": 2}, budget=budget)
        # one call at a time per shard: a call's cost is known when it returns (see client.budget_refusal)
        params["teacher"]["endpoint"]["max_concurrency"] = 1
        summary = run_teach(params)
        assert summary["calls"]["prompt_tokens"] <= budget["max_prompt_tokens"]
        assert summary["calls"]["paid"] == server.served_ok < unlimited["calls"]["paid"]
        assert re.search(r"shard 1/2: .*; shard 2/2: ", summary["stopped_early"])


def test_fan_out_defaults_to_one_shard_in_process(tmp_path: Path) -> None:
    fan_out = parse_params(tiny_params(tmp_path)).teacher.fan_out
    assert (fan_out.shards, fan_out.task_runner, fan_out.dask_address) == (1, "thread", None)


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"fan_out": {"task_runner": "thread", "dask_address": "tcp://10.0.0.5:8786"}}, "needs task_runner 'dask'"),
        (
            {"backend": "embedded", "fan_out": {"task_runner": "dask", "dask_address": "tcp://10.0.0.5:8786"}},
            "backend 'embedded' serves on 127.0.0.1",
        ),
        ({"fan_out": {"shards": 0}}, "teacher.fan_out.shards"),
        ({"fan_out": {"task_runner": "ray"}}, "teacher.fan_out.task_runner"),
    ],
)
def test_fan_out_config_errors_name_the_parameter(tmp_path: Path, teacher: dict, message: str) -> None:
    params = tiny_params(tmp_path)
    params["teacher"] = {**params["teacher"], **teacher}
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        parse_params(params)
    assert "fan_out" in str(error.value)


def test_a_remote_cluster_is_allowed_for_an_openai_endpoint(tmp_path: Path) -> None:
    params = teach_params(tmp_path, "http://10.0.0.7:8000/v1")
    params["teacher"]["fan_out"] = {"task_runner": "dask", "dask_address": "tcp://10.0.0.5:8786", "shards": 8}
    assert parse_params(params).teacher.fan_out.dask_address == "tcp://10.0.0.5:8786"


def test_a_shard_reads_the_passages_the_stage_would_have_loaded(teach_root: Path) -> None:
    from pipeline.stages.common import split_queries
    from pipeline.teacher.candidates import corpus_path, load_pool, read_passages, with_passages

    parsed = parse_params(teach_params(teach_root, "http://127.0.0.1:9/v1"))
    target = parsed.teach["tiny"]
    queries = split_queries(parsed.paths, "tiny", target.split, "teach.collection.tiny.split")
    loaded = load_pool("tiny", target, parsed.paths, queries)
    bare = load_pool("tiny", target, parsed.paths, queries, passages=False)
    assert "passage" not in bare.candidates and loaded.candidates.passage.notna().all()
    corpus = corpus_path(parsed.paths, "tiny")
    pd.testing.assert_frame_equal(with_passages(bare, corpus).candidates, loaded.candidates)
    # only the documents asked for are read
    assert read_passages(corpus, ["d1", "d2", "d1"]).index.tolist() == ["d1", "d2"]
