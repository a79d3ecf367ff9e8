"""evaluate: every run on every evaluation collection, measured with ``ir_measures``.

Runs are our first-stage runs (the ``candidates`` table, one run per method) and, when asked, the runs a
collection ships in ``runs/`` (named ``shipped-<name>``). Writes ``metrics/eval.json`` (DVC metrics), the
``eval_per_query`` table, and per-query deltas against the baseline run as a DVC plot (CSV) and PNGs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from scipy import stats

from pipeline import schemas
from pipeline.config import ConfigError, EvaluateConfig, EvaluationCollection, Params, Paths
from pipeline.io import atomic_path, read_table, write_json, write_table, write_text
from pipeline.metrics import evaluate_run
from pipeline.stages.common import split_queries

SHIPPED_PREFIX = "shipped-"
EVAL_METRICS_FILE = "eval.json"
DELTAS_CSV = "per_query_deltas.csv"
DELTAS_PNG_FOLDER = "deltas"


def collection_runs(paths: Paths, name: str, include_shipped: bool) -> dict[str, pd.DataFrame]:
    """Every run to evaluate on collection ``name``: run name → (query_id, doc_id, rank, score)."""
    candidates = read_table(paths.retrieval_dir(name) / schemas.TABLES["candidates"].filename)
    runs = {method: frame for method, frame in candidates.groupby("method", sort=True)}
    if include_shipped:
        shipped = read_table(paths.collection_dir(name) / schemas.TABLES["shipped_runs"].filename)
        runs.update({f"{SHIPPED_PREFIX}{run}": frame for run, frame in shipped.groupby("run", sort=True)})
    return runs


def compare_to_baseline(per_query: pd.DataFrame, baseline: str, measure: str) -> dict[str, dict[str, float]]:
    """Per run: mean delta against the baseline on ``measure``, wins/losses/ties and a paired t-test p-value."""
    values = per_query[per_query.measure == measure].pivot(index="query_id", columns="run", values="value")
    out: dict[str, dict[str, float]] = {}
    for run in values.columns:
        if run == baseline:
            continue
        delta = values[run] - values[baseline]
        test = stats.ttest_rel(values[run], values[baseline]) if delta.abs().sum() > 0 else None
        out[run] = {
            "measure": measure,
            "delta": round(float(delta.mean()), 4),
            "wins": int((delta > 0).sum()),
            "losses": int((delta < 0).sum()),
            "ties": int((delta == 0).sum()),
            "p_value": float(f"{test.pvalue:.3g}") if test is not None else 1.0,
        }
    return out


def delta_rows(per_query: pd.DataFrame, baseline: str, measure: str) -> pd.DataFrame:
    """Per-query deltas against the baseline, each run's queries ordered from worst to best delta."""
    values = per_query[per_query.measure == measure].pivot_table(
        index=["collection", "query_id"], columns="run", values="value"
    )
    rows = []
    for run in values.columns:
        if run == baseline:
            continue
        delta = (values[run] - values[baseline]).rename("delta").reset_index()
        delta = delta.sort_values(["collection", "delta"], kind="stable")
        delta["order"] = delta.groupby("collection").cumcount()
        rows.append(delta.assign(run=run, measure=measure))
    columns = ["collection", "run", "measure", "order", "query_id", "delta"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def plot_deltas(deltas: pd.DataFrame, collection: str, baseline: str, path: Path) -> Path:
    """One panel per run: the sorted per-query delta against the baseline, as a bar chart (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = deltas[deltas.collection == collection]
    runs = sorted(mine.run.unique())
    fig, axes = plt.subplots(max(len(runs), 1), 1, figsize=(9, 2.2 * max(len(runs), 1) + 0.6), squeeze=False)
    if not runs:  # only the baseline so far: say so rather than leave the plot out
        axes[0, 0].text(0.5, 0.5, f"{collection}: no run besides {baseline} yet", ha="center", va="center")
        axes[0, 0].set_axis_off()
    for axis, run in zip(axes[: len(runs), 0], runs, strict=True):
        part = mine[mine.run == run]
        colours = ["tab:green" if d > 0 else "tab:red" for d in part.delta]
        axis.bar(part.order, part.delta, color=colours, width=1.0)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_ylabel("Δ")
        axis.set_title(f"{run} − {baseline}: mean {part.delta.mean():+.4f}", fontsize=9)
    measure = mine.measure.iloc[0] if len(mine) else ""
    if runs:
        axes[-1, 0].set_xlabel(f"queries of {collection}, sorted by Δ {measure}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run(
    evaluation: dict[str, EvaluationCollection],
    min_relevance: dict[str, int],
    cfg: EvaluateConfig,
    paths: Paths,
) -> dict:
    metrics: dict[str, dict] = {}
    per_query_frames = []
    for name, evaluation_cfg in evaluation.items():
        queries = split_queries(paths, name, evaluation_cfg.split, f"evaluation.{name}.split")
        qrels = read_table(paths.collection_dir(name) / schemas.TABLES["qrels"].filename)
        qrels = qrels[qrels.split == evaluation_cfg.split]
        split_ids = set(queries["query_id"])
        runs = collection_runs(paths, name, cfg.include_shipped_runs)
        if cfg.baseline not in runs:
            raise ConfigError(f"evaluate.baseline: run {cfg.baseline!r} is missing on {name} (runs: {sorted(runs)})")
        results = {}
        for run_name, frame in runs.items():
            frame = frame[frame.query_id.isin(split_ids)]
            evaluated = evaluate_run(qrels, frame, cfg.measures, min_relevance[name])
            results[run_name] = {k: round(v, 4) for k, v in evaluated.aggregate.items()}
            per_query_frames.append(evaluated.per_query.assign(collection=name, run=run_name))
        metrics[name] = {"queries": int(qrels.query_id.nunique()), "runs": results}
    per_query = pd.concat(per_query_frames, ignore_index=True)
    headline = cfg.measures[0]
    for name in evaluation:
        mine = per_query[per_query.collection == name]
        metrics[name]["vs_" + cfg.baseline] = compare_to_baseline(mine, cfg.baseline, headline)

    spec = schemas.TABLES["eval_per_query"]
    write_table(per_query, spec.schema, Path(paths.evaluation) / spec.filename)
    write_json(metrics, Path(paths.metrics) / EVAL_METRICS_FILE)
    deltas = delta_rows(per_query, cfg.baseline, headline)
    write_text(deltas.to_csv(index=False), Path(paths.plots) / DELTAS_CSV)
    pngs = [
        str(plot_deltas(deltas, name, cfg.baseline, Path(paths.plots) / DELTAS_PNG_FOLDER / f"{name}.png"))
        for name in evaluation
    ]
    return {"metrics": metrics, "plots": pngs}


def _body(params: Params, name: str | None) -> dict:
    min_relevance = {n: params.collection(n).min_relevance for n in params.evaluation}
    return run(params.evaluation, min_relevance, params.evaluate, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("evaluate", argv, _body, per_collection=False)


if __name__ == "__main__":
    sys.exit(main())
