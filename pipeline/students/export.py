"""Export a trained student: a copy of its folder, ready for the Hugging Face Hub, with ONNX graphs for serving
without PyTorch (ONNX Runtime, Triton, onnxruntime-web) or without them (``--format hub``).

    distillrank export --model DIR --out DIR [--format onnx|hub] [--quantize int8] [--opset 17]
                       [--params params.yaml] [--repo-id ORG/NAME]

Every export rewrites the copy's model card (``pipeline.students.card``) with the held-out figures the evaluate
stage measured for the student (``metrics/eval.json``, read through ``--params``): model-index results, a plain
comparison with BM25, and a usage snippet that loads ``--repo-id`` (default: the output folder's name). The train
stage's folder is never rewritten (it is a DVC output of train, written before any evaluation).

With ``--format onnx`` (the default) the copy (still a student folder: ``distillrank rerank`` and
sentence-transformers load it as before) also holds, in the layout sentence-transformers' ONNX backend reads:

- ``onnx/model.onnx``: the transformer with dynamic batch and sequence axes (torch's ONNX exporter); a
  cross-encoder's graph returns ``logits``, a bi-encoder's ``last_hidden_state`` (the folder's pooling and
  normalisation modules run after it, as sentence-transformers does);
- ``onnx/model_qint8.onnx`` with ``--quantize int8``: ONNX Runtime's dynamic int8 quantisation of that graph.

Each graph is checked against the PyTorch model on sample pairs through ONNX Runtime before the command succeeds
(the largest score difference is printed and kept in ``distillrank_student.json`` under ``onnx``).

sentence-transformers loads the folder with ``CrossEncoder(path, backend="onnx")`` (``model_kwargs={"file_name":
"onnx/model_qint8.onnx"}`` for the int8 graph) where ``optimum-onnx`` is installed; its only release (0.1.0)
requires transformers < 4.58, so it cannot be installed next to this project's transformers 5.23: here the graphs
run through ``onnxruntime`` directly (``run_graph``; ``bench/rerank.py`` times them).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.students import card
from pipeline.students.base import STUDENT_FILE, StudentLoadError, read_student_info

FORMATS = ("onnx", "hub")
ONNX_FOLDER = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"
KIND_OUTPUTS = {"cross-encoder": "logits", "bi-encoder": "last_hidden_state"}
DEFAULT_OPSET = 17
# the fp32 graph must give the PyTorch model's outputs to this (absolute, on outputs scaled to at most 1)
FP32_TOLERANCE = 1e-3
CHECK_PAIRS = (
    ("what causes rain", "Rain forms when water vapour condenses into droplets heavy enough to fall."),
    ("capital of france", "Paris is the capital and largest city of France, on the Seine."),
    ("how do vaccines work", "Vaccines train the immune system to recognise a pathogen."),
    ("who wrote hamlet", "The stock market closed higher on Tuesday after a quiet session of trading."),
)


class ExportError(ValueError):
    """A student that cannot be exported as asked; the message names the folder or the option."""


def transformer_of(folder: Path) -> tuple[Any, Any]:
    """The Hugging Face model inside a cross-encoder or bi-encoder student folder, and its tokenizer (fp32, CPU,
    eval mode): the first module of the sentence-transformers model that ``load_student`` gives."""
    from pipeline.students.registry import load_student

    module = load_student(folder, device="cpu", precision="fp32").model[0]
    return module.auto_model.float().eval(), module.tokenizer


def encode_pairs(tokenizer: Any, kind: str, pairs: Sequence[tuple[str, str]], max_length: int) -> dict[str, Any]:
    """The tokenizer's numpy inputs for ``pairs``: both texts together for a cross-encoder, the passages alone for a
    bi-encoder (what its transformer sees)."""
    if kind == "cross-encoder":
        texts: tuple[Any, ...] = ([q for q, _ in pairs], [p for _, p in pairs])
    else:
        texts = ([p for _, p in pairs],)
    return dict(tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"))


def export_graph(model: Any, inputs: dict[str, np.ndarray], output: str, target: Path, opset: int) -> None:
    """``model`` as an ONNX graph at ``target`` whose inputs are ``inputs``' names (batch and sequence axes
    dynamic) and whose one output is ``output``."""
    import torch

    names = list(inputs)

    class Graph(torch.nn.Module):
        """The model called with keyword inputs and reduced to the one output (the exporter traces positionally)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(**dict(zip(names, args, strict=True))), output)

    example = tuple(torch.as_tensor(inputs[name]) for name in names)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        # the tracer's notes on Python-side shape checks of the attention code; the export is checked on other
        # inputs (``export``), which is what would show a trace that does not generalise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            Graph().eval(),
            example,
            str(target),
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, and it handles these BERT graphs
        )


def quantize_graph(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of ``source`` (weights int8, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a "consider pre-processing" hint through the root logger on every call
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def run_graph(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``path``'s one output for ``inputs`` through ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return np.asarray(session.run(None, {k: v.astype(np.int64) for k, v in inputs.items() if k in wanted})[0])


def largest_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """The largest absolute difference, on outputs scaled so that the reference's largest magnitude is 1.

    >>> largest_difference(np.array([2.0, -4.0]), np.array([2.0, -3.0]))
    0.25
    """
    scale = max(float(np.abs(reference).max()), 1e-6)
    return float(np.abs(reference - other).max() / scale)


def held_out(info: dict, params_file: Path | None) -> tuple[list[card.HeldOut], dict[str, Any], str | None]:
    """The student's held-out figures from the evaluate stage's metrics (through ``params_file``), what else the
    card takes from the params (``export``'s ``rerank`` and ``datasets``), and why there are no figures (None when
    there are)."""
    from pipeline.config import ConfigError, load_params
    from pipeline.stages.evaluate import EVAL_METRICS_FILE

    if params_file is None:
        return [], {}, "no --params given"
    try:
        params = load_params(params_file)
    except ConfigError as err:
        return [], {}, str(err)
    path = Path(params.paths.metrics) / EVAL_METRICS_FILE
    if not path.is_file():
        return [], {}, f"{path} is missing (run the evaluate stage: `dvc repro evaluate`)"
    name, labels = info.get("name"), info.get("labels")
    results = card.held_out_results(str(name), str(labels), json.loads(path.read_text(encoding="utf-8")), params)
    target = params.teach.get(str(labels))
    context = {
        "rerank": {"depth": params.rerank.depth},
        "datasets": card.training_datasets(str(labels), *((target.queries, target.split) if target else ())),
    }
    if not results:
        return [], context, f"{path} holds no held-out figures for student {name!r} (run `dvc repro evaluate`)"
    return results, context, None


def export(
    model_dir: Path,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    fmt: str = "onnx",
    results: list[card.HeldOut] | None = None,
    repo_id: str | None = None,
    rerank: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
) -> dict:
    """Export the student at ``model_dir`` into ``out_dir`` (a new folder) with its card rewritten for ``results``
    (``held_out``); returns what was written and checked."""
    info = read_student_info(model_dir)
    kind = str(info["kind"])
    if fmt not in FORMATS:
        raise ExportError(f"--format: one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "onnx" and kind not in KIND_OUTPUTS:
        raise ExportError(
            f"{model_dir}: a {kind} student cannot be exported to ONNX (kinds: {sorted(KIND_OUTPUTS)}; "
            "--format hub exports any kind without graphs)"
        )
    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize: only int8 is supported, got {quantize!r}")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize: only with --format onnx")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: the output folder exists and is not empty (give a new folder)")
    if out_dir.resolve() == model_dir.resolve():
        raise ExportError(f"{out_dir}: the output folder must not be the student's own folder")
    write = {"results": results or [], "model_ref": repo_id or out_dir.name, "rerank": rerank, "datasets": datasets}
    if fmt == "hub":
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
            work = Path(tmp) / "student"
            shutil.copytree(model_dir, work)
            written = {**card.write_card(work, info, **write), "card": str(out_dir / card.CARD_FILE)}
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            work.rename(out_dir)
        return {"model": str(model_dir), "out": str(out_dir), "kind": kind, "format": fmt, "files": {}, **written}
    return _export_onnx(model_dir, out_dir, info, kind, quantize, opset, write)


def _export_onnx(
    model_dir: Path, out_dir: Path, info: dict, kind: str, quantize: str | None, opset: int, write: dict
) -> dict:
    import torch

    model, tokenizer = transformer_of(model_dir)
    max_length = int(info.get("max_length") or 512)
    inputs = encode_pairs(tokenizer, kind, CHECK_PAIRS, max_length)
    output = KIND_OUTPUTS[kind]
    with torch.inference_mode():
        reference = getattr(model(**{k: torch.as_tensor(v) for k, v in inputs.items()}), output).float().numpy()

    # build in a temporary folder beside the target and move it in at the end: a failed export leaves nothing
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        work = Path(tmp) / "student"
        shutil.copytree(model_dir, work)
        onnx_dir = work / ONNX_FOLDER
        # traced on two pairs, checked on all four: another batch size and length than the trace's
        traced = encode_pairs(tokenizer, kind, CHECK_PAIRS[:2], max_length)
        export_graph(model, traced, output, onnx_dir / FP32_FILE, opset)
        files = {"fp32": f"{ONNX_FOLDER}/{FP32_FILE}"}
        differences = {"fp32": largest_difference(reference, run_graph(onnx_dir / FP32_FILE, inputs))}
        if differences["fp32"] > FP32_TOLERANCE:
            raise ExportError(
                f"{model_dir}: the exported graph's outputs differ from PyTorch's by {differences['fp32']:.2e} "
                f"(more than {FP32_TOLERANCE}); not written"
            )
        if quantize == "int8":
            quantize_graph(onnx_dir / FP32_FILE, onnx_dir / INT8_FILE)
            files["int8"] = f"{ONNX_FOLDER}/{INT8_FILE}"
            differences["int8"] = largest_difference(reference, run_graph(onnx_dir / INT8_FILE, inputs))
        record = {"files": files, "opset": opset, "output": output, "max_scaled_difference": differences}
        info = {**info, "onnx": record}
        (work / STUDENT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        written = {**card.write_card(work, info, **write), "card": str(out_dir / card.CARD_FILE)}
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        work.rename(out_dir)
    return {"model": str(model_dir), "out": str(out_dir), "kind": kind, "format": "onnx", **record, **written}


def _parser() -> argparse.ArgumentParser:
    from pipeline.config import DEFAULT_PARAMS_FILE

    parser = argparse.ArgumentParser(
        prog="distillrank export",
        description="Export a student: a copy of its folder with a Hub-ready model card (held-out figures from the "
        "evaluate stage), plus ONNX graphs of a cross-encoder or bi-encoder (--format onnx).",
    )
    parser.add_argument("--model", type=Path, required=True, help="a trained student's folder")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the exported student")
    parser.add_argument(
        "--format", choices=FORMATS, default="onnx", help="onnx: the copy + onnx/ graphs; hub: the copy alone"
    )
    parser.add_argument("--quantize", choices=("int8",), default=None, help="also write an int8 graph")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS_FILE, help="where the evaluate stage's metrics are (params.yaml)"
    )
    parser.add_argument(
        "--repo-id", default=None, help="the Hub id the card's usage snippet loads (default: --out's name)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``distillrank export``: exit code 0, or 2 with one line naming the folder for a problem the user can fix."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s export %(levelname)s %(message)s")
    try:
        info = read_student_info(args.model)
        results, context, why_none = held_out(info, args.params)
        summary = export(args.model, args.out, args.quantize, args.opset, args.format, results, args.repo_id, **context)
    except (StudentLoadError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for precision, file in summary["files"].items():
        difference = summary["max_scaled_difference"][precision]
        print(f"{summary['out']}/{file}: {precision}, largest difference from PyTorch {difference:.2e} (scaled)")
    print(f"{summary['card']}: model card with {summary['results']} held-out result(s)")
    if why_none:
        print(f"warning: no held-out figures in the card: {why_none}", file=sys.stderr)
    for key, why in summary["missing"].items():
        print(f"warning: the card has no {key}: {why} (add it by hand before publishing)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
