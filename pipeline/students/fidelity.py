"""Fidelity: how well a student reproduces its teacher's rankings. One definition for every student kind, used on
the dev groups during training (model selection), in the student's metrics and model card, and by ``evaluate``.

- ``nDCG@10`` (``ir_measures``) of the student's scores, with the teacher's ranking as graded labels: the teacher's
  top passage gets ``min(n, 10)``, the next one less, down to 1 at the teacher's 10th (or last) place, and 0 below
  (``teacher_relevance``). It asks whether the student puts the teacher's top 10 on top, in the teacher's order.
- ``nDCG@5``, likewise (the labels stay the teacher's top 10): does the student's top 5 hold the teacher's top 5.
- ``kendall_tau`` between the student's scores and the teacher's order over a whole group (scipy), averaged over
  groups; a group whose scores are all tied counts as 0.

A group is one (query, ranked list): with several lists per query (several teachers or first stages), each list is
measured against its own teacher and the figures are averaged over groups; ``per_list`` gives each list's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics import evaluate_run
from pipeline.students.groups import Group

HEADLINE = "nDCG@10"
FIDELITY_DEPTH = 10
# nDCG@5 too: Reason-to-Rank's lists are 5 passages, and a user of a top-5 reranker reads that figure
FIDELITY_MEASURES = (HEADLINE, "nDCG@5")


def teacher_relevance(teacher_ranks: Sequence[int] | np.ndarray, depth: int = FIDELITY_DEPTH) -> np.ndarray:
    """Graded labels from one group's teacher ranks (1 = best): ``max(0, min(n, depth) + 1 - rank)``.

    >>> teacher_relevance([3, 1, 2]).tolist()
    [1, 3, 2]
    >>> teacher_relevance(list(range(1, 13))).tolist()
    [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    """
    ranks = np.asarray(teacher_ranks, dtype=np.int64)
    top = min(len(ranks), depth)
    return np.clip(top + 1 - ranks, 0, None)


def fidelity(frame: pd.DataFrame, measures: tuple[str, ...] = FIDELITY_MEASURES) -> dict[str, Any]:
    """Fidelity of ``frame`` (query_id, list, doc_id, teacher_rank, score: the student's; ``list`` optional) to the
    teacher, averaged over (query, list) groups, with ``per_list`` when there are several lists.

    >>> f = pd.DataFrame({"query_id": ["q"] * 3, "doc_id": ["a", "b", "c"], "teacher_rank": [1, 2, 3],
    ...                   "score": [3.0, 2.0, 1.0]})
    >>> fidelity(f)
    {'nDCG@10': 1.0, 'nDCG@5': 1.0, 'kendall_tau': 1.0, 'groups': 1}
    """
    from scipy.stats import kendalltau

    if frame.empty:
        return {**{m: float("nan") for m in measures}, "kendall_tau": float("nan"), "groups": 0}
    frame = frame if "list" in frame else frame.assign(list="teacher")
    # one "query" per (query, list) group, so that ir_measures averages over groups
    group_id = frame.query_id.astype(str) + "\t" + frame.list.astype(str)
    relevance = np.empty(len(frame), dtype=np.int64)
    taus, tau_lists = [], []
    for _, index in frame.groupby(group_id, sort=False).indices.items():
        relevance[index] = teacher_relevance(frame.teacher_rank.to_numpy()[index])
        if len(index) < 2:
            continue
        scores, ranks = frame.score.to_numpy()[index], frame.teacher_rank.to_numpy()[index]
        tau = kendalltau(scores, -ranks).statistic
        taus.append(0.0 if np.isnan(tau) else float(tau))
        tau_lists.append(frame.list.to_numpy()[index[0]])
    keyed = pd.DataFrame({"query_id": group_id, "doc_id": frame.doc_id.astype(str), "score": frame.score})
    evaluation = evaluate_run(keyed.assign(relevance=relevance), keyed, measures)
    out: dict[str, Any] = {m: round(float(evaluation.aggregate[m]), 6) for m in measures}
    out["kendall_tau"] = round(float(np.mean(taus)), 6) if taus else float("nan")
    out["groups"] = int(group_id.nunique())
    lists = sorted(frame.list.unique())
    if len(lists) > 1:
        per_query = evaluation.per_query.assign(list=evaluation.per_query.query_id.str.split("\t").str[1])
        tau_frame = pd.DataFrame({"list": tau_lists, "tau": taus})
        out["per_list"] = {
            name: {
                **{
                    m: round(float(per_query[(per_query.list == name) & (per_query.measure == m)].value.mean()), 6)
                    for m in measures
                },
                "kendall_tau": round(float(tau_frame[tau_frame.list == name].tau.mean()), 6),
            }
            for name in lists
        }
    return out


def group_frame(groups: Sequence[Group], scores: np.ndarray) -> pd.DataFrame:
    """The rows ``fidelity`` reads, for ``groups`` and the student's ``scores`` of their candidates (flattened in
    group order)."""
    return pd.DataFrame(
        {
            "query_id": [g.query_id for g in groups for _ in g.doc_ids],
            "list": [g.list for g in groups for _ in g.doc_ids],
            "doc_id": [d for g in groups for d in g.doc_ids],
            "teacher_rank": [r for g in groups for r in g.teacher_ranks],
            "score": np.asarray(scores, dtype=float),
        }
    )


def unique_pairs(groups: Sequence[Group]) -> tuple[list[str], list[str], np.ndarray]:
    """The distinct (query, passage) pairs of ``groups`` and, for each candidate of each group (flattened), the index
    of its pair: several lists of one query share most passages, so each pair is scored once."""
    index: dict[tuple[str, str], int] = {}
    where = []
    for group in groups:
        for passage in group.passages:
            where.append(index.setdefault((group.query, passage), len(index)))
    pairs = list(index)
    return [q for q, _ in pairs], [p for _, p in pairs], np.asarray(where, dtype=np.int64)


def student_fidelity(
    student: Any, groups: Sequence[Group], batch_size: int = 32, measures: tuple[str, ...] = FIDELITY_MEASURES
) -> dict[str, Any]:
    """``fidelity`` of a student (anything with ``score_pairs``) on ``groups``."""
    if not groups:
        return fidelity(pd.DataFrame(columns=["query_id", "doc_id", "teacher_rank", "score"]), measures)
    queries, passages, where = unique_pairs(groups)
    scores = np.asarray(student.score_pairs(queries, passages, batch_size=batch_size), dtype=float)
    return fidelity(group_frame(groups, scores[where]), measures)
