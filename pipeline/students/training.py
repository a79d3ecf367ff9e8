"""Training of the ranking students with the ``transformers`` Trainer, and the pieces every student kind shares
(the R2R trainer reuses them): fidelity on the dev split, checkpoint/config checks, training curves, the model
card, the metrics JSON and an atomic output folder.

What the Trainer does for us: the optimizer and lr schedule with warmup, gradient accumulation, bf16 on CUDA,
seeding, checkpoints with optimizer/scheduler/RNG state, resumption, best-checkpoint selection and the progress
bar. What is written here, because the Trainer has no notion of it: a listwise loss over query groups
(``compute_loss``), a collator that tokenizes one query group per example, and an ``evaluate`` that measures
ranking fidelity against the teacher instead of a loss on held-out batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import StudentConfig
from pipeline.io import write_json, write_text
from pipeline.metrics import evaluate_run

log = logging.getLogger(__name__)

CONFIG_FILE = "distillrank_config.json"  # in the checkpoint folder: the config its checkpoints were trained with
CURVE_COLUMNS = ["step", "train_loss", "dev_ndcg@10", "dev_kendall_tau"]
HEADLINE = "nDCG@10"
CROSS_ENCODER_NOTE = "It also loads with `sentence_transformers.CrossEncoder(path)` (identical raw scores)."


# -- data ---------------------------------------------------------------------------------------------------------
def query_groups(examples: pd.DataFrame, split: str) -> list[dict[str, Any]]:
    """One dict per query of ``split``: query_id, query, doc_ids, passages, targets, teacher_ranks (teacher order).

    >>> ex = pd.DataFrame({"query_id": ["q", "q"], "query": ["a", "a"], "doc_id": ["d2", "d1"], "passage": ["y", "x"],
    ...                    "teacher_rank": [2, 1], "target": [1 / 3, 0.5], "split": ["train", "train"]})
    >>> query_groups(ex, "train")[0]["doc_ids"]
    ['d1', 'd2']
    """
    part = examples[examples["split"] == split].sort_values(["query_id", "teacher_rank"], kind="stable")
    return [
        {
            "query_id": query_id,
            "query": group["query"].iloc[0],
            "doc_ids": group.doc_id.tolist(),
            "passages": group.passage.tolist(),
            "targets": group.target.astype(float).tolist(),
            "teacher_ranks": group.teacher_rank.astype(int).tolist(),
        }
        for query_id, group in part.groupby("query_id", sort=True)
    ]


class GroupDataset(torch.utils.data.Dataset):
    """Query groups as a map-style dataset (one item = one query and all its candidates)."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.groups[index]


class GroupCollator:
    """Tokenizes the candidates of each query group of a batch into one flat batch of pairs, with ``targets`` and
    ``mask`` [Q, N] (N: the largest group). ``group_size``: that many candidates sampled per group (from Python's
    ``random``, whose state the Trainer checkpoints, so a resumed run samples what an unbroken one would)."""

    def __init__(self, student: Any, group_size: int | None = None) -> None:
        self.student = student
        self.group_size = group_size

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        queries, passages, targets = [], [], []
        for group in groups:
            index = list(range(len(group["passages"])))
            if self.group_size is not None and len(index) > self.group_size:
                index = sorted(random.sample(index, self.group_size))
            queries += [group["query"]] * len(index)
            passages += [group["passages"][i] for i in index]
            targets.append([group["targets"][i] for i in index])
        width = max(len(t) for t in targets)
        target = torch.zeros(len(groups), width, dtype=torch.float32)
        mask = torch.zeros(len(groups), width, dtype=torch.bool)
        for row, values in enumerate(targets):
            target[row, : len(values)] = torch.tensor(values)
            mask[row, : len(values)] = True
        batch = self.student.tokenizer.pad(self.student.tokenize(queries, passages), padding=True, return_tensors="pt")
        return {**batch, "targets": target, "mask": mask}


# -- fidelity -----------------------------------------------------------------------------------------------------
def fidelity(frame: pd.DataFrame) -> dict[str, float]:
    """How well a student reproduces its teacher on ``frame`` (query_id, doc_id, teacher_rank, score: the
    student's): nDCG@10 (ir_measures) with the teacher's ranking as graded labels, relevance = number of candidates
    − teacher_rank (the teacher's last candidate gets 0), and Kendall's tau between the student's scores and the
    teacher's order, averaged over queries (a query whose scores are all tied counts as tau = 0).

    >>> f = pd.DataFrame({"query_id": ["q"] * 3, "doc_id": ["a", "b", "c"], "teacher_rank": [1, 2, 3],
    ...                   "score": [3.0, 2.0, 1.0]})
    >>> fidelity(f)
    {'nDCG@10': 1.0, 'kendall_tau': 1.0}
    """
    from scipy.stats import kendalltau

    if frame.empty:
        return {HEADLINE: float("nan"), "kendall_tau": float("nan")}
    size = frame.groupby("query_id").doc_id.transform("size")
    qrels = frame.assign(relevance=(size - frame.teacher_rank).clip(lower=0).astype(int))
    ndcg = evaluate_run(qrels, frame, (HEADLINE,)).aggregate[HEADLINE]
    taus = []
    for _, group in frame.groupby("query_id"):
        if len(group) < 2:
            continue
        tau = kendalltau(group.score.to_numpy(), -group.teacher_rank.to_numpy()).statistic
        taus.append(0.0 if np.isnan(tau) else float(tau))
    return {HEADLINE: round(float(ndcg), 6), "kendall_tau": round(float(np.mean(taus)), 6) if taus else float("nan")}


def student_fidelity(student: Any, groups: list[dict[str, Any]], batch_size: int = 32) -> dict[str, float]:
    """``fidelity`` of a student (anything with ``score_pairs``) on query groups."""
    queries = [g["query"] for g in groups for _ in g["passages"]]
    passages = [p for g in groups for p in g["passages"]]
    scores = student.score_pairs(queries, passages, batch_size=batch_size) if passages else np.zeros(0)
    frame = pd.DataFrame(
        {
            "query_id": [g["query_id"] for g in groups for _ in g["passages"]],
            "doc_id": [d for g in groups for d in g["doc_ids"]],
            "teacher_rank": [r for g in groups for r in g["teacher_ranks"]],
            "score": scores.astype(float),
        }
    )
    return fidelity(frame)


# -- checkpoints --------------------------------------------------------------------------------------------------
def run_config(cfg: StudentConfig, examples: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the student's config and a fingerprint of its training data."""
    digest = hashlib.sha256()
    for column in ("query_id", "doc_id", "teacher_rank", "split"):
        digest.update(pd.util.hash_pandas_object(examples[column], index=False).to_numpy().tobytes())
    return {"student": dataclasses.asdict(cfg), "examples_sha256": digest.hexdigest(), **extra}


def prepare_checkpoints(checkpoint_dir: Path, config: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from: the last one in ``checkpoint_dir`` when its recorded config equals
    ``config``. A different (or unrecorded) config clears the folder and starts fresh (logged); the config is then
    recorded."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    recorded_path = checkpoint_dir / CONFIG_FILE
    expected = json.loads(json.dumps(config, default=str))
    if checkpoint_dir.is_dir():
        recorded = json.loads(recorded_path.read_text(encoding="utf-8")) if recorded_path.is_file() else None
        last = get_last_checkpoint(str(checkpoint_dir))
        if recorded == expected and last is not None:
            log.info("resuming from checkpoint %s (same config)", last)
            return Path(last)
        if last is not None:
            log.warning("config or training data changed since the checkpoints in %s: starting fresh", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    write_json(expected, recorded_path)
    return None


# -- outputs ------------------------------------------------------------------------------------------------------


def run_train_loss(log_history: list[dict], trainer_loss: float, resumed_step: int) -> float:
    """The mean training loss of the whole run. The Trainer's ``training_loss`` covers only the steps of its own
    call, so after a resume it is the mean over the steps left (0.0 when none was): then the losses logged over
    the whole run (every ``logging_steps``), restored with the checkpoint, are averaged instead.

    >>> run_train_loss([{"loss": 0.7, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_ndcg@10": 1.0}], 0.0, 2)
    0.6
    >>> run_train_loss([{"loss": 0.7, "step": 1}], 0.65, 0)
    0.65
    """
    losses = [float(entry["loss"]) for entry in log_history if "loss" in entry]
    if resumed_step == 0 or not losses:
        return trainer_loss
    return sum(losses) / len(losses)


def curve_from_log_history(log_history: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Training curve (step, train_loss, dev_ndcg@10, dev_kendall_tau) from the Trainer's ``state.log_history``.

    >>> curve_from_log_history([{"step": 2, "loss": 0.7}, {"step": 4, "loss": 0.6}, {"step": 4, "eval_ndcg@10": 0.9}])
       step  train_loss  dev_ndcg@10  dev_kendall_tau
    0     2         0.7          NaN              NaN
    1     4         0.6          0.9              NaN
    """
    rows: dict[int, dict[str, float]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = rows.setdefault(step, {"step": step})
        if "loss" in entry:
            row["train_loss"] = float(entry["loss"])
        if "eval_ndcg@10" in entry:
            row["dev_ndcg@10"] = float(entry["eval_ndcg@10"])
        if "eval_kendall_tau" in entry:
            row["dev_kendall_tau"] = float(entry["eval_kendall_tau"])
    curve = pd.DataFrame([r for r in rows.values() if len(r) > 1], columns=CURVE_COLUMNS)
    return curve.sort_values("step").reset_index(drop=True)


def write_curve(name: str, curve: pd.DataFrame, plots_dir: Path | str) -> tuple[Path, Path]:
    """``<plots>/training/<name>.csv`` (a DVC plot) and a PNG of the same curves (loss; dev fidelity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(plots_dir) / "training"
    csv_path, png_path = folder / f"{name}.csv", folder / f"{name}.png"
    write_text(curve.to_csv(index=False), csv_path)
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    loss = curve.dropna(subset=["train_loss"]) if "train_loss" in curve else curve.iloc[0:0]
    ax_loss.plot(loss.step, loss.train_loss, marker=".")
    ax_loss.set(title=f"{name}: training loss", xlabel="step", ylabel="loss")
    for column in [c for c in curve.columns if c.startswith("dev_")]:
        points = curve.dropna(subset=[column])
        ax_dev.plot(points.step, points[column], marker="o", label=column.removeprefix("dev_"))
    ax_dev.set(title=f"{name}: dev fidelity to the teacher", xlabel="step")
    if ax_dev.lines:
        ax_dev.legend()
    fig.tight_layout()
    with contextlib.ExitStack() as stack:
        from pipeline.io import atomic_path

        tmp = stack.enter_context(atomic_path(png_path))
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return csv_path, png_path


def finish_student_folder(
    folder: Path, name: str, cfg: StudentConfig, summary: dict[str, Any], teacher: dict[str, Any]
) -> None:
    """Write the model card (README.md) and add the teacher, loss, labels and dev figures to the folder's
    ``distillrank_student.json`` (which the trainer of the student's kind wrote)."""
    from pipeline.students.base import STUDENT_FILE

    folder = Path(folder)
    info_path = folder / STUDENT_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {"kind": cfg.kind}
    info.update(teacher=teacher, loss=cfg.loss, labels=cfg.labels, dev=summary.get("dev"), steps=summary.get("steps"))
    info.setdefault("backbone", cfg.backbone)
    info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(info, info_path)
    write_text(model_card(name, cfg, summary, teacher), folder / "README.md")


def write_student_metrics(name: str, summary: dict[str, Any], metrics_dir: Path | str) -> Path:
    """``<metrics>/students/<name>.json``: kind, backbone, loss, steps, best_step, dev, train_pairs, seconds,
    pairs_per_second (and whatever else ``summary`` holds)."""
    return write_json(summary, Path(metrics_dir) / "students" / f"{name}.json")


def model_card(name: str, cfg: StudentConfig, summary: dict[str, Any], teacher: dict[str, Any]) -> str:
    """README.md of a student folder: what it is, who taught it, on what, and how faithful it is."""
    dev = summary.get("dev") or {}
    dev_lines = "\n".join(f"| {k} | {v} |" for k, v in dev.items()) or "| (no dev split) | |"
    hyper = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in {"kind", "backbone", "labels", "loss", "r2r"}}
    if cfg.kind == "r2r":
        hyper["r2r"] = dataclasses.asdict(cfg.r2r)
    scorer = {
        "cross-encoder": "the one-logit head of a cross-encoder",
        "twolar-seq2seq": 'logit("true") − logit("false") at the first decoding step for '
        "`Query: {q} Document: {d} Relevant:`",
        "twolar-causal": 'logit(" true") − logit(" false") for the token after `Query: {q} Document: {d} Relevant:`',
        "r2r": "a Reason-to-Rank student (ranking score + generated direct/comparative reasons)",
    }[cfg.kind]
    return f"""---
library_name: transformers
tags: [reranking, distillation, distillrank, {cfg.kind}]
---
# {name}

A passage reranker distilled by **distillrank** from an LLM teacher's rankings ({cfg.kind}, TWOLAR-style
training). Score: {scorer}.

- Backbone: `{cfg.backbone}`
- Teacher: `{teacher.get("model", "unknown")}`, method `{teacher.get("method", "unknown")}`
- Training data: teach target `{cfg.labels}` — {summary.get("train_queries", "?")} training queries,
  {summary.get("train_pairs", "?")} (query, passage) pairs; targets 1/(teacher_rank + 1)
- Loss: `{cfg.loss}`; steps: {summary.get("steps", "?")} (best dev checkpoint: step {summary.get("best_step")})

## Dev fidelity to the teacher

nDCG@10 with the teacher's ranking as graded labels, and Kendall's tau with the teacher's order
({summary.get("dev_queries", 0)} dev queries).

| measure | value |
|---|---|
{dev_lines}

## Training parameters

```json
{json.dumps(hyper, indent=2, default=str)}
```

## Use

```python
from pipeline.students.base import load_student
student = load_student("{name}")
scores = student.score("a query", ["passage one", "passage two"])
```
{CROSS_ENCODER_NOTE if cfg.kind == "cross-encoder" else ""}
"""


# -- the Trainer --------------------------------------------------------------------------------------------------
def _trainer_class() -> type:
    from transformers import Trainer

    from pipeline.students.losses import get_loss

    class RankingTrainer(Trainer):
        """The Trainer with a listwise loss over query groups and a fidelity ``evaluate``."""

        def __init__(self, *args: Any, student: Any, loss: str, dev_groups: list[dict[str, Any]], **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.student = student
            self.loss_fn = get_loss(loss)
            self.dev_groups = dev_groups

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            targets, mask = inputs.pop("targets"), inputs.pop("mask")
            flat = self.student.forward_scores(inputs, model)
            scores = flat.new_zeros(mask.shape)
            scores[mask] = flat  # groups are laid out one after the other, as the collator flattened them
            loss = self.loss_fn(scores, targets, mask)
            return (loss, {"scores": scores}) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # type: ignore[override]
            started = time.perf_counter()
            values = student_fidelity(self.student, self.dev_groups, self.args.per_device_eval_batch_size)
            metrics = {
                f"{metric_key_prefix}_ndcg@10": values[HEADLINE],
                f"{metric_key_prefix}_kendall_tau": values["kendall_tau"],
                f"{metric_key_prefix}_seconds": round(time.perf_counter() - started, 2),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return RankingTrainer


def train_ranking(
    name: str,
    cfg: StudentConfig,
    examples: pd.DataFrame,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: list[Any] | None = None,
    device: str | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train a cross-encoder / TWOLAR student on ``examples``; save it (HF format + distillrank_student.json) to
    ``out_dir``. Returns (summary, curve). Resumes from ``checkpoint_dir`` when its config matches."""
    from transformers import TrainingArguments

    from pipeline.students.models import build_student

    started = time.perf_counter()
    train_groups, dev_groups = query_groups(examples, "train"), query_groups(examples, "dev")
    if not train_groups:
        raise ValueError(f"students.{name}: no training queries in the examples of {cfg.labels!r}")
    resume = prepare_checkpoints(checkpoint_dir, run_config(cfg, examples))
    student = build_student(cfg.kind, cfg.backbone, cfg.max_length, device=device)
    cuda = student.device.type == "cuda"
    has_dev = bool(dev_groups)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.queries_per_batch,
        per_device_eval_batch_size=32,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        lr_scheduler_type=cfg.scheduler,
        logging_steps=max(1, cfg.eval_every // 4),
        eval_strategy="steps" if has_dev else "no",
        eval_steps=cfg.eval_every,
        save_strategy="steps",
        save_steps=cfg.eval_every,
        save_total_limit=2,  # the last and (with load_best_model_at_end) the best
        load_best_model_at_end=has_dev,
        metric_for_best_model="ndcg@10" if has_dev else None,
        greater_is_better=True,
        seed=cfg.seed,
        bf16=cuda,
        use_cpu=not cuda,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=False,
    )
    trainer = _trainer_class()(
        model=student.model,
        args=args,
        train_dataset=GroupDataset(train_groups),
        eval_dataset=GroupDataset(dev_groups) if has_dev else None,
        data_collator=GroupCollator(student, cfg.group_size),
        processing_class=student.tokenizer,
        callbacks=callbacks,
        student=student,
        loss=cfg.loss,
        dev_groups=dev_groups,
    )
    resumed_step = 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        resumed_step = int(state.get("global_step", 0))
        log.info("resuming %s at step %d from %s", name, resumed_step, resume)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    state = trainer.state
    dev = student_fidelity(student, dev_groups) if has_dev else {}  # the best checkpoint, reloaded
    seconds = time.perf_counter() - started
    pair_count = int((examples["split"] == "train").sum())
    per_step = cfg.queries_per_batch * cfg.gradient_accumulation
    mean_group = pair_count / len(train_groups)
    seen_pairs = (state.global_step - resumed_step) * per_step * min(mean_group, cfg.group_size or mean_group)
    summary = {
        "kind": cfg.kind,
        "backbone": cfg.backbone,
        "loss": cfg.loss,
        "labels": cfg.labels,
        "steps": int(state.global_step),
        "best_step": int(state.best_global_step) if state.best_global_step else None,
        "resumed_from_step": resumed_step,
        "dev": dev,
        "dev_queries": len(dev_groups),
        "train_queries": len(train_groups),
        "train_pairs": pair_count,
        "train_loss": round(run_train_loss(state.log_history, float(output.training_loss), resumed_step), 6),
        "seconds": round(seconds, 1),
        # None when a resumed run had no step left to train (nothing was measured)
        "pairs_per_second": (
            round(seen_pairs / float(output.metrics.get("train_runtime", seconds)), 2) if seen_pairs else None
        ),
        "device": str(student.device),
    }
    student.save(out_dir, loss=cfg.loss, labels=cfg.labels, steps=summary["steps"])
    return summary, curve_from_log_history(state.log_history)
