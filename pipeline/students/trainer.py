"""The one trainer base of the language-model students (``twolar-seq2seq``, ``twolar-causal``, ``r2r``).

It owns what every LM kind shares: the ``transformers`` Trainer and its arguments (optimizer, warmup and schedule,
gradient accumulation, bf16 autocast where the hardware has it, seeding), the checkpoint and resume policy
(``pipeline.students.checkpoints``), the sampling of ``group_size`` candidates per group, the dev fidelity used to
keep the best checkpoint (``pipeline.students.fidelity``), the training curve and the summary. A kind supplies
only what is its own, through ``LMKind``: the model, how a batch of groups becomes tensors (its collator), its
loss, how it scores (for fidelity) and how it saves.

Sentence-transformers students (``cross-encoder``, ``bi-encoder``) train on the library's own trainers instead
(``pipeline.students.sbert``), with the same checkpoint policy and fidelity.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from pipeline.config import StudentConfig
from pipeline.students import checkpoints
from pipeline.students.backbones import Precision
from pipeline.students.fidelity import HEADLINE, student_fidelity
from pipeline.students.groups import Group, GroupDataset, sample_indices, split_counts, training_split
from pipeline.students.outputs import curve_from_log_history

log = logging.getLogger(__name__)


class LMKind(Protocol):
    """What an LM student kind gives the shared trainer."""

    model: torch.nn.Module  # what the Trainer optimises
    tokenizer: Any
    device: torch.device

    def collate(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        """A batch of (already sampled) groups as the tensors ``loss`` reads."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch and its named parts, for the logs (empty when it has none)."""
        ...

    def student(self) -> Any:
        """The current weights as a ``Student`` (anything with ``score_pairs``), for dev fidelity."""
        ...

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups of their own (e.g. R2R's learned loss weights: own lr, no decay); their
        parameters are taken out of the default groups."""
        ...


class SampledCollator:
    """Cuts each group to ``group_size`` candidates (``groups.sample_indices``, with Python's ``random``, whose
    state the Trainer checkpoints: a resumed run samples what an unbroken one would), then hands the batch to the
    kind's collator."""

    def __init__(self, kind: LMKind, group_size: int | None) -> None:
        self.kind = kind
        self.group_size = group_size

    def __call__(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        cut = [g.subset(sample_indices(len(g.doc_ids), self.group_size, random)) for g in groups]
        return self.kind.collate(cut)


def _trainer_class() -> type:
    from transformers import PreTrainedModel, Trainer

    class LMTrainer(Trainer):
        """The Trainer with the kind's loss, its loss parts in the logs, extra parameter groups, fidelity as the
        evaluation, and plain ``torch.save`` checkpoints for models that are not ``PreTrainedModel`` (R2R's
        backbone + head: tied embeddings share storage, which safetensors' ``save_file`` refuses)."""

        def __init__(self, *args: Any, kind: LMKind, dev_groups: list[Group], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kind = kind
            self.dev_groups = dev_groups
            self._parts: list[dict[str, float]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            loss, parts = self.kind.loss(model, inputs)
            if parts:
                self._parts.append(parts)
            return (loss, {"loss": loss}) if return_outputs else loss

        def create_optimizer(self, model=None):  # type: ignore[override]
            optimizer = super().create_optimizer(model)
            extra = self.kind.extra_parameter_groups()
            if extra and not any(g.get("distillrank_extra") for g in optimizer.param_groups):
                special = {id(p) for group in extra for p in group["params"]}
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in special]
                for group in extra:
                    optimizer.add_param_group({**group, "distillrank_extra": True})
            return optimizer

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
            if "loss" in logs and self._parts:
                for key in self._parts[0]:
                    values = [p[key] for p in self._parts if not math.isnan(p[key])]
                    logs[key] = float(np.mean(values)) if values else float("nan")
                self._parts = []
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # type: ignore[override]
            started = time.perf_counter()
            values = student_fidelity(self.kind.student(), self.dev_groups, batch_size=32)
            metrics = {
                f"{metric_key_prefix}_ndcg@10": values[HEADLINE],
                f"{metric_key_prefix}_kendall_tau": values["kendall_tau"],
                f"{metric_key_prefix}_seconds": round(time.perf_counter() - started, 2),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if isinstance(self.model, PreTrainedModel):
                super()._save(output_dir, state_dict)
                return
            from transformers.utils import WEIGHTS_NAME

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.model.state_dict() if state_dict is None else state_dict, Path(output_dir) / WEIGHTS_NAME)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    return LMTrainer


def _evaluate_at_end() -> Any:
    from transformers import TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        """Evaluate and checkpoint at the last step too, so that the best-model choice sees the finished model."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = args.eval_strategy != "no"
                control.should_save = True
            return control

    return EvaluateAtEnd()


def training_arguments(cfg: StudentConfig, checkpoint_dir: Path, precision: Precision, has_dev: bool) -> Any:
    from transformers import TrainingArguments

    common = checkpoints.trainer_arguments(cfg, checkpoint_dir, precision, has_dev, "ndcg@10", eval_batch_size=32)
    # the collators read the raw group fields, and pinned memory only helps a GPU
    return TrainingArguments(**common, remove_unused_columns=False, dataloader_pin_memory=False)


def train(
    name: str,
    cfg: StudentConfig,
    kind: LMKind,
    examples: pd.DataFrame,
    checkpoint_dir: Path,
    precision: Precision,
    callbacks: list[Any] | None = None,
    **fingerprint_extra: Any,
) -> tuple[dict[str, Any], pd.DataFrame, list[Group]]:
    """Train ``kind`` on ``examples`` (resuming a killed run; from scratch when code, config or data changed);
    the best dev checkpoint is loaded at the end. Returns (summary, curve, dev groups); the caller saves."""
    started = time.perf_counter()
    train_groups, dev_groups = training_split(name, cfg.labels, examples)
    resume = checkpoints.prepare(
        checkpoint_dir, checkpoints.fingerprint(cfg, examples, precision=precision, **fingerprint_extra)
    )
    has_dev = bool(dev_groups)
    trainer = _trainer_class()(
        model=kind.model,
        args=training_arguments(cfg, checkpoint_dir, precision, has_dev),
        train_dataset=GroupDataset(train_groups),
        eval_dataset=GroupDataset(dev_groups) if has_dev else None,
        data_collator=SampledCollator(kind, cfg.group_size),
        processing_class=kind.tokenizer,
        callbacks=[_evaluate_at_end(), *(callbacks or [])],
        kind=kind,
        dev_groups=dev_groups,
    )
    mean_group = sum(len(g.doc_ids) for g in train_groups) / len(train_groups)
    per_group = min(mean_group, cfg.group_size or mean_group)
    summary, state = checkpoints.run_training(
        trainer,
        cfg,
        checkpoint_dir,
        resume,
        kind.student,
        dev_groups,
        cfg.queries_per_batch * cfg.gradient_accumulation * per_group,
        started,
    )
    summary.update(**split_counts(train_groups, dev_groups), precision=precision, device=str(kind.device))
    return summary, curve_from_log_history(state.log_history), dev_groups
