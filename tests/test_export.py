"""``distillrank export``: ONNX graphs of a real (tiny, random) cross-encoder and bi-encoder student that give the
PyTorch model's outputs through ONNX Runtime, on inputs other than the ones the export traced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_cross_encoder
from pipeline.config import StudentConfig
from pipeline.students import export as onnx_export
from pipeline.students.base import STUDENT_FILE
from pipeline.students.registry import kind_module, load_student

PAIRS = [
    ("do statins lower the risk of stroke", "Statin therapy reduced the incidence of ischaemic stroke by a fifth."),
    ("bees", "Honey bees communicate the direction of food with a waggle dance, " * 3),
    ("boiling point of water at altitude", "Water boils at a lower temperature where the air pressure is lower."),
]


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    ce = save_tiny_cross_encoder(root / "ce")
    # raw logits as scores, as a trained cross-encoder student saves them (the library's default is a sigmoid)
    config = json.loads((ce / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (ce / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (ce / STUDENT_FILE).write_text(json.dumps({"kind": "cross-encoder", "max_length": 64}), encoding="utf-8")
    backbone = save_tiny_cross_encoder(root / "backbone")
    cfg = StudentConfig(kind="bi-encoder", backbone=str(backbone), max_length=64, precision="fp32")
    bi = kind_module("bi-encoder").untrained(cfg, device="cpu")
    bi.model.save(str(root / "bi"))
    (root / "bi" / STUDENT_FILE).write_text(json.dumps({"kind": "bi-encoder", "max_length": 64}), encoding="utf-8")
    return {"cross-encoder": ce, "bi-encoder": root / "bi"}


def test_a_cross_encoder_exports_to_graphs_that_score_like_pytorch(students: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ce-onnx"
    summary = onnx_export.export(students["cross-encoder"], out, quantize="int8")
    assert summary["files"] == {"fp32": "onnx/model.onnx", "int8": "onnx/model_qint8.onnx"}
    info = json.loads((out / STUDENT_FILE).read_text())
    assert info["kind"] == "cross-encoder" and info["onnx"]["files"] == summary["files"]
    # scores of pairs the export never saw, at another batch size and length, through ONNX Runtime
    student = load_student(students["cross-encoder"], device="cpu", precision="fp32")
    expected = student.score_pairs([q for q, _ in PAIRS], [p for _, p in PAIRS])
    inputs = onnx_export.encode_pairs(student.model.tokenizer, "cross-encoder", PAIRS, 64)
    fp32 = onnx_export.run_graph(out / "onnx" / "model.onnx", inputs).reshape(-1)
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    int8 = onnx_export.run_graph(out / "onnx" / "model_qint8.onnx", inputs).reshape(-1)
    assert not np.allclose(int8, fp32, atol=1e-7)
    assert np.abs(int8 - fp32).max() < 0.1 * max(np.abs(fp32).max(), 1e-3)
    # the copy is still a student folder that our loader reads, with the same scores
    np.testing.assert_allclose(
        load_student(out, device="cpu", precision="fp32").score_pairs([q for q, _ in PAIRS], [p for _, p in PAIRS]),
        expected,
        atol=1e-6,
    )


def test_a_bi_encoder_exports_its_transformer(students: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bi-onnx"
    summary = onnx_export.export(students["bi-encoder"], out)
    assert summary["output"] == "last_hidden_state" and set(summary["files"]) == {"fp32"}
    model, tokenizer = onnx_export.transformer_of(students["bi-encoder"])
    inputs = onnx_export.encode_pairs(tokenizer, "bi-encoder", PAIRS, 64)
    with torch.inference_mode():
        expected = model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(onnx_export.run_graph(out / "onnx" / "model.onnx", inputs), expected, atol=1e-4)


def test_the_command_and_its_refusals(students: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from pipeline.cli import main

    out = tmp_path / "exported"
    assert main(["export", "--model", str(students["cross-encoder"]), "--out", str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}/onnx/model.onnx: fp32, largest difference from PyTorch" in printed and "int8" in printed
    # an output folder that holds something is refused, and left as it was
    assert onnx_export.main(["--model", str(students["cross-encoder"]), "--out", str(out)]) == 2
    assert "the output folder exists and is not empty" in capsys.readouterr().err
    assert (out / "onnx" / "model_qint8.onnx").is_file()
    # a kind without an ONNX graph here, and a folder that is no student, are one-line errors
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / STUDENT_FILE).write_text(json.dumps({"kind": "twolar-seq2seq"}), encoding="utf-8")
    assert onnx_export.main(["--model", str(lm), "--out", str(tmp_path / "x")]) == 2
    assert "a twolar-seq2seq student cannot be exported to ONNX" in capsys.readouterr().err
    assert onnx_export.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # a graph that does not reproduce PyTorch is not written
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", -1.0)
    assert onnx_export.main(["--model", str(students["cross-encoder"]), "--out", str(tmp_path / "z")]) == 2
    assert "differ from PyTorch's" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.*"))
