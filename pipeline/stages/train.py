"""train: one student from its teach target's training examples → ``<paths.students>/<name>/`` (the kind's native
folder + ``distillrank_student.json`` + model card), ``<paths.plots>/training/<name>.csv|png`` (curves) and
``<paths.metrics>/students/<name>.json`` (fidelity to the teacher on the dev queries, throughput).

Checkpoints go to ``<paths.checkpoints>/<name>`` (a DVC output with ``persist: true``): a killed run resumes at
its last checkpoint; a finished run, or one whose code (``pipeline/students``), config or data changed, trains
again from scratch (``pipeline.students.checkpoints``). The kind's module (``pipeline.students.registry``) trains;
every kind ends the same way here: atomic folder, card, curve, metrics.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, Params, Paths, StudentConfig, TeachTarget
from pipeline.io import atomic_folder, read_table
from pipeline.students.card import training_datasets, write_card
from pipeline.students.outputs import (
    provenance_section,
    write_curve,
    write_student_info,
    write_student_metrics,
)
from pipeline.students.registry import kind_module

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
    """Which teacher labelled the target (models, method, ranked lists), for the card and the metrics."""
    from pipeline.teacher.imported import list_name

    path = paths.teacher_dir(labels) / schemas.TABLES["teacher_rankings"].filename
    if not path.is_file():
        return {"model": "unknown", "method": "unknown", "target": labels, "lists": []}
    rankings = read_table(path)
    stages = rankings.first_stage.where(rankings.first_stage.notna(), None)
    return {
        "model": ", ".join(sorted(rankings.model.unique())),
        "method": ", ".join(sorted(rankings.method.unique())),
        "target": labels,
        "lists": sorted({list_name(m, f) for m, f in zip(rankings.model, stages, strict=True)}),
    }


def run(
    name: str,
    cfg: StudentConfig,
    paths: Paths,
    callbacks: list[Any] | None = None,
    target: TeachTarget | None = None,
) -> dict:
    """Train student ``name``; ``callbacks``: extra Trainer callbacks (tests use one to interrupt a run);
    ``target``: its teach target's config (which of the collection's queries it learns from, for the card)."""
    examples = read_examples(cfg, paths, name)
    teacher = teacher_info(cfg.labels, paths)
    rationales = None
    if cfg.kind == "r2r":
        rationales = read_table(paths.teacher_dir(cfg.labels) / schemas.TABLES["rationales"].filename)
    module = kind_module(cfg.kind)
    with atomic_folder(paths.student_dir(name)) as out_dir:
        result = module.train(name, cfg, examples, rationales, out_dir, paths.checkpoint_dir(name), callbacks)
        summary = {
            "student": name,
            "kind": cfg.kind,
            "backbone": cfg.backbone,
            "loss": cfg.loss,
            "labels": cfg.labels,
            **result.summary,
            "teacher": teacher,
        }
        write_student_info(
            out_dir,
            {
                **result.info,
                "name": name,
                "teacher": teacher,
                "loss": cfg.loss,
                "labels": cfg.labels,
                "init_from": cfg.init_from,
                "dev": summary.get("dev"),
                "steps": summary.get("steps"),
            },
        )
        # the held-out figures do not exist yet: `distillrank export` writes them into its copy's card
        write_card(
            out_dir,
            {**result.info, "name": name, "labels": cfg.labels, "init_from": cfg.init_from},
            provenance_section(name, cfg, summary, teacher) + result.card_section,
            model_ref=name,
            datasets=training_datasets(cfg.labels, *((target.queries, target.split) if target else ())),
        )
    csv_path, png_path = write_curve(name, result.curve, paths.plots)
    metrics_path = write_student_metrics(name, summary, paths.metrics)
    return {
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
    cfg = params.students[name]
    return run(name, cfg, params.paths, target=params.teach.get(cfg.labels))


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("train", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
