"""Reason-to-Rank bench: the `r2r` preset's students next to their reference points on the teach target's dev
queries. Run on demand, after the preset (``make preset PRESET=r2r``); it prints figures (not a test).

    .venv/bin/python bench/r2r.py [--params params.yaml] [--target r2r-msmarco]

For each (query, list) dev group (the queries ``build`` held out, never trained on): nDCG@5, nDCG@10 (the teacher's
ranking as graded labels) and Kendall's tau against the teacher's order (``pipeline.students.fidelity``), for

- the first stage's own order (``first_stage_rank`` of the teacher's labels: BM25's for an R2R file),
- each student's untrained start (the kind's ``untrained``, at the trained student's max_length),
- each trained student (its folder, loaded as ``rerank`` loads it),

and a Wilcoxon signed-rank test over the groups' taus for every pair of trained students (are they different?).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_params  # noqa: E402
from pipeline.io import read_table  # noqa: E402
from pipeline.schemas import TABLES  # noqa: E402
from pipeline.students.base import read_student_info  # noqa: E402
from pipeline.students.fidelity import fidelity, group_frame, unique_pairs  # noqa: E402
from pipeline.students.groups import training_split  # noqa: E402
from pipeline.students.registry import kind_module, load_student  # noqa: E402


def group_taus(frame: pd.DataFrame) -> np.ndarray:
    """Kendall's tau of every (query, list) group of ``frame`` (fidelity's rows), in group order (ties: 0)."""
    taus = []
    for _, group in frame.groupby(["query_id", "list"], sort=True):
        tau = stats.kendalltau(group.score, -group.teacher_rank).statistic
        taus.append(0.0 if np.isnan(tau) else float(tau))
    return np.asarray(taus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--target", default="r2r-msmarco", help="the teach target the students learnt from")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    paths = params.paths
    examples = read_table(paths.training_dir(args.target) / TABLES["training_examples"].filename)
    _, dev = training_split("bench", args.target, examples)
    if not dev:
        print(f"error: teach target {args.target}: no dev groups", file=sys.stderr)
        return 2
    queries, passages, where = unique_pairs(dev)
    frames: dict[str, pd.DataFrame] = {}

    labels = read_table(paths.teacher_dir(args.target) / TABLES["teacher_rankings"].filename)
    first = labels.set_index(["query_id", "doc_id"]).first_stage_rank.astype(float)
    order = [-first.get((g.query_id, d), np.inf) for g in dev for d in g.doc_ids]
    frames["first stage order"] = group_frame(dev, np.nan_to_num(np.asarray(order), neginf=-1e9))
    students = [n for n, cfg in params.students.items() if cfg.labels == args.target]
    for name in students:
        cfg = params.students[name]
        folder = paths.student_dir(name)
        info = read_student_info(folder)
        start = kind_module(cfg.kind).untrained(cfg, device="cpu", max_length=int(info.get("max_length") or 0) or None)
        frames[f"{name}:untrained"] = group_frame(dev, np.asarray(start.score_pairs(queries, passages))[where])
        trained = load_student(folder, device="cpu")
        frames[name] = group_frame(dev, np.asarray(trained.score_pairs(queries, passages))[where])

    rows = []
    for run, frame in frames.items():
        values = fidelity(frame)
        rows.append([run, f"{values['nDCG@5']:.4f}", f"{values['nDCG@10']:.4f}", f"{values['kendall_tau']:.4f}"])
    print(f"{args.target}: {len(dev)} dev groups (queries never trained on), against the teacher's order")
    print(tabulate(rows, headers=["run", "nDCG@5", "nDCG@10", "Kendall's tau"], disable_numparse=True))
    taus = {name: group_taus(frames[name]) for name in students}
    for a, b in itertools.combinations(students, 2):
        test = stats.wilcoxon(taus[a], taus[b], zero_method="zsplit")
        sem = max(taus[a].std(ddof=1), taus[b].std(ddof=1)) / np.sqrt(len(taus[a]))
        print(f"{a} vs {b}: mean tau {taus[a].mean():+.4f} vs {taus[b].mean():+.4f}, Wilcoxon p = {test.pvalue:.3g}")
        print(f"  (standard error of a mean tau: about {sem:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
