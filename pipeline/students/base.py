"""The one interface every student implements, and the loader that reads a trained student's folder.

A student folder is a Hugging Face model folder (weights, config, tokenizer, README.md model card) plus
``distillrank_student.json``, which says which kind of student it is and how to score with it. A cross-encoder
folder also loads with ``sentence_transformers.CrossEncoder(path)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

STUDENT_FILE = "distillrank_student.json"


class StudentLoadError(ValueError):
    """A folder that is not a trained student (or a broken one); the message names the folder and the file."""


@runtime_checkable
class Student(Protocol):
    kind: str
    max_length: int

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """One relevance score per (query, passage) pair; higher is more relevant. Batched, length-sorted,
        under ``torch.inference_mode``."""
        ...

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Scores of ``passages`` for one ``query``."""
        ...


def read_student_info(folder: Path | str) -> dict:
    """``distillrank_student.json`` of a student folder, with a clear error when it is missing or broken."""
    path = Path(folder) / STUDENT_FILE
    if not path.is_file():
        raise StudentLoadError(f"{folder}: not a distillrank student folder ({STUDENT_FILE} is missing)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StudentLoadError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(info, dict) or "kind" not in info:
        raise StudentLoadError(f"{path}: no 'kind' field")
    return info


def load_student(folder: Path | str, device: str | None = None) -> Student:
    """Load a trained student of any kind from its folder (``device``: None picks CUDA when present)."""
    info = read_student_info(folder)
    kind = info["kind"]
    if kind == "r2r":
        from pipeline.students.r2r import load_r2r_student

        return load_r2r_student(Path(folder), info, device)
    from pipeline.students.models import load_ranking_student

    return load_ranking_student(Path(folder), info, device)
