"""The cross-encoder student: a ``sentence_transformers.CrossEncoder`` (one relevance logit per (query, passage)),
trained with ``CrossEncoderTrainer`` and the library's losses.

Losses (``students.<name>.loss``), all on TWOLAR's targets ``1 / (teacher_rank + 1)``:

- ``ranknet`` (the default, TWOLAR's): ``losses.RankNetLoss`` over every ordered pair of a group;
- ``listnet``: ``losses.ListNetLoss``; ``lambdaloss``: ``losses.LambdaLoss`` (NDCGLoss2++ weighting);
- ``margin-mse``: ``losses.MarginMSELoss`` on (query, passage, passage) triples whose label is the target margin;
- ``bce``: ``losses.BinaryCrossEntropyLoss`` with the targets as soft labels.

The saved folder is a native CrossEncoder save with the library's model card (plus our provenance section):
``CrossEncoder(path)`` loads it anywhere and gives the student's raw scores (identity activation).
``init_from`` warm-starts from another student's folder (the cascade: a cheap teacher at scale first, then the
LLM's lists) instead of the backbone with a random head.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import set_seed

from pipeline.config import StudentConfig
from pipeline.students import sbert
from pipeline.students.backbones import (
    Precision,
    autocast,
    fit_max_length,
    model_max_positions,
    pick_device,
    resolve_backbone,
    resolve_precision,
)
from pipeline.students.base import StudentLoadError, TrainResult
from pipeline.students.groups import Group, sample_indices, training_split

log = logging.getLogger(__name__)

KIND = "cross-encoder"
LOSSES = ("ranknet", "listnet", "lambdaloss", "margin-mse", "bce")
LENGTH_SAMPLE = 2000  # pairs tokenized to choose max_length from the data


class CrossEncoderStudent:
    """A CrossEncoder behind the ``Student`` interface; bf16 autocast when ``precision`` is bf16."""

    kind = KIND

    def __init__(self, model: Any, precision: Precision = "fp32") -> None:
        self.model = model
        self.precision = precision

    @property
    def max_length(self) -> int:
        return int(self.model.max_length)

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        if not len(queries):
            return np.zeros(0, dtype=np.float32)
        pairs = list(zip(queries, passages, strict=True))
        with torch.inference_mode(), autocast(self.model.device, self.precision):
            # predict sorts the pairs by length itself and returns them in the caller's order
            scores = self.model.predict(pairs, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, batch_size)


def build_model(backbone: str, max_length: int | None, device: str | None = None) -> Any:
    """A CrossEncoder with one output logit and no activation, from a backbone or a trained student's folder."""
    from sentence_transformers.cross_encoder import CrossEncoder

    path, extra = resolve_backbone(backbone)
    if extra:
        raise ValueError(f"backbone {backbone!r} cannot be a cross-encoder (it needs {sorted(extra)})")
    return CrossEncoder(
        path,
        num_labels=1,
        max_length=max_length,
        activation_fn=torch.nn.Identity(),
        device=str(pick_device(device)),
        local_files_only=Path(path).is_dir(),
    )


def pair_lengths(tokenizer: Any, examples: pd.DataFrame, seed: int, sample: int = LENGTH_SAMPLE) -> list[int]:
    """Token lengths of a seeded sample of the (query, passage) pairs of ``examples``."""
    part = examples.drop_duplicates(["query", "passage"])
    part = part.sample(n=min(sample, len(part)), random_state=seed) if len(part) > sample else part
    encoded = tokenizer(part["query"].tolist(), part["passage"].tolist(), truncation=False)
    return [len(ids) for ids in encoded["input_ids"]]


def training_rows(groups: list[Group], loss: str, group_size: int | None, per_list: int, seed: int) -> pd.DataFrame:
    """The rows the library's loss reads, from ``per_list`` seeded samples of ``group_size`` candidates of every
    group: (query, docs, labels) for the listwise losses, (query, positive, negative, label = target margin) for
    margin-mse, (query, passage, label) for bce.

    >>> g = Group("q", "t", "query", ("a", "b", "c"), ("A", "B", "C"), (0.5, 1 / 3, 0.25), (1, 2, 3))
    >>> training_rows([g], "ranknet", None, 1, 0).docs.tolist()
    [['A', 'B', 'C']]
    >>> training_rows([g], "margin-mse", None, 1, 0)[["positive", "negative"]].values.tolist()
    [['A', 'B'], ['A', 'C'], ['B', 'C']]
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for group in groups:
        for _ in range(per_list):
            part = group.subset(sample_indices(len(group.doc_ids), group_size, rng))
            if loss in {"ranknet", "listnet", "lambdaloss"}:
                rows.append({"query": part.query, "docs": list(part.passages), "labels": list(part.targets)})
            elif loss == "margin-mse":
                for i in range(len(part.passages)):
                    for j in range(i + 1, len(part.passages)):
                        margin = part.targets[i] - part.targets[j]
                        rows.append(
                            {
                                "query": part.query,
                                "positive": part.passages[i],
                                "negative": part.passages[j],
                                "label": margin,
                            }
                        )
            elif loss == "bce":
                rows += [
                    {"query": part.query, "passage": p, "label": t}
                    for p, t in zip(part.passages, part.targets, strict=True)
                ]
            else:
                raise ValueError(f"loss {loss!r} is not a cross-encoder loss ({LOSSES})")
    return pd.DataFrame(rows)


def library_loss(model: Any, loss: str) -> Any:
    from sentence_transformers.cross_encoder import losses

    identity = torch.nn.Identity()
    return {
        "ranknet": lambda: losses.RankNetLoss(model, activation_fn=identity),
        "listnet": lambda: losses.ListNetLoss(model, activation_fn=identity),
        "lambdaloss": lambda: losses.LambdaLoss(model, activation_fn=identity),
        "margin-mse": lambda: losses.MarginMSELoss(model, activation_fn=identity),
        "bce": lambda: losses.BinaryCrossEntropyLoss(model, activation_fn=identity),
    }[loss]()


def train(
    name: str,
    cfg: StudentConfig,
    examples: pd.DataFrame,
    rationales: pd.DataFrame | None,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: list[Any] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train a cross-encoder on ``examples`` and save it to ``out_dir``; returns (summary, curve)."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

    train_groups, dev_groups = training_split(name, cfg.labels, examples)
    set_seed(cfg.seed)  # the new head's initial weights
    model = build_model(cfg.init_from or cfg.backbone, None, device)
    precision = resolve_precision(cfg.precision, model.device)
    cap = min(model_max_positions(model.model.config), int(model.tokenizer.model_max_length or 512))
    max_length = fit_max_length(cfg.max_length, cap, lambda: pair_lengths(model.tokenizer, examples, cfg.seed))
    model.max_length = max_length
    rows = training_rows(train_groups, cfg.loss, cfg.group_size, cfg.groups_per_list, cfg.seed)
    pairs = float(rows["docs"].map(len).mean()) if "docs" in rows else (2.0 if cfg.loss == "margin-mse" else 1.0)
    run = sbert.Run(
        model=model,
        loss=library_loss(model, cfg.loss),
        train_rows=rows,
        wrap=lambda m: CrossEncoderStudent(m, precision),
        pairs_per_row=pairs,
        precision=precision,
        max_length=max_length,
    )
    summary, curve = sbert.train(
        name,
        cfg,
        run,
        examples,
        (train_groups, dev_groups),
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        checkpoint_dir,
        out_dir,
        callbacks,
    )
    info = {"kind": KIND, "backbone": cfg.backbone, "max_length": max_length, "precision": precision}
    return TrainResult(summary, curve, info=info)


def load(folder: Path, info: dict, device: str | None = None) -> CrossEncoderStudent:
    """A trained cross-encoder folder, as ``registry.load_student`` calls it."""
    from sentence_transformers.cross_encoder import CrossEncoder

    try:
        model = CrossEncoder(str(folder), device=str(pick_device(device)), local_files_only=True)
    except (OSError, ValueError) as err:
        raise StudentLoadError(f"{folder}: cannot load the cross-encoder: {err}") from err
    precision = resolve_precision(info.get("precision", "fp32"), model.device)
    return CrossEncoderStudent(model, precision)


def untrained(cfg: StudentConfig, device: str | None = None, max_length: int | None = None) -> CrossEncoderStudent:
    """The student's starting point (``init_from``, or the backbone with a random head), at ``max_length`` (the
    trained student's, for a like-for-like comparison)."""
    length = max_length or (None if cfg.max_length == "auto" else int(cfg.max_length))
    set_seed(cfg.seed)  # the new head's initial weights
    model = build_model(cfg.init_from or cfg.backbone, length, device)
    return CrossEncoderStudent(model, resolve_precision(cfg.precision, model.device))
