"""The PNGs a person reads: the per-query delta plots (evaluate) and the training curves (train), checked on the
Figure objects: titles, axis labels, integer ticks where the axis counts queries or steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.stages.evaluate import delta_figure, delta_rows, plot_deltas
from pipeline.students.outputs import DEV_YLABEL, curve_figure, write_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ticks_in_view(axis) -> list[float]:
    low, high = axis.get_xlim()
    return [t for t in axis.get_xticks() if low <= t <= high]


def assert_integer_ticks(axis) -> None:
    ticks = ticks_in_view(axis)
    assert len(ticks) >= 2, ticks
    assert all(float(t).is_integer() for t in ticks), ticks


@pytest.fixture
def deltas() -> pd.DataFrame:
    """Per-query nDCG@10 of bm25 (the baseline), a student on 5 queries and the teacher on 2 of them."""
    values = {"bm25": [0.2, 0.5, 0.1, 0.9, 0.4], "student": [0.4, 0.5, 0.0, 1.0, 0.7], "teacher": [0.6, 0.3]}
    rows = [("scifact", f"q{i}", run, "nDCG@10", value) for run, per in values.items() for i, value in enumerate(per)]
    per_query = pd.DataFrame(rows, columns=["collection", "query_id", "run", "measure", "value"])
    return delta_rows(per_query, "bm25", "nDCG@10")


def test_the_delta_plot_names_the_collection_measure_baseline_and_runs(deltas: pd.DataFrame) -> None:
    fig = delta_figure(deltas, "scifact", "bm25")
    assert fig.get_suptitle() == "scifact: per-query Δ nDCG@10 of each run vs bm25"
    axes = fig.axes
    assert len(axes) == 2
    for axis, run, queries in zip(axes, ["student", "teacher"], [5, 2], strict=True):
        assert axis.get_ylabel().split() == ["Δ", "nDCG@10", "vs", "bm25"]
        assert axis.get_title().startswith(f"{run} − bm25: mean ")
        assert f"over {queries} queries" in axis.get_title()
        assert_integer_ticks(axis)  # query positions, even for 2 queries
    assert axes[0].get_title() == "student − bm25: mean +0.1000 over 5 queries (3 better, 1 worse)"
    assert axes[-1].get_xlabel() == "queries of scifact, sorted by Δ nDCG@10"
    assert axes[0].get_ylim() == axes[1].get_ylim()  # one scale: the panels compare


def test_a_delta_plot_with_only_the_baseline_says_so(tmp_path: Path) -> None:
    empty = delta_rows(pd.DataFrame(columns=["collection", "query_id", "run", "measure", "value"]), "bm25", "nDCG@10")
    fig = delta_figure(empty, "scifact", "bm25")
    assert fig.get_suptitle() == "scifact"
    assert [t.get_text() for t in fig.axes[0].texts] == ["scifact: no run besides bm25 yet"]
    assert plot_deltas(empty, "scifact", "bm25", tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_deltas_writes_the_figure(deltas: pd.DataFrame, tmp_path: Path) -> None:
    path = plot_deltas(deltas, "scifact", "bm25", tmp_path / "deltas" / "scifact.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def curve(steps: list[int], loss: list[float], dev: dict[int, tuple[float, float]]) -> pd.DataFrame:
    rows = [{"step": s, "train_loss": v} for s, v in zip(steps, loss, strict=True)]
    rows += [{"step": s, "dev_ndcg@10": n, "dev_kendall_tau": t} for s, (n, t) in dev.items()]
    frame = pd.DataFrame(rows).groupby("step", as_index=False).first()
    return frame.reindex(columns=["step", "train_loss", "dev_ndcg@10", "dev_kendall_tau"])


@pytest.mark.parametrize(
    "training",
    [
        curve([6, 12, 18, 24, 30, 36, 42, 48], [2e-3] * 8, {25: (0.32, 0.31), 48: (0.33, 0.32)}),  # the default's
        curve([2, 4, 6, 8], [0.7, 0.6, 0.5, 0.4], {8: (0.5, 0.3)}),  # one dev point (was a view 0.8 steps wide)
        curve([3], [0.7], {3: (0.5, 0.3)}),  # one logged step
    ],
    ids=["two-dev-points", "one-dev-point", "one-step"],
)
def test_the_training_plot_labels_both_panels_and_counts_whole_steps(training: pd.DataFrame) -> None:
    fig = curve_figure("minilm-bi", training)
    loss, dev = fig.axes
    assert loss.get_title() == "minilm-bi: training loss"
    assert dev.get_title() == "minilm-bi: dev fidelity to the teacher"
    assert loss.get_ylabel() == "training loss"
    assert dev.get_ylabel() == DEV_YLABEL and "teacher" in DEV_YLABEL
    assert [t.get_text() for t in dev.get_legend().get_texts()] == [
        "nDCG@10 (teacher as labels)",
        "Kendall's τ (teacher's order)",
    ]
    for axis in (loss, dev):
        assert axis.get_xlabel() == "optimizer step"
        assert_integer_ticks(axis)
        low, high = axis.get_xlim()
        assert low <= 0 and high >= training.step.max()  # the whole run, on both panels


def test_a_run_without_dev_evaluation_says_so(tmp_path: Path) -> None:
    training = curve([2, 4], [0.7, 0.6], {}).assign(**{"dev_ndcg@10": np.nan, "dev_kendall_tau": np.nan})
    fig = curve_figure("s", training)
    assert [t.get_text() for t in fig.axes[1].texts] == ["no dev evaluation"]
    assert_integer_ticks(fig.axes[1])
    csv_path, png_path = write_curve("s", training, tmp_path)
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert pd.read_csv(csv_path).step.tolist() == [2, 4]
