"""The one interface every student implements, and the loader that reads a trained student's folder.

A student folder is a Hugging Face model folder (weights, config, tokenizer, README.md model card) plus
``distillrank_student.json``, which says which kind of student it is and how to score with it. A cross-encoder
folder also loads with ``sentence_transformers.CrossEncoder(path)``, a bi-encoder folder with
``SentenceTransformer(path)``. ``pipeline.students.registry.load_student`` loads any of them.

This module imports no other module of the package, so that every kind can import it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

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


@dataclass
class TrainResult:
    """What a kind's ``train`` returns: the summary (metrics JSON; ``info`` is the folder's
    ``distillrank_student.json`` record), the training curve, and the kind's own model card section (LM kinds;
    sentence-transformers kinds keep the library's card)."""

    summary: dict[str, Any]
    curve: pd.DataFrame
    card_section: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def read_student_info(folder: Path | str) -> dict:
    """``distillrank_student.json`` of a student folder, with a clear error when it is missing or broken."""
    path = Path(folder) / STUDENT_FILE
    if not Path(folder).is_dir():
        raise StudentLoadError(f"{folder}: no such folder (train a student first: `distillrank stage train <name>`)")
    if not path.is_file():
        raise StudentLoadError(f"{folder}: not a distillrank student folder ({STUDENT_FILE} is missing)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StudentLoadError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(info, dict) or "kind" not in info:
        raise StudentLoadError(f"{path}: no 'kind' field")
    return info
