"""evaluate: every run on every evaluation collection, measured with ``ir_measures``.

Runs are our first-stage runs (the ``candidates`` table, one run per method); when asked, the runs a collection
ships in ``runs/`` (named ``shipped-<name>``); every student's reranked run found under ``paths.reranked`` (named
after the student); and the teacher's ranking (``teacher``) where it labelled queries of the evaluation split,
measured on those queries only. Writes ``metrics/eval.json`` (every figure; with the students' fidelity figures
from ``metrics/students/*.json`` under ``students``), the headline figures as one small file per collection × run
under ``metrics/headline/`` (the DVC metrics: see :mod:`pipeline.headline`), the ``eval_per_query`` table, and
per-query deltas against the baseline run (paired t-test and Wilcoxon signed-rank p-values) as a DVC plot (CSV)
and PNGs.

None of the student or teacher folders has to exist: without them only the first-stage runs are evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from scipy import stats

from pipeline import headline as headline_metrics
from pipeline import schemas
from pipeline.config import ConfigError, EvaluateConfig, EvaluationCollection, Params, Paths
from pipeline.duck import distinct_values
from pipeline.io import atomic_folder, atomic_path, read_rows_in, write_json, write_table, write_text
from pipeline.metrics import evaluate_run
from pipeline.stages.common import evaluation_queries

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SHIPPED_PREFIX = "shipped-"
TEACHER_RUN = "teacher"
EVAL_METRICS_FILE = "eval.json"
STUDENT_METRICS_FOLDER = "students"  # metrics/students/<name>.json, written by the train stage
DELTAS_CSV = "per_query_deltas.csv"
DELTAS_PNG_FOLDER = "deltas"


RUN_COLUMNS = ["query_id", "doc_id", "rank", "score"]


@dataclass(frozen=True)
class StoredRun:
    """A run that stays in its Parquet table until asked for: the rows whose ``filters`` columns have those
    values, read one chunk of queries at a time (``read_rows_in``: only that chunk's rows are ever held)."""

    path: Path
    filters: tuple[tuple[str, str], ...]

    def rows(self, query_ids: list[str]) -> pd.DataFrame:
        where = {column: [value] for column, value in self.filters} | {"query_id": query_ids}
        return read_rows_in(self.path, where, columns=RUN_COLUMNS)


@dataclass(frozen=True)
class FrameRun:
    """A run held in memory (the teacher's: only the queries it labelled)."""

    frame: pd.DataFrame

    def rows(self, query_ids: list[str]) -> pd.DataFrame:
        return self.frame[self.frame.query_id.isin(query_ids)]


Run = StoredRun | FrameRun


def collection_runs(paths: Paths, name: str, include_shipped: bool) -> dict[str, Run]:
    """Every run to evaluate on collection ``name``: run name → its rows (query_id, doc_id, rank, score)."""
    path = paths.retrieval_dir(name) / schemas.TABLES["candidates"].filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run?)")
    runs: dict[str, Run] = {m: StoredRun(path, (("method", m),)) for m in distinct_values(path, "method")}
    if include_shipped:
        shipped = paths.collection_dir(name) / schemas.TABLES["shipped_runs"].filename
        if not shipped.is_file():
            raise FileNotFoundError(f"{shipped}: table not found (has the stage that writes it run?)")
        runs.update(
            {f"{SHIPPED_PREFIX}{r}": StoredRun(shipped, (("run", r),)) for r in distinct_values(shipped, "run")}
        )
    return runs


def student_runs(paths: Paths, name: str, students: Collection[str] | None = None) -> dict[str, Run]:
    """Every student's reranked run of collection ``name`` under ``paths.reranked``: student name → run; only
    the students named in ``students`` when given (a folder left by a student since removed from params is
    not one of today's runs).

    No ``paths.reranked`` folder, or no student that reranked ``name``: an empty mapping.
    """
    spec = schemas.TABLES["reranked"]
    runs: dict[str, Run] = {}
    for path in sorted(Path(paths.reranked).glob(f"*/{spec.filename}")):
        if students is not None and path.parent.name not in students:
            continue
        for student in distinct_values(path, "student", where=("collection", name)):
            if student in runs:
                raise ConfigError(f"{path}: student {student!r} also has a reranked run in another folder")
            runs[student] = StoredRun(path, (("collection", name), ("student", student)))
    return runs


def evaluate_in_chunks(
    qrels: pd.DataFrame, run: Run, measures: Sequence[str], min_relevance: int, chunk_queries: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """``evaluate_run`` of ``run`` on ``qrels``, ``chunk_queries`` judged queries at a time (each query is measured
    alone, so the per-query values are the same): (mean per measure, per-query values in ``evaluate_run``'s
    order: judged queries sorted, then measures)."""
    judged = sorted(set(qrels.query_id.astype(str)))
    parts = []
    for start in range(0, len(judged), chunk_queries):
        ids = judged[start : start + chunk_queries]
        parts.append(evaluate_run(qrels[qrels.query_id.isin(ids)], run.rows(ids), tuple(measures), min_relevance))
    per_query = (
        pd.concat([part.per_query for part in parts], ignore_index=True)
        if parts
        else pd.DataFrame({"query_id": [], "measure": [], "value": []})
    )
    means = {name: float(per_query.loc[per_query.measure == name, "value"].mean()) for name in measures}
    return means, per_query


def teacher_runs(paths: Paths, name: str, split_ids: set[str]) -> dict[str, pd.DataFrame]:
    """The teacher's rankings of collection ``name`` on the queries of ``split_ids`` it labelled, one run per ranked
    list (``teacher:<teacher>@<first stage>``; score = -teacher_rank, since listwise labels have no score); an empty
    mapping when it labelled none of them."""
    from pipeline.teacher.imported import list_name

    path = paths.teacher_dir(name) / schemas.TABLES["teacher_rankings"].filename
    if not path.is_file():
        return {}
    table = read_rows_in(
        path, {"query_id": split_ids}, columns=["query_id", "doc_id", "teacher_rank", "model", "first_stage"]
    )
    runs = {}
    for (model, first_stage), frame in table.groupby(["model", table.first_stage.fillna("")], sort=True):
        runs[f"{TEACHER_RUN}:{list_name(model, first_stage or None)}"] = pd.DataFrame(
            {
                "query_id": frame.query_id.to_numpy(),
                "doc_id": frame.doc_id.to_numpy(),
                "rank": frame.teacher_rank.to_numpy(),
                "score": -frame.teacher_rank.astype(float).to_numpy(),
            }
        )
    return runs


def held_out_queries(paths: Paths, target: str) -> set[str]:
    """The dev queries of teach target ``target``: the queries ``build`` held out, which no student trained on."""
    path = paths.training_dir(target) / schemas.TABLES["training_examples"].filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training examples for held_out target {target!r} (run `build` first)")
    examples = read_rows_in(path, {"split": ["dev"]}, columns=["query_id"])
    return set(examples.query_id)


def aggregate(per_query: pd.DataFrame, query_ids: set[str]) -> dict[str, dict[str, float]]:
    """Each run's mean per measure over ``query_ids`` (the runs' per-query values: ir_measures' aggregate is their
    mean), rounded.

    >>> pq = pd.DataFrame({"run": ["a", "a", "a"], "query_id": ["1", "2", "3"], "measure": "nDCG@10",
    ...                    "value": [1.0, 0.5, 0.0]})
    >>> aggregate(pq, {"1", "2"})
    {'a': {'nDCG@10': 0.75}}
    """
    mine = per_query[per_query.query_id.isin(query_ids)]
    means = mine.groupby(["run", "measure"], sort=True).value.mean()
    out: dict[str, dict[str, float]] = {}
    for (run, measure), value in means.items():
        out.setdefault(str(run), {})[str(measure)] = round(float(value), 4)
    return out


def student_fidelity(paths: Paths, students: Collection[str] | None = None) -> dict[str, dict]:
    """The fidelity figures the train stage wrote to ``metrics/students/<name>.json``, by student name (only
    ``students`` when given)."""
    folder = Path(paths.metrics) / STUDENT_METRICS_FOLDER
    figures = {}
    for path in sorted(folder.glob("*.json")):
        if students is not None and path.stem not in students:
            continue
        try:
            figures[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
    return figures


def _p_value(value: float) -> float | None:
    """A p-value with 3 significant digits; None where the test is undefined (e.g. every delta equal).

    >>> _p_value(0.0123456), _p_value(float("nan"))
    (0.0123, None)
    """
    return None if math.isnan(value) else float(f"{value:.3g}")


def paired_tests(run: pd.Series, baseline: pd.Series) -> tuple[float | None, float | None]:
    """Paired t-test and Wilcoxon signed-rank p-values of ``run`` against ``baseline`` (same queries).

    Identical values give 1.0 for both (no evidence of a difference; scipy would raise or return NaN). The paired
    t-test is the one-sample t-test of the deltas (as ``ttest_rel``). Wilcoxon drops zero deltas (Wilcoxon's own
    convention, scipy's default).

    >>> a, b = pd.Series([0.5, 0.4, 0.3]), pd.Series([0.5, 0.4, 0.3])
    >>> paired_tests(a, b)
    (1.0, 1.0)
    """
    # rounded: 0.6 - 0.5 and 0.5 - 0.4 differ in the last bit, which would turn "no variance" into a p of 0
    delta = (run.to_numpy(dtype=float) - baseline.to_numpy(dtype=float)).round(9)
    if not (delta != 0).any():
        return 1.0, 1.0
    # every delta equal: the t statistic is undefined (no variance); Wilcoxon still says something
    t_p = None if len(set(delta)) == 1 else _p_value(float(stats.ttest_1samp(delta, 0.0).pvalue))
    return t_p, _p_value(float(stats.wilcoxon(delta).pvalue))


def compare_to_baseline(per_query: pd.DataFrame, baseline: str, measure: str) -> dict[str, dict[str, float]]:
    """Per run: mean delta against the baseline on ``measure``, wins/losses/ties, paired t-test and Wilcoxon
    signed-rank p-values, over the queries both runs were measured on (the teacher's: only those it labelled)."""
    values = per_query[per_query.measure == measure].pivot(index="query_id", columns="run", values="value")
    out: dict[str, dict[str, float]] = {}
    for run in values.columns:
        if run == baseline:
            continue
        pair = values[[run, baseline]].dropna()
        delta = (pair[run] - pair[baseline]).round(9)  # as paired_tests: float noise is not a win
        t_p, wilcoxon_p = paired_tests(pair[run], pair[baseline])
        out[run] = {
            "measure": measure,
            "queries": len(pair),
            "delta": round(float(delta.mean()), 4) if len(pair) else 0.0,
            "wins": int((delta > 0).sum()),
            "losses": int((delta < 0).sum()),
            "ties": int((delta == 0).sum()),
            "p_value": t_p,
            "wilcoxon_p_value": wilcoxon_p,
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
        # dropna: the teacher is measured on its own queries only
        delta = (values[run] - values[baseline]).rename("delta").dropna().reset_index()
        delta = delta.sort_values(["collection", "delta"], kind="stable")
        delta["order"] = delta.groupby("collection").cumcount()
        rows.append(delta.assign(run=run, measure=measure))
    columns = ["collection", "run", "measure", "order", "query_id", "delta"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def plot_deltas(deltas: pd.DataFrame, collection: str, baseline: str, path: Path) -> Path:
    """The collection's :func:`delta_figure` as a PNG at ``path``."""
    fig = delta_figure(deltas, collection, baseline)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def delta_figure(deltas: pd.DataFrame, collection: str, baseline: str) -> Figure:
    """One panel per run: the sorted per-query delta of the headline measure against the baseline, as a bar chart
    titled with the collection, the measure and the baseline."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    mine = deltas[deltas.collection == collection]
    runs = sorted(mine.run.unique())
    measure = mine.measure.iloc[0] if len(mine) else ""
    # constrained: the figure's title never overlaps the first panel's; one y scale, so the panels compare
    fig = Figure(figsize=(9, 2.2 * max(len(runs), 1) + 0.8), layout="constrained")
    axes = fig.subplots(max(len(runs), 1), 1, squeeze=False, sharey=True)
    fig.suptitle(f"{collection}: per-query Δ {measure} of each run vs {baseline}" if runs else collection)
    if not runs:  # only the baseline so far: say so rather than leave the plot out
        axes[0, 0].text(0.5, 0.5, f"{collection}: no run besides {baseline} yet", ha="center", va="center")
        axes[0, 0].set_axis_off()
    for axis, run in zip(axes[: len(runs), 0], runs, strict=True):
        part = mine[mine.run == run]
        colours = ["tab:green" if d > 0 else "tab:red" for d in part.delta]
        axis.bar(part.order, part.delta, color=colours, width=1.0)
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_ylabel(f"Δ {measure}\nvs {baseline}")  # two lines: a panel is 2.2 inches high
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # query positions
        axis.set_title(
            f"{run} − {baseline}: mean {part.delta.mean():+.4f} over {len(part)} queries "
            f"({(part.delta > 0).sum()} better, {(part.delta < 0).sum()} worse)",
            fontsize=9,
        )
    if runs:
        axes[-1, 0].set_xlabel(f"queries of {collection}, sorted by Δ {measure}")
    return fig


def run(
    evaluation: dict[str, EvaluationCollection],
    min_relevance: dict[str, int],
    cfg: EvaluateConfig,
    paths: Paths,
    students: Collection[str] | None = None,
    chunk_queries: int = 1000,
) -> dict:
    """Measure every run, ``chunk_queries`` judged queries at a time (no run is read whole); ``students``: the
    student names of params (None: every reranked folder found)."""
    metrics: dict[str, dict] = {}
    per_query_frames = []
    for name, evaluation_cfg in evaluation.items():
        queries = evaluation_queries(paths, name, evaluation_cfg)
        split_ids = set(queries["query_id"])
        qrels_path = paths.collection_dir(name) / schemas.TABLES["qrels"].filename
        qrels = read_rows_in(qrels_path, {"split": [evaluation_cfg.split], "query_id": split_ids})
        runs = collection_runs(paths, name, cfg.include_shipped_runs)
        baseline = cfg.baseline_for(name)
        if baseline not in runs:
            where = f"baseline_per_collection.{name}" if name in cfg.baseline_per_collection else "baseline"
            raise ConfigError(f"evaluate.{where}: run {baseline!r} is missing on {name} (runs: {sorted(runs)})")
        for student, frame in student_runs(paths, name, students).items():
            if student in runs or student == TEACHER_RUN:
                raise ConfigError(f"students.{student}: the name is taken by another run on {name}; rename it")
            runs[student] = frame
        # the teacher is measured on the queries it labelled only: its other queries are not misses
        judged_by = {run_name: qrels for run_name in runs}
        teachers = teacher_runs(paths, name, split_ids)
        for run_name, frame in teachers.items():
            runs[run_name] = FrameRun(frame)
            judged_by[run_name] = qrels[qrels.query_id.isin(set(frame.query_id))]
        results = {}
        for run_name, stored in runs.items():
            means, values = evaluate_in_chunks(
                judged_by[run_name], stored, cfg.measures, min_relevance[name], chunk_queries
            )
            results[run_name] = {k: round(v, 4) for k, v in means.items()}
            per_query_frames.append(values.assign(collection=name, run=run_name))
        metrics[name] = {"queries": int(qrels.query_id.nunique()), "runs": results}
        if teachers:
            metrics[name]["teacher_queries"] = {
                run_name: int(judged_by[run_name].query_id.nunique()) for run_name in teachers
            }
    per_query = pd.concat(per_query_frames, ignore_index=True)
    headline = cfg.measures[0]
    deltas = []
    for name, evaluation_cfg in evaluation.items():
        mine = per_query[per_query.collection == name]
        baseline = cfg.baseline_for(name)
        metrics[name]["baseline"] = baseline
        metrics[name]["vs_" + baseline] = compare_to_baseline(mine, baseline, headline)
        deltas.append(delta_rows(mine, baseline, headline))
        if evaluation_cfg.held_out is not None:
            dev = held_out_queries(paths, evaluation_cfg.held_out) & set(mine.query_id)
            dev_rows = mine[mine.query_id.isin(dev)]
            metrics[name]["held_out"] = {
                "target": evaluation_cfg.held_out,
                "queries": len(dev),
                "runs": aggregate(dev_rows, dev),
                "baseline": baseline,
                "vs_" + baseline: compare_to_baseline(dev_rows, baseline, headline),
            }
    fidelity = student_fidelity(paths, students)
    if fidelity:
        if "students" in evaluation:
            log.warning("eval.json: a collection named 'students' is shadowed by the students' fidelity figures")
        metrics["students"] = fidelity

    spec = schemas.TABLES["eval_per_query"]
    write_table(per_query, spec.schema, Path(paths.evaluation) / spec.filename)
    write_json(metrics, Path(paths.metrics) / EVAL_METRICS_FILE)
    headline_folder = write_headline(metrics, cfg.measures, Path(paths.metrics) / headline_metrics.FOLDER)
    all_deltas = pd.concat(deltas, ignore_index=True)
    write_text(all_deltas.to_csv(index=False), Path(paths.plots) / DELTAS_CSV)
    pngs = [
        str(
            plot_deltas(all_deltas, name, cfg.baseline_for(name), Path(paths.plots) / DELTAS_PNG_FOLDER / f"{name}.png")
        )
        for name in evaluation
    ]
    return {"metrics": metrics, "headline": str(headline_folder), "plots": pngs}


def write_headline(metrics: dict, measures: Sequence[str], folder: Path) -> Path:
    """The headline files of ``metrics`` (:func:`pipeline.headline.files`), replacing ``folder`` as a whole: a run
    no longer evaluated leaves no file behind."""
    with atomic_folder(folder) as tmp:
        for relative, figures in headline_metrics.files(metrics, measures).items():
            write_json(figures, tmp / relative)
    return folder


def _body(params: Params, name: str | None) -> dict:
    min_relevance = {n: params.collection(n).min_relevance for n in params.evaluation}
    return run(
        params.evaluation,
        min_relevance,
        params.evaluate,
        params.paths,
        students=list(params.students),
        chunk_queries=params.scale.chunk_queries,
    )


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("evaluate", argv, _body, per_collection=False)


if __name__ == "__main__":
    sys.exit(main())
