"""The precision a student scores in (``rerank.precision``, ``distillrank rerank --precision``), for every kind.

- ``auto``: the precision the student was trained in, resolved on this device (bf16 where the hardware has it,
  else fp32): what ``bench/rerank.py`` measured fastest at unchanged nDCG@10 on these machines;
- ``fp32``: full precision;
- ``bf16``: bf16 autocast (CUDA with bf16, or a CPU with AVX512-BF16 / AMX-BF16); elsewhere fp32, with a log line;
- ``int8``: dynamic int8 quantisation of every ``torch.nn.Linear`` (weights int8, activations quantised per batch),
  CPU only (``torch.ao.quantization.quantize_dynamic``); on another device bf16 (or fp32), with a log line.

A student kind only has to keep its torch module in ``.model`` and honour ``.precision`` in its scoring
(``backbones.autocast``): the kinds here all do.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, get_args

import torch

from pipeline.config import ScoringPrecision
from pipeline.students.backbones import resolve_precision

log = logging.getLogger(__name__)

SCORING_PRECISIONS: tuple[str, ...] = get_args(ScoringPrecision)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters).

    >>> module_device(torch.nn.Linear(2, 2)).type
    'cpu'
    """
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def quantize_linear_int8(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``module`` (in place) by its dynamically quantised int8 version; returns how
    many were replaced.

    >>> quantize_linear_int8(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)))
    2
    """
    count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    with warnings.catch_warnings():
        # torch 2.13 marks its quantised tensor types deprecated (pytorch#184982); they are what it ships today
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return count


def set_scoring_precision(student: Any, requested: str) -> str:
    """Make ``student`` score in ``requested`` precision (see the module's docstring); returns the one it uses.

    ``student`` must keep its torch module in ``.model`` and read ``.precision`` when it scores.
    """
    if requested not in SCORING_PRECISIONS:
        raise ValueError(f"precision must be one of {list(SCORING_PRECISIONS)}, got {requested!r}")
    module = getattr(student, "model", None)
    if not isinstance(module, torch.nn.Module) or not hasattr(student, "precision"):
        raise TypeError(f"{type(student).__name__} keeps no torch module in .model: its precision cannot be set")
    if requested == "auto":
        return str(student.precision)
    device = module_device(module)
    if requested == "int8":
        if device.type == "cpu":
            layers = quantize_linear_int8(module)
            log.info("precision int8: %d linear layers quantised", layers)
            student.precision = "int8"
            return "int8"
        log.warning("precision int8: dynamic quantisation runs on CPU only, not %s; using bf16 where supported", device)
        requested = "bf16"
    student.precision = resolve_precision(requested, device)
    return str(student.precision)
