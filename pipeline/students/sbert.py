"""Training on sentence-transformers' own trainers, shared by the cross-encoder and bi-encoder kinds.

The library does the work: ``CrossEncoderTrainer`` / ``SentenceTransformerTrainer`` (the transformers Trainer:
optimizer, warmup and schedule, gradient accumulation, bf16 autocast, seeding, checkpoints with optimizer and RNG
state, best-checkpoint selection), its losses and its model card. What this module adds: the dev-fidelity
evaluator (``FidelityEvaluator``, the one definition of ``pipeline.students.fidelity``), the checkpoint policy
(``pipeline.students.checkpoints``) and the run's summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import StudentConfig
from pipeline.students import checkpoints
from pipeline.students.backbones import Precision
from pipeline.students.card import prime_library_card
from pipeline.students.fidelity import HEADLINE, student_fidelity
from pipeline.students.groups import Group, split_counts
from pipeline.students.outputs import curve_from_log_history

log = logging.getLogger(__name__)

EVALUATOR_NAME = "dev"


def fidelity_evaluator(groups: list[Group], wrap: Callable[[Any], Any], batch_size: int = 64) -> Any:
    """A sentence-transformers evaluator that measures fidelity to the teacher on ``groups``; ``wrap(model)`` turns
    the model being trained into a ``Student`` (anything with ``score_pairs``)."""
    from sentence_transformers.base.evaluation import BaseEvaluator

    class FidelityEvaluator(BaseEvaluator):
        """nDCG@10 with the teacher's ranking as labels and Kendall's tau, on the dev groups."""

        def __init__(self) -> None:
            super().__init__()
            self.name = EVALUATOR_NAME
            self.primary_metric = "ndcg@10"

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict:
            values = student_fidelity(wrap(model), groups, batch_size=batch_size)
            metrics = {"ndcg@10": values[HEADLINE], "kendall_tau": values["kendall_tau"]}
            metrics = self.prefix_name_to_metrics(metrics, self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

    return FidelityEvaluator()


@dataclass(frozen=True)
class Run:
    """What the kind-specific part hands over: the model, its loss, the training rows, and how to score."""

    model: Any  # a CrossEncoder or a SentenceTransformer
    loss: Any
    train_rows: pd.DataFrame  # one row per training example, in the columns the loss reads
    wrap: Callable[[Any], Any]  # model -> Student
    pairs_per_row: float  # (query, passage) pairs one row holds, for the pairs/s figure
    precision: Precision
    max_length: int


def train(
    name: str,
    cfg: StudentConfig,
    run: Run,
    examples: pd.DataFrame,
    groups: tuple[list[Group], list[Group]],
    trainer_cls: type,
    args_cls: type,
    checkpoint_dir: Path,
    out_dir: Path,
    callbacks: list[Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train ``run.model`` with the library's trainer (resuming a killed run; with ``keep_best``, ending on the
    best dev checkpoint), save it natively to ``out_dir`` and return (summary, curve). ``groups``: the (train, dev)
    groups of ``examples`` (``training_split``; ``run.train_rows`` come from the train ones)."""
    from datasets import Dataset

    train_groups, dev_groups = groups
    started = time.perf_counter()
    fingerprint = checkpoints.fingerprint(cfg, examples, max_length=run.max_length, precision=run.precision)
    resume = checkpoints.prepare(checkpoint_dir, fingerprint)
    has_dev = bool(dev_groups)
    evaluator = fidelity_evaluator(dev_groups, run.wrap) if has_dev else None
    trainer = trainer_cls(
        model=run.model,
        args=args_cls(
            **checkpoints.trainer_arguments(
                cfg, checkpoint_dir, run.precision, has_dev, f"{EVALUATOR_NAME}_ndcg@10", eval_batch_size=64
            )
        ),
        train_dataset=Dataset.from_pandas(run.train_rows, preserve_index=False),
        loss=run.loss,
        evaluator=evaluator,
        callbacks=callbacks,
    )
    summary, state = checkpoints.run_training(
        trainer,
        cfg,
        checkpoint_dir,
        resume,
        lambda: run.wrap(run.model),
        dev_groups,
        cfg.queries_per_batch * cfg.gradient_accumulation * run.pairs_per_row,
        started,
    )
    prime_library_card(run.model, name, cfg.init_from or cfg.backbone)  # the library's card names them itself
    run.model.save_pretrained(str(out_dir))
    summary.update(
        train_rows=len(run.train_rows),
        precision=run.precision,
        max_length=run.max_length,
        **split_counts(train_groups, dev_groups),
        device=str(run.model.device),
    )
    return summary, curve_from_log_history(state.log_history)
