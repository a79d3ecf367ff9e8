"""Effectiveness measures, computed by ``ir_measures`` (never by hand).

Binary measures (RR, R@k, P@k, AP) count a document as relevant when its grade is at least the collection's
``min_relevance`` (2 on TREC-DL); nDCG always uses the graded labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import ir_measures
import pandas as pd

# Measures whose definition depends on a binary relevance threshold (ir_measures' ``rel`` parameter).
BINARY_MEASURES = {"RR", "R", "P", "AP", "Success", "Rprec", "Bpref", "SetP", "SetR", "SetF"}


@dataclass(frozen=True)
class Evaluation:
    """Mean per measure (over the queries that have qrels) and the per-query values behind it."""

    aggregate: dict[str, float]
    per_query: pd.DataFrame  # query_id, measure, value
    queries: int


def resolve_measure(name: str, min_relevance: int) -> ir_measures.Measure:
    """Parse a measure name and apply the relevance threshold to binary measures.

    >>> str(resolve_measure("RR@10", 2)), str(resolve_measure("nDCG@10", 2)), str(resolve_measure("R@100", 1))
    ('RR(rel=2)@10', 'nDCG@10', 'R@100')
    """
    measure = ir_measures.parse_measure(name)
    if min_relevance > 1 and measure.NAME in BINARY_MEASURES and "rel" not in measure.params:
        measure = measure(rel=min_relevance)
    return measure


def evaluate_run(
    qrels: pd.DataFrame, run: pd.DataFrame, measures: tuple[str, ...], min_relevance: int = 1
) -> Evaluation:
    """Evaluate ``run`` (query_id, doc_id, score) against ``qrels`` (query_id, doc_id, relevance).

    Results are reported under the names given in ``measures`` (``RR@10``), whatever threshold applies.
    Queries of the qrels that the run misses count as zero (the run is penalised, as trec_eval -c does).
    """
    resolved = {resolve_measure(name, min_relevance): name for name in measures}
    qrels_in = qrels[["query_id", "doc_id", "relevance"]].astype({"query_id": str, "doc_id": str, "relevance": int})
    run_in = run[["query_id", "doc_id", "score"]].astype({"query_id": str, "doc_id": str, "score": float})
    rows = [
        (m.query_id, resolved[m.measure], float(m.value))
        for m in ir_measures.iter_calc(list(resolved), qrels_in, run_in)
    ]
    per_query = pd.DataFrame(rows, columns=["query_id", "measure", "value"])
    judged = sorted(set(qrels_in.query_id))
    # ir_measures only reports queries present in the run; add the judged queries it missed as 0.
    full = pd.MultiIndex.from_product([judged, list(measures)], names=["query_id", "measure"])
    per_query = (
        per_query.set_index(["query_id", "measure"]).reindex(full, fill_value=0.0).reset_index()
        if judged
        else per_query
    )
    aggregate = {name: float(per_query.loc[per_query.measure == name, "value"].mean()) for name in measures}
    return Evaluation(aggregate=aggregate, per_query=per_query, queries=len(judged))
