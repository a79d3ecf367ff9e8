"""How good the teacher's labels are, before any student learns from them: each ranked list's nDCG@10 against
the qrels next to its first stage's (the collection's queries), or where the teacher puts each synthesized
query's source document (synthesized queries have no qrels)."""

from __future__ import annotations

import pandas as pd

from pipeline import schemas
from pipeline.config import Paths
from pipeline.io import read_table
from pipeline.metrics import evaluate_run
from pipeline.teacher.imported import list_name
from pipeline.teacher.outcome import Pool

HEADLINE = "nDCG@10"


def teacher_quality(name: str, paths: Paths, split: str, pool: Pool, rankings: pd.DataFrame, min_rel: int) -> dict:
    """Each ranked list's nDCG@10 (one per teacher and first stage) next to the target's first stage, on the same
    queries (those with qrels): the check a user makes before distilling a teacher."""
    qrels = read_table(paths.collection_dir(name) / schemas.TABLES["qrels"].filename)
    qrels = qrels[(qrels.split == split) & qrels.query_id.isin(set(rankings.query_id))]
    if qrels.empty or rankings.empty:
        return {}
    judged = set(qrels.query_id)
    measures = (HEADLINE,)
    first = pool.candidates[pool.candidates.query_id.isin(judged)].assign(score=lambda c: -c["rank"].astype(float))
    lists = {}
    for (model, first_stage), frame in rankings[rankings.query_id.isin(judged)].groupby(
        ["model", rankings.first_stage.fillna("")], sort=True
    ):
        run = frame.assign(score=-frame.teacher_rank.astype(float))
        mine = qrels[qrels.query_id.isin(set(run.query_id))]
        lists[list_name(model, first_stage or None)] = {
            "queries": int(mine.query_id.nunique()),
            HEADLINE: round(evaluate_run(mine, run, measures, min_rel).aggregate[HEADLINE], 4),
        }
    quality: dict = {
        "queries": len(judged),
        "first_stage": round(evaluate_run(qrels, first, measures, min_rel).aggregate[HEADLINE], 4),
        "measure": HEADLINE,
    }
    if len(lists) == 1:
        quality["teacher"] = next(iter(lists.values()))[HEADLINE]
    quality["lists"] = lists
    return quality


def source_doc_quality(pool: Pool, rankings: pd.DataFrame) -> dict:
    """For synthesized queries (no qrels): where the teacher puts each query's source document (the one it was
    cropped from or generated for), next to where the first stage had it: mean reciprocal rank and share at rank
    1, over the labelled queries with a source document (one outside the pool counts 0 for both). A sanity
    figure, not a relevance measure: other documents may answer a query as well as its source does.

    >>> pool = Pool(pd.DataFrame({"query_id": ["a", "b"], "text": ["", ""], "source_doc_id": ["d2", "d9"]}),
    ...             pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d1", "d2", "d1"], "rank": [1, 2, 1],
    ...                           "passage": ["", "", ""]}), origin="synthetic")
    >>> labels = pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d2", "d1", "d1"], "teacher_rank": [1, 2, 1]})
    >>> q = source_doc_quality(pool, labels)
    >>> q["queries"], q["source_in_pool"], q["teacher_mrr"], q["first_stage_mrr"], q["teacher_at_1"]
    (2, 0.5, 0.5, 0.25, 0.5)
    """
    queries = pool.queries.dropna(subset=["source_doc_id"])
    queries = queries[queries.query_id.isin(set(rankings.query_id))]
    if queries.empty:
        return {}
    source = dict(zip(queries.query_id, queries.source_doc_id, strict=True))

    def ranks(frame: pd.DataFrame, column: str) -> pd.Series:
        hits = frame[[source.get(q) == d for q, d in zip(frame.query_id, frame.doc_id, strict=True)]]
        return hits.set_index("query_id")[column].reindex(list(source)).astype(float)

    teacher_ranks, first_ranks = ranks(rankings, "teacher_rank"), ranks(pool.candidates, "rank")
    return {
        "queries": len(source),
        "source_in_pool": round(float(first_ranks.notna().mean()), 4),
        "teacher_mrr": round(float((1 / teacher_ranks).fillna(0).mean()), 4),
        "first_stage_mrr": round(float((1 / first_ranks).fillna(0).mean()), 4),
        "teacher_at_1": round(float((teacher_ranks == 1).mean()), 4),
        "first_stage_at_1": round(float((first_ranks == 1).mean()), 4),
    }
