"""Student kinds → the module that trains, loads and builds the untrained starting point of each.

Every kind module has the same three functions:

- ``train(name, cfg, examples, rationales, out_dir, checkpoint_dir, callbacks, device) -> TrainResult``
- ``load(folder, info, device) -> Student`` (``info``: the folder's ``distillrank_student.json``)
- ``untrained(cfg, device, ...) -> Student`` (what training starts from; ``evaluate`` reports it next to the
  trained student)

Kind modules are imported when a kind is used, so that loading one kind never imports another's dependencies.
Arrows point down: the train/rerank stages → this registry → kind modules → base, backbones, groups, ...; no kind
module imports this one.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.students.base import Student, StudentLoadError, read_student_info
from pipeline.students.precision import set_scoring_precision

KIND_MODULES = {
    "cross-encoder": "pipeline.students.cross_encoder",
    "bi-encoder": "pipeline.students.bi_encoder",
    "twolar-seq2seq": "pipeline.students.twolar",
    "twolar-causal": "pipeline.students.twolar",
    "r2r": "pipeline.students.r2r.student",
}


def kind_module(kind: str) -> ModuleType:
    """The module of ``kind`` (an error naming the known kinds otherwise).

    >>> kind_module("bi-encoder").__name__
    'pipeline.students.bi_encoder'
    """
    try:
        return importlib.import_module(KIND_MODULES[kind])
    except KeyError:
        raise StudentLoadError(f"unknown student kind {kind!r} (known: {sorted(KIND_MODULES)})") from None


def load_student(folder: Path | str, device: str | None = None, precision: str = "auto") -> Student:
    """Load a trained student of any kind from its folder (``device``: None picks CUDA when present), to score in
    ``precision`` (``pipeline.students.precision``: auto is the precision it was trained in)."""
    info = read_student_info(folder)
    student = kind_module(info["kind"]).load(Path(folder), info, device)
    set_scoring_precision(student, precision)
    return student
