"""What every training run leaves besides the model: its training curve (CSV + PNG), its metrics JSON, the
provenance in ``distillrank_student.json`` and the model card section that says who taught the student, on what,
and how faithful it is (``pipeline.students.card`` writes the card around it: front matter, held-out evaluation,
usage).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.io import atomic_path, write_json, write_text
from pipeline.students.base import STUDENT_FILE
from pipeline.students.card import CARD_MARKER, block_markers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_COLUMNS = ["step", "train_loss", "dev_ndcg@10", "dev_kendall_tau"]
# the training plot's dev panel: each curve's legend, and the axis they share
DEV_CURVES = {"dev_ndcg@10": "nDCG@10 (teacher as labels)", "dev_kendall_tau": "Kendall's τ (teacher's order)"}
DEV_YLABEL = "fidelity to the teacher (dev)"


def curve_from_log_history(log_history: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Training curve from the Trainer's ``state.log_history``: step, train_loss, dev_ndcg@10, dev_kendall_tau,
    then any ``loss_*`` / ``weight_*`` / ``learning_rate`` entries (R2R logs its loss parts and weights). Dev keys
    may carry an evaluator's prefix (``eval_dev_ndcg@10``).

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
            row.update({k: float(v) for k, v in entry.items() if k.startswith(("loss_", "weight_"))})
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("ndcg@10"):
                row["dev_ndcg@10"] = float(value)
            elif key.startswith("eval_") and key.endswith("kendall_tau"):
                row["dev_kendall_tau"] = float(value)
    frame = pd.DataFrame([r for r in rows.values() if len(r) > 1])
    for column in CURVE_COLUMNS:
        if column not in frame:
            frame[column] = float("nan")
    extras = sorted(c for c in frame.columns if c not in CURVE_COLUMNS)
    return frame[CURVE_COLUMNS + extras].sort_values("step").reset_index(drop=True)


def run_train_loss(log_history: list[dict], trainer_loss: float, first_step: int) -> float:
    """The mean training loss of the whole run. The Trainer's ``training_loss`` covers only the steps of its own
    call: after a resume the losses logged over the whole run (restored with the checkpoint) are averaged.

    >>> run_train_loss([{"loss": 0.7, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_ndcg@10": 1.0}], 0.0, 2)
    0.6
    >>> run_train_loss([{"loss": 0.7, "step": 1}], 0.65, 0)
    0.65
    """
    losses = [float(entry["loss"]) for entry in log_history if "loss" in entry]
    if first_step == 0 or not losses:
        return trainer_loss
    return sum(losses) / len(losses)


def write_curve(name: str, curve: pd.DataFrame, plots_dir: Path | str) -> tuple[Path, Path]:
    """``<plots>/training/<name>.csv`` (a DVC plot) and a PNG of the same curves (:func:`curve_figure`)."""
    folder = Path(plots_dir) / "training"
    csv_path, png_path = folder / f"{name}.csv", folder / f"{name}.png"
    write_text(curve.to_csv(index=False), csv_path)
    fig = curve_figure(name, curve)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return csv_path, png_path


def curve_figure(name: str, curve: pd.DataFrame) -> Figure:
    """Two panels over the optimizer steps: the training loss, and the dev fidelity to the teacher."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_dev = fig.subplots(1, 2)
    loss = curve.dropna(subset=["train_loss"])
    ax_loss.plot(loss.step, loss.train_loss, marker=".")
    ax_loss.set(title=f"{name}: training loss", xlabel="optimizer step", ylabel="training loss")
    for column, label in DEV_CURVES.items():
        points = curve.dropna(subset=[column])
        if len(points):
            ax_dev.plot(points.step, points[column], marker="o", label=label)
    ax_dev.set(title=f"{name}: dev fidelity to the teacher", xlabel="optimizer step", ylabel=DEV_YLABEL)
    if ax_dev.lines:
        ax_dev.legend()
    else:
        ax_dev.text(0.5, 0.5, "no dev evaluation", ha="center", va="center", transform=ax_dev.transAxes)
    # both panels span the whole run, 0 to the last step: a single dev point (or logged step) would otherwise get
    # a view a fraction of a step wide, where even an integer locator falls back to fractional ticks
    last = max(int(curve.step.max()) if len(curve) else 0, 1)
    for axis in (ax_loss, ax_dev):
        axis.set_xlim(-0.03 * last, 1.03 * last)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def write_student_metrics(name: str, summary: dict[str, Any], metrics_dir: Path | str) -> Path:
    """``<metrics>/students/<name>.json``: the training summary (kind, steps, dev fidelity, throughput, ...)."""
    return write_json(summary, Path(metrics_dir) / "students" / f"{name}.json")


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The config values that shape training (not the ones the card states elsewhere)."""
    values = dataclasses.asdict(cfg)
    skip = {"kind", "backbone", "labels", "loss"} | ({"r2r"} if cfg.kind != "r2r" else set())
    return {k: v for k, v in values.items() if k not in skip}


def provenance_section(name: str, cfg: Any, summary: dict[str, Any], teacher: dict[str, Any]) -> str:
    """The card section every student gets: its teacher, data, training and dev fidelity."""
    dev = summary.get("dev") or {}
    best = summary.get("best_step")
    saved = f"the best dev checkpoint, step {best}" if best else "the last step's weights"
    rows = "\n".join(f"| {k} | {v} |" for k, v in dev.items() if not isinstance(v, dict)) or "| (no dev split) | |"
    per_list = dev.get("per_list") or {}
    list_rows = "\n".join(
        f"| {lst} | {v.get('nDCG@10')} | {v.get('kendall_tau')} |" for lst, v in sorted(per_list.items())
    )
    lists_table = (
        f"\n\nPer ranked list:\n\n| list | nDCG@10 | Kendall's tau |\n|---|---|---|\n{list_rows}" if list_rows else ""
    )
    return f"""{CARD_MARKER}
## Distillation (distillrank)

`{name}` was distilled by [distillrank](https://github.com/distillrank) from an LLM teacher's rankings.

- Teacher: `{teacher.get("model", "unknown")}` (method `{teacher.get("method", "unknown")}`), lists
  {", ".join(f"`{x}`" for x in teacher.get("lists", [])) or "n/a"}
- Backbone: `{cfg.backbone}`; kind `{cfg.kind}`; loss `{cfg.loss}`
- Data: teach target `{cfg.labels}`: {summary.get("train_queries", "?")} training queries,
  {summary.get("train_groups", "?")} groups (one per query and ranked list), {summary.get("train_pairs", "?")}
  (query, passage) pairs; targets 1/(teacher_rank + 1). {summary.get("dev_queries", 0)} dev queries are held
  out in every list.
- Training: {summary.get("steps", "?")} optimizer steps ({saved}),
  precision {summary.get("precision", "?")}, max_length {summary.get("max_length", "?")},
  {summary.get("seconds", "?")} s, {summary.get("pairs_per_second", "?")} pairs/s on {summary.get("device", "?")}

{block_markers()}### Dev fidelity to the teacher

nDCG@10 with the teacher's ranking as graded labels (its top passage 10, its 10th 1), and Kendall's tau with
the teacher's order, on the held-out dev queries, averaged over (query, list) groups.

| measure | value |
|---|---|
{rows}{lists_table}

### Training parameters

```json
{json.dumps(hyperparameters(cfg), indent=2, default=str)}
```
"""


def write_student_info(folder: Path, info: dict[str, Any]) -> Path:
    """Merge ``info`` into the folder's ``distillrank_student.json`` (creating it)."""
    path = Path(folder) / STUDENT_FILE
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    current.update(info)
    current.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return write_json(current, path)
