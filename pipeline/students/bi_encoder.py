"""The bi-encoder student: a ``sentence_transformers.SentenceTransformer`` that encodes queries and passages apart
and ranks by their similarity, distilled from the teacher's rankings with ``SentenceTransformerTrainer`` and the
library's losses. It starts from a strong point (all-MiniLM-L6-v2 reranks TREC-DL 2019's BM25 top 100 to 0.64
nDCG@10 untrained) and loads anywhere as a SentenceTransformer. GPL distils a cross-encoder teacher into one the
same way.

Losses (``students.<name>.loss``):

- ``kl`` (the default): ``losses.DistillKLDivLoss``, a listwise KL divergence between the teacher's distribution
  over a group, ``softmax(target / teacher_temperature)`` with TWOLAR's targets ``1 / (teacher_rank + 1)``, and
  the student's, ``softmax(similarity / student_temperature)``;
- ``margin-mse``: ``losses.MarginMSELoss`` on (query, passage, passage) triples, label = the target margin;
- ``mnrl``: ``losses.MultipleNegativesRankingLoss``, the teacher's top passage as the positive, the group's others
  as hard negatives (plus in-batch negatives).
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

KIND = "bi-encoder"
LOSSES = ("kl", "margin-mse", "mnrl")
LENGTH_SAMPLE = 2000


class BiEncoderStudent:
    """A SentenceTransformer behind the ``Student`` interface: each distinct query and passage is encoded once,
    and a pair's score is the model's similarity (cosine for MiniLM)."""

    kind = KIND

    def __init__(self, model: Any, precision: Precision = "fp32") -> None:
        self.model = model
        self.precision = precision

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embeddings of ``texts`` (the library sorts them by length and restores the order)."""
        with torch.inference_mode(), autocast(self.model.device, self.precision):
            return self.model.encode(
                list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress
            ).float()

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        if not len(queries):
            return np.zeros(0, dtype=np.float32)
        query_texts, query_index = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        passage_texts, passage_index = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
        query_vectors = self.encode(query_texts.tolist(), batch_size)
        passage_vectors = self.encode(passage_texts.tolist(), batch_size, progress)
        with torch.inference_mode():
            scores = self.model.similarity_pairwise(
                query_vectors[torch.as_tensor(query_index)], passage_vectors[torch.as_tensor(passage_index)]
            )
        return scores.float().cpu().numpy().reshape(-1)

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, batch_size)


def build_model(backbone: str, device: str | None = None) -> Any:
    from sentence_transformers import SentenceTransformer

    path, extra = resolve_backbone(backbone)
    if extra:
        raise ValueError(f"backbone {backbone!r} cannot be a bi-encoder (it needs {sorted(extra)})")
    return SentenceTransformer(path, device=str(pick_device(device)), local_files_only=Path(path).is_dir())


def text_lengths(tokenizer: Any, examples: pd.DataFrame, seed: int, sample: int = LENGTH_SAMPLE) -> list[int]:
    """Token lengths of a seeded sample of the passages of ``examples`` (queries are far shorter)."""
    passages = examples.passage.drop_duplicates()
    passages = passages.sample(n=min(sample, len(passages)), random_state=seed) if len(passages) > sample else passages
    return [len(ids) for ids in tokenizer(passages.tolist(), truncation=False)["input_ids"]]


def training_rows(groups: list[Group], loss: str, group_size: int, per_list: int, seed: int) -> pd.DataFrame:
    """The rows the library's loss reads, from ``per_list`` seeded samples of ``group_size`` candidates of every
    group (groups with fewer candidates are used whole, with ``kl`` only when they have exactly as many: the
    loss needs one column count): (query, doc_0..doc_k-1, label = targets) for ``kl``; (query, positive,
    negative, label = margin) for ``margin-mse``; (query, positive, negative_1..) for ``mnrl``.

    >>> g = Group("q", "t", "query", ("a", "b", "c"), ("A", "B", "C"), (0.5, 1 / 3, 0.25), (1, 2, 3))
    >>> training_rows([g], "kl", 3, 1, 0).columns.tolist()
    ['query', 'doc_0', 'doc_1', 'doc_2', 'label']
    >>> training_rows([g], "mnrl", 3, 1, 0).iloc[0].tolist()
    ['query', 'A', 'B', 'C']
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    skipped = 0
    for group in groups:
        for _ in range(per_list):
            part = group.subset(sample_indices(len(group.doc_ids), group_size, rng))
            if loss == "kl":
                if len(part.passages) != group_size:
                    skipped += 1
                    continue
                row: dict[str, Any] = {"query": part.query}
                row.update({f"doc_{i}": p for i, p in enumerate(part.passages)})
                row["label"] = list(part.targets)
                rows.append(row)
            elif loss == "margin-mse":
                for i in range(len(part.passages)):
                    for j in range(i + 1, len(part.passages)):
                        rows.append(
                            {
                                "query": part.query,
                                "positive": part.passages[i],
                                "negative": part.passages[j],
                                "label": part.targets[i] - part.targets[j],
                            }
                        )
            elif loss == "mnrl":
                if len(part.passages) != group_size:
                    skipped += 1
                    continue
                row = {"query": part.query, "positive": part.passages[0]}
                row.update({f"negative_{i}": p for i, p in enumerate(part.passages[1:], start=1)})
                rows.append(row)
            else:
                raise ValueError(f"loss {loss!r} is not a bi-encoder loss ({LOSSES})")
    if skipped:
        log.warning("%d sampled groups have fewer than group_size=%d candidates: left out", skipped, group_size)
    return pd.DataFrame(rows)


def library_loss(model: Any, cfg: StudentConfig) -> Any:
    from sentence_transformers.sentence_transformer import losses

    settings = cfg.bi_encoder
    if cfg.loss == "kl":
        return losses.DistillKLDivLoss(
            model, student_temperature=settings.student_temperature, teacher_temperature=settings.teacher_temperature
        )
    if cfg.loss == "margin-mse":
        return losses.MarginMSELoss(model)
    return losses.MultipleNegativesRankingLoss(model, scale=1.0 / settings.student_temperature)


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
    """Distil the teacher's rankings of ``examples`` into a bi-encoder and save it to ``out_dir``."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    train_groups, dev_groups = training_split(name, cfg.labels, examples)
    if cfg.group_size is None:
        raise ValueError(f"students.{name}.group_size: a bi-encoder needs a group size (e.g. 8)")
    model = build_model(cfg.init_from or cfg.backbone, device)
    precision = resolve_precision(cfg.precision, model.device)
    cap = min(model_max_positions(model[0].auto_model.config), int(model.tokenizer.model_max_length or 512))
    max_length = fit_max_length(cfg.max_length, cap, lambda: text_lengths(model.tokenizer, examples, cfg.seed))
    model.max_seq_length = max_length
    rows = training_rows(train_groups, cfg.loss, cfg.group_size, cfg.groups_per_list, cfg.seed)
    if rows.empty:
        raise ValueError(f"students.{name}: no training group has group_size={cfg.group_size} candidates")
    pairs = 2.0 if cfg.loss == "margin-mse" else float(cfg.group_size)
    run = sbert.Run(
        model=model,
        loss=library_loss(model, cfg),
        train_rows=rows,
        wrap=lambda m: BiEncoderStudent(m, precision),
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
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        checkpoint_dir,
        out_dir,
        callbacks,
    )
    info = {
        "kind": KIND,
        "backbone": cfg.backbone,
        "max_length": max_length,
        "precision": precision,
        "similarity": str(model.similarity_fn_name),
    }
    return TrainResult(summary, curve, info=info)


def load(folder: Path, info: dict, device: str | None = None) -> BiEncoderStudent:
    """A trained bi-encoder folder, as ``registry.load_student`` calls it."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(folder), device=str(pick_device(device)), local_files_only=True)
    except (OSError, ValueError) as err:
        raise StudentLoadError(f"{folder}: cannot load the bi-encoder: {err}") from err
    return BiEncoderStudent(model, resolve_precision(info.get("precision", "fp32"), model.device))


def untrained(cfg: StudentConfig, device: str | None = None, max_length: int | None = None) -> BiEncoderStudent:
    """The student's starting point: the backbone (or ``init_from``) as it is, at ``max_length`` (the trained
    student's, for a like-for-like comparison; None: the backbone's own)."""
    model = build_model(cfg.init_from or cfg.backbone, device)
    if max_length:
        model.max_seq_length = max_length
    return BiEncoderStudent(model, resolve_precision(cfg.precision, model.device))
