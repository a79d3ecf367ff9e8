"""train: one student from its teach target's training examples → ``<paths.students>/<name>/`` (Hugging Face
format + ``distillrank_student.json`` + model card), ``<paths.plots>/training/<name>.csv|png`` (curves) and
``<paths.metrics>/students/<name>.json`` (fidelity to the teacher on the dev split, throughput).

Checkpoints go to ``<paths.checkpoints>/<name>`` (a DVC output with ``persist: true``): a killed run resumes from
the last one when the student's config and training data are unchanged, and starts fresh otherwise.
Cross-encoders and TWOLAR LM scorers train here (``pipeline.students.training``); R2R students train in
``pipeline.students.r2r``; both end the same way (atomic folder, card, curve, metrics).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, Params, Paths, StudentConfig
from pipeline.io import atomic_folder, read_table
from pipeline.students.training import (
    finish_student_folder,
    train_ranking,
    write_curve,
    write_student_metrics,
)

log = logging.getLogger(__name__)


def read_examples(cfg: StudentConfig, paths: Paths, name: str) -> pd.DataFrame:
    path = paths.training_dir(cfg.labels) / schemas.TABLES["training_examples"].filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no training examples for students.{name}.labels={cfg.labels!r} "
            f"(run `distillrank stage build {cfg.labels}` first)"
        )
    examples = read_table(path)
    if examples.empty:
        raise ConfigError(f"{path}: no training examples (students.{name}.labels={cfg.labels!r})")
    return examples


def teacher_info(labels: str, paths: Paths) -> dict[str, Any]:
    """Which teacher labelled the target (model, method), for the model card."""
    path = paths.teacher_dir(labels) / schemas.TABLES["teacher_rankings"].filename
    if not path.is_file():
        return {"model": "unknown", "method": "unknown", "target": labels}
    rankings = read_table(path)[["model", "method"]].drop_duplicates()
    return {
        "model": ", ".join(sorted(rankings.model.unique())),
        "method": ", ".join(sorted(rankings.method.unique())),
        "target": labels,
    }


def run(name: str, cfg: StudentConfig, paths: Paths, callbacks: list[Any] | None = None) -> dict:
    """Train student ``name``; ``callbacks``: extra Trainer callbacks (tests use one to interrupt a run)."""
    examples = read_examples(cfg, paths, name)
    teacher = teacher_info(cfg.labels, paths)
    checkpoint_dir = paths.checkpoint_dir(name)
    with atomic_folder(paths.student_dir(name)) as out_dir:
        if cfg.kind == "r2r":
            from pipeline.students.r2r import train_r2r

            rationales = read_table(paths.teacher_dir(cfg.labels) / schemas.TABLES["rationales"].filename)
            summary, curve = train_r2r(name, cfg, examples, rationales, out_dir, checkpoint_dir)
        else:
            summary, curve = train_ranking(name, cfg, examples, out_dir, checkpoint_dir, callbacks=callbacks)
        summary = {**summary, "teacher": teacher}
        finish_student_folder(out_dir, name, cfg, summary, teacher)
    csv_path, png_path = write_curve(name, curve, paths.plots)
    metrics_path = write_student_metrics(name, summary, paths.metrics)
    return {
        "student": name,
        **summary,
        "outputs": {
            "model": str(paths.student_dir(name)),
            "curve": str(csv_path),
            "plot": str(png_path),
            "metrics": str(metrics_path),
        },
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.students:
        raise ConfigError(f"students.{name}: not a student in params.yaml (students: {sorted(params.students)})")
    return run(name, params.students[name], params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("train", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
