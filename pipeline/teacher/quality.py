"""How good the teacher's labels are, before any student learns from them: each ranked list's nDCG@10 against
the qrels next to its first stage's (the collection's queries), or where the teacher puts each synthesized
query's source document (synthesized queries have no qrels).

Both are computed a chunk of queries at a time (``TeacherQuality``, ``SourceDocQuality``: ``add`` each chunk's
labels and candidates, then ``result``), keeping one value per query, so that the stage never holds every
query's labels: every figure is a mean of per-query values (a query's value depends on its own rows only), taken
over the same values in the same order as over the whole table at once, so the figures are the same to the bit.
"""

from __future__ import annotations

import pandas as pd

from pipeline import schemas
from pipeline.config import Paths
from pipeline.io import read_table
from pipeline.metrics import evaluate_run
from pipeline.teacher.imported import list_name
from pipeline.teacher.outcome import Pool

HEADLINE = "nDCG@10"


def split_qrels(name: str, paths: Paths, split: str) -> pd.DataFrame:
    """The collection's qrels of ``split``."""
    qrels = read_table(paths.collection_dir(name) / schemas.TABLES["qrels"].filename)
    return qrels[qrels.split == split]


def _per_query(qrels: pd.DataFrame, run: pd.DataFrame, min_rel: int) -> pd.Series:
    """Each judged query's nDCG@10 (``evaluate_run``'s per-query values: 0 for one the run misses), by query id."""
    per_query = evaluate_run(qrels, run, (HEADLINE,), min_rel).per_query
    return per_query.loc[per_query.measure == HEADLINE].set_index("query_id")["value"]


def _mean(parts: list[pd.Series]) -> float:
    """The mean of the per-query values of ``parts`` in query id order (``evaluate_run``'s order)."""
    values = pd.concat(parts)
    return float(values.loc[sorted(values.index)].mean())


class TeacherQuality:
    """``teacher_quality``'s figures a chunk at a time: ``add`` each chunk's labels (query_id, doc_id,
    teacher_rank, model, first_stage) and its candidates (query_id, doc_id, rank), then ``result``.

    >>> qrels = pd.DataFrame({"query_id": ["a", "b"], "doc_id": ["d1", "d2"], "relevance": 1})
    >>> labels = pd.DataFrame({"query_id": ["a", "a", "b", "b"], "doc_id": ["d1", "d2", "d1", "d2"],
    ...                        "teacher_rank": [1, 2, 1, 2], "model": "m", "first_stage": "bm25"})
    >>> candidates = labels[["query_id", "doc_id"]].assign(rank=[2, 1, 1, 2])
    >>> whole, chunked = TeacherQuality(qrels, 1), TeacherQuality(qrels, 1)
    >>> whole.add(candidates, labels)
    >>> chunked.add(candidates[:2], labels[:2]); chunked.add(candidates[2:], labels[2:])
    >>> whole.result() == chunked.result(), whole.result()["teacher"], whole.result()["first_stage"]
    (True, 0.8155, 0.6309)
    """

    def __init__(self, qrels: pd.DataFrame, min_rel: int) -> None:
        self.qrels, self.min_rel = qrels, min_rel
        self.first: list[pd.Series] = []
        self.lists: dict[str, list[pd.Series]] = {}

    def add(self, candidates: pd.DataFrame, rankings: pd.DataFrame) -> None:
        """One chunk: labels of queries that no other chunk has, and those queries' candidates."""
        qrels = self.qrels[self.qrels.query_id.isin(set(rankings.query_id))]
        if qrels.empty or rankings.empty:
            return
        judged = set(qrels.query_id)
        first = candidates[candidates.query_id.isin(judged)].assign(score=lambda c: -c["rank"].astype(float))
        self.first.append(_per_query(qrels, first, self.min_rel))
        for (model, first_stage), frame in rankings[rankings.query_id.isin(judged)].groupby(
            ["model", rankings.first_stage.fillna("")], sort=True
        ):
            run = frame.assign(score=-frame.teacher_rank.astype(float))
            mine = qrels[qrels.query_id.isin(set(run.query_id))]
            self.lists.setdefault(list_name(model, first_stage or None), []).append(_per_query(mine, run, self.min_rel))

    def result(self) -> dict:
        """Each ranked list's nDCG@10 next to the first stage's, on the judged queries; {} when none is judged."""
        if not self.first:
            return {}
        lists = {
            name: {"queries": int(sum(len(part) for part in parts)), HEADLINE: round(_mean(parts), 4)}
            for name, parts in sorted(self.lists.items())
        }
        quality: dict = {
            "queries": int(sum(len(part) for part in self.first)),
            "first_stage": round(_mean(self.first), 4),
            "measure": HEADLINE,
        }
        if len(lists) == 1:
            quality["teacher"] = next(iter(lists.values()))[HEADLINE]
        quality["lists"] = lists
        return quality


def teacher_quality(name: str, paths: Paths, split: str, pool: Pool, rankings: pd.DataFrame, min_rel: int) -> dict:
    """Each ranked list's nDCG@10 (one per teacher and first stage) next to the target's first stage, on the same
    queries (those with qrels): the check a user makes before distilling a teacher (``TeacherQuality`` at once)."""
    quality = TeacherQuality(split_qrels(name, paths, split), min_rel)
    quality.add(pool.candidates, rankings)
    return quality.result()


class SourceDocQuality:
    """``source_doc_quality``'s figures a chunk at a time: ``add`` each chunk's labels (query_id, doc_id,
    teacher_rank) and candidates (query_id, doc_id, rank), then ``result``; ``queries`` are the pool's (query_id,
    source_doc_id), whose order the figures are taken in."""

    def __init__(self, queries: pd.DataFrame) -> None:
        queries = queries.dropna(subset=["source_doc_id"])
        self.source = dict(zip(queries.query_id, queries.source_doc_id, strict=True))
        self.position = {query_id: i for i, query_id in enumerate(self.source)}
        self.parts: list[pd.DataFrame] = []

    def _ranks(self, frame: pd.DataFrame, column: str, wanted: list[str]) -> pd.Series:
        hits = frame[[self.source.get(q) == d for q, d in zip(frame.query_id, frame.doc_id, strict=True)]]
        return hits.set_index("query_id")[column].reindex(wanted).astype(float)

    def add(self, candidates: pd.DataFrame, rankings: pd.DataFrame) -> None:
        """One chunk: labels of queries that no other chunk has, and those queries' candidates."""
        wanted = sorted({q for q in rankings.query_id.unique() if q in self.source}, key=self.position.__getitem__)
        if wanted:
            teacher, first = self._ranks(rankings, "teacher_rank", wanted), self._ranks(candidates, "rank", wanted)
            self.parts.append(pd.DataFrame({"teacher": teacher, "first": first}))

    def result(self) -> dict:
        """The figures over the labelled queries with a source document; {} when there are none."""
        if not self.parts:
            return {}
        ranks = pd.concat(self.parts)
        ranks = ranks.iloc[sorted(range(len(ranks)), key=lambda i: self.position[ranks.index[i]])]
        teacher_ranks, first_ranks = ranks["teacher"], ranks["first"]
        return {
            "queries": len(ranks),
            "source_in_pool": round(float(first_ranks.notna().mean()), 4),
            "teacher_mrr": round(float((1 / teacher_ranks).fillna(0).mean()), 4),
            "first_stage_mrr": round(float((1 / first_ranks).fillna(0).mean()), 4),
            "teacher_at_1": round(float((teacher_ranks == 1).mean()), 4),
            "first_stage_at_1": round(float((first_ranks == 1).mean()), 4),
        }


def source_doc_quality(pool: Pool, rankings: pd.DataFrame) -> dict:
    """For synthesized queries (no qrels): where the teacher puts each query's source document (the one it was
    cropped from or generated for), next to where the first stage had it: mean reciprocal rank and share at rank
    1, over the labelled queries with a source document (one outside the pool counts 0 for both). A sanity
    figure, not a relevance measure: other documents may answer a query as well as its source does
    (``SourceDocQuality`` at once).

    >>> pool = Pool(pd.DataFrame({"query_id": ["a", "b"], "text": ["", ""], "source_doc_id": ["d2", "d9"]}),
    ...             pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d1", "d2", "d1"], "rank": [1, 2, 1],
    ...                           "passage": ["", "", ""]}), origin="synthetic")
    >>> labels = pd.DataFrame({"query_id": ["a", "a", "b"], "doc_id": ["d2", "d1", "d1"], "teacher_rank": [1, 2, 1]})
    >>> q = source_doc_quality(pool, labels)
    >>> q["queries"], q["source_in_pool"], q["teacher_mrr"], q["first_stage_mrr"], q["teacher_at_1"]
    (2, 0.5, 0.5, 0.25, 0.5)
    >>> chunked = SourceDocQuality(pool.queries)
    >>> chunked.add(pool.candidates[2:], labels[2:]); chunked.add(pool.candidates[:2], labels[:2])
    >>> chunked.result() == q
    True
    """
    quality = SourceDocQuality(pool.queries)
    quality.add(pool.candidates, rankings)
    return quality.result()
