"""Scoring precision (``rerank.precision``, ``distillrank rerank --precision``): what each setting does to a real
(tiny, random) student, the fallbacks, and the errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURE, save_tiny_cross_encoder
from pipeline.config import RerankConfig
from pipeline.students import backbones, precision
from pipeline.students.base import STUDENT_FILE
from pipeline.students.precision import set_scoring_precision
from pipeline.students.registry import load_student

QUERIES = ["what causes rain", "capital of france", "how do vaccines work"] * 4
PASSAGES = [
    "Rain forms when water vapour condenses into droplets heavy enough to fall.",
    "Paris is the capital and largest city of France.",
    "Vaccines train the immune system to recognise a pathogen without causing the disease.",
    "The stock market closed higher on Tuesday after a quiet session.",
] * 3


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_cross_encoder(tmp_path_factory.mktemp("precision") / "tiny-ce")
    info = {"kind": "cross-encoder", "backbone": "tiny-random-bert", "max_length": 64, "precision": "fp32"}
    (folder / STUDENT_FILE).write_text(json.dumps(info), encoding="utf-8")
    return folder


def scores(folder: Path, setting: str) -> tuple[np.ndarray, object]:
    student = load_student(folder, device="cpu", precision=setting)
    return student.score_pairs(QUERIES, PASSAGES, batch_size=5), student


def test_auto_keeps_the_training_precision_and_fp32_matches_the_library(student_folder: Path) -> None:
    from sentence_transformers.cross_encoder import CrossEncoder

    auto, student = scores(student_folder, "auto")
    assert student.precision == "fp32"  # the folder says it was trained in fp32
    library = CrossEncoder(str(student_folder), device="cpu").predict(list(zip(QUERIES, PASSAGES, strict=True)))
    np.testing.assert_allclose(auto, np.asarray(library).reshape(-1), atol=1e-5)
    fp32, _ = scores(student_folder, "fp32")
    np.testing.assert_allclose(fp32, auto, atol=1e-6)


def test_int8_quantises_every_linear_layer_and_keeps_the_scores_close(student_folder: Path) -> None:
    fp32, _ = scores(student_folder, "fp32")
    int8, student = scores(student_folder, "int8")
    assert student.precision == "int8"
    linear = [m for m in student.model.modules() if type(m) is torch.nn.Linear]
    quantised = [m for m in student.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert not linear and len(quantised) == 2 * 6 + 2  # 2 layers x (q, k, v, out, up, down) + pooler + head
    assert not np.allclose(int8, fp32, atol=1e-7)  # it really runs another kernel
    # within 5% of the scores' spread (a random tiny model's scores are too close together for a correlation)
    assert np.abs(int8 - fp32).max() < 0.05 * (np.ptp(fp32) + 1e-3)


def test_bf16_where_the_cpu_has_it_else_fp32_with_a_log_line(
    student_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fp32, _ = scores(student_folder, "fp32")
    if backbones.bf16_supported(torch.device("cpu")):
        bf16, student = scores(student_folder, "bf16")
        assert student.precision == "bf16"
        assert np.abs(bf16 - fp32).max() < 0.05 * (np.ptp(fp32) + 1e-3)
    monkeypatch.setattr(backbones, "bf16_supported", lambda device: False)
    with caplog.at_level(logging.INFO):
        fallback, student = scores(student_folder, "bf16")
    assert student.precision == "fp32"
    np.testing.assert_allclose(fallback, fp32, atol=1e-6)
    assert "has no native bf16 units; using fp32" in caplog.text


def test_int8_off_cpu_falls_back_with_a_warning(
    student_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    student = load_student(student_folder, device="cpu")
    monkeypatch.setattr(precision, "module_device", lambda module: torch.device("cuda"))
    monkeypatch.setattr(backbones, "bf16_supported", lambda device: True)
    with caplog.at_level(logging.WARNING):
        assert set_scoring_precision(student, "int8") == "bf16"
    assert "dynamic quantisation runs on CPU only" in caplog.text
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in student.model.modules())


def test_bad_settings_are_errors_naming_the_value(student_folder: Path) -> None:
    student = load_student(student_folder, device="cpu")
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'fp32', 'bf16', 'int8'\], got 'int4'"):
        set_scoring_precision(student, "int4")
    with pytest.raises(ValueError, match="precision"):
        RerankConfig(precision="fp16")

    class NoModel:
        precision = "fp32"

    with pytest.raises(TypeError, match="NoModel keeps no torch module"):
        set_scoring_precision(NoModel(), "int8")


def test_the_rerank_command_scores_in_the_precision_asked(student_folder: Path, tmp_path: Path, capsys) -> None:
    from pipeline.io import read_trec_run
    from pipeline.rerank import main

    out = tmp_path / "int8.trec"
    args = ["--model", str(student_folder), "--collection", str(FIXTURE), "--run", str(FIXTURE / "runs" / "weak.trec")]
    assert (
        main([*args, "--out", str(out), "--depth", "4", "--device", "cpu", "--precision", "int8", "--no-progress"]) == 0
    )
    assert "pairs/s, int8)" in capsys.readouterr().out
    assert len(read_trec_run(out)) == len(read_trec_run(FIXTURE / "runs" / "weak.trec"))
    with pytest.raises(SystemExit):
        main([*args, "--out", str(out), "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
