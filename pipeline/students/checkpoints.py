"""When a training run resumes from its checkpoints, and when it starts again from scratch. One policy for every
student kind.

A run's *fingerprint* is what its result depends on: the student's config, its training examples, the code that
trains it (every ``.py`` file of ``pipeline/students``) and the versions of torch, transformers and
sentence-transformers. The checkpoint folder records the fingerprint it was trained with and, once the run has
finished, a ``finished`` marker. Then:

- a **killed** run (same fingerprint, no marker) resumes at its last checkpoint, with the optimizer, scheduler
  and RNG states saved there, so that it ends where an unbroken run would have;
- a **finished** run is never resumed: the folder is cleared and training starts from scratch (resuming a
  finished run would train 0 steps and report figures that the current code did not produce);
- a **changed** fingerprint (code, config, data or libraries) clears the folder and starts from scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import StudentConfig
from pipeline.io import write_json
from pipeline.students.fidelity import student_fidelity
from pipeline.students.groups import Group
from pipeline.students.outputs import run_train_loss

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "distillrank_fingerprint.json"
FINISHED_FILE = "distillrank_finished.json"
STUDENTS_PACKAGE = Path(__file__).resolve().parent
EXAMPLE_COLUMNS = ("query_id", "list", "doc_id", "teacher_rank", "split", "query", "passage")


def code_sha256(package: Path = STUDENTS_PACKAGE) -> str:
    """sha256 over every ``.py`` file of the students package (relative path and content, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def examples_sha256(examples: pd.DataFrame) -> str:
    """sha256 of the training examples' identifying columns (those present), row order included."""
    digest = hashlib.sha256()
    for column in EXAMPLE_COLUMNS:
        if column in examples:
            digest.update(column.encode())
            digest.update(pd.util.hash_pandas_object(examples[column], index=False).to_numpy().tobytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }


def fingerprint(cfg: Any, examples: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (JSON-ready)."""
    values = {
        "student": dataclasses.asdict(cfg),
        "examples_sha256": examples_sha256(examples),
        "code_sha256": code_sha256(),
        "libraries": library_versions(),
        **extra,
    }
    return json.loads(json.dumps(values, default=str))


def prepare(checkpoint_dir: Path | str, expected: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None to train from scratch (see the module docstring); the folder is
    cleared when it cannot be resumed, and the fingerprint recorded."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        recorded_path = checkpoint_dir / FINGERPRINT_FILE
        recorded = json.loads(recorded_path.read_text(encoding="utf-8")) if recorded_path.is_file() else None
        last = get_last_checkpoint(str(checkpoint_dir))
        finished = (checkpoint_dir / FINISHED_FILE).is_file()
        if recorded == expected and last is not None and not finished:
            log.info("resuming the killed run from %s (same code, config and data)", last)
            return Path(last)
        if finished:
            log.info("%s holds a finished run: training from scratch", checkpoint_dir)
        elif last is not None:
            changed = sorted(
                k for k in set(expected) | set(recorded or {}) if (recorded or {}).get(k) != expected.get(k)
            )
            log.warning(
                "%s: %s changed since its checkpoints: training from scratch", checkpoint_dir, ", ".join(changed)
            )
        shutil.rmtree(checkpoint_dir)
    write_json(expected, checkpoint_dir / FINGERPRINT_FILE)
    return None


def resumed_step(checkpoint: Path | None) -> int:
    """The global step a checkpoint was saved at (0 for None)."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def mark_finished(checkpoint_dir: Path | str, steps: int) -> None:
    """Record that the run in ``checkpoint_dir`` finished (so that it is never resumed)."""
    write_json({"steps": steps}, Path(checkpoint_dir) / FINISHED_FILE)


def trainer_arguments(
    cfg: StudentConfig, checkpoint_dir: Path, precision: str, has_dev: bool, best_metric: str, eval_batch_size: int
) -> dict[str, Any]:
    """The ``TrainingArguments`` every student trains with (the transformers ones and sentence-transformers'
    subclasses take the same names): batch and schedule from ``cfg``, an evaluation and a checkpoint every
    ``eval_every`` steps (the last two kept: the last and, with ``keep_best``, the best by ``best_metric``)."""
    import torch

    return {
        "output_dir": str(checkpoint_dir),
        "per_device_train_batch_size": cfg.queries_per_batch,
        "per_device_eval_batch_size": eval_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        "lr_scheduler_type": cfg.scheduler,
        "logging_steps": max(1, cfg.eval_every // 4),
        "eval_strategy": "steps" if has_dev else "no",
        "eval_steps": cfg.eval_every,
        "save_strategy": "steps",
        "save_steps": cfg.eval_every,
        "save_total_limit": 2,  # the last and (with load_best_model_at_end) the best
        "load_best_model_at_end": has_dev and cfg.keep_best,
        "metric_for_best_model": best_metric if has_dev else None,
        "greater_is_better": True,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": precision == "bf16",
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "report_to": "none",
        "disable_tqdm": False,
    }


@contextlib.contextmanager
def training_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` (``students.<name>.threads``) for the block, restored after;
    None leaves it alone. Training is bit-reproducible for a given count, but not across counts: LayerNorm's
    backward sums its weight gradients in one chunk per thread (the forward, hence scoring, does not depend on it).

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with training_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def run_training(
    trainer: Any,
    cfg: StudentConfig,
    checkpoint_dir: Path,
    resume: Path | None,
    student: Callable[[], Any],
    dev_groups: list[Group],
    pairs_per_step: float,
    started: float,
) -> tuple[dict[str, Any], Any]:
    """Run a prepared (transformers or sentence-transformers) ``trainer`` from ``resume`` (a checkpoint of this
    run, or None), mark the run finished, and measure the fidelity on ``dev_groups`` of the weights it ends with
    (``student()``: the trained model as a ``Student``; the best checkpoint when ``cfg.keep_best``). Returns (the
    summary's common part, the trainer state): steps, best_step, resumed_from_step, train_loss, dev,
    pairs_per_second (over this call's steps, ``pairs_per_step`` (query, passage) pairs each), seconds since
    ``started``."""
    first_step = resumed_step(resume)
    with training_threads(cfg.threads):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    state = trainer.state
    mark_finished(checkpoint_dir, int(state.global_step))
    dev = student_fidelity(student(), dev_groups) if dev_groups else {}
    runtime = float(output.metrics.get("train_runtime", time.perf_counter() - started))
    pairs_seen = (int(state.global_step) - first_step) * pairs_per_step
    summary = {
        "steps": int(state.global_step),
        # the saved model is the best dev checkpoint only with keep_best (else the last step's)
        "best_step": int(state.best_global_step) if state.best_global_step and cfg.keep_best else None,
        "resumed_from_step": first_step,
        "train_loss": round(run_train_loss(state.log_history, float(output.training_loss), first_step), 6),
        "dev": dev,
        "pairs_per_second": round(pairs_seen / runtime, 2) if pairs_seen and runtime > 0 else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return summary, state
