"""What the teacher is shown: a target's queries (a seeded sample of them) and each one's candidates with their
passages, as a ``Pool``.

The queries are the collection's own (candidates from ``retrieve``, or the union of its shipped runs) or the
synthesized ones (``paths.synthetic/<name>/queries.parquet``, candidates from the pool stage's
``paths.pool/<name>/candidates.parquet``, shown in the pool's order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, Paths, TeachTarget, teach_key
from pipeline.io import read_table
from pipeline.lucene import document_contents
from pipeline.sources import in_split
from pipeline.teacher.outcome import Pool

SHIPPED_UNION = "shipped-union"


def select_queries(queries: pd.DataFrame, max_queries: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_queries`` queries, a seeded sample (stable across runs, so the cache keeps serving them).

    >>> q = pd.DataFrame({"query_id": [str(i) for i in range(10)]})
    >>> select_queries(q, 3, seed=0).query_id.tolist() == select_queries(q, 3, seed=0).query_id.tolist()
    True
    >>> len(select_queries(q, None, seed=0)), len(select_queries(q, 30, seed=0))
    (10, 10)
    """
    if max_queries is None or max_queries >= len(queries):
        return queries.sort_values("query_id").reset_index(drop=True)
    return queries.sample(n=max_queries, random_state=seed).sort_values("query_id").reset_index(drop=True)


def synthetic_queries(paths: Paths, name: str, split: str) -> pd.DataFrame:
    """The synthesized queries of ``split`` (the synthesize stage's "train" and "dev"; "train,dev": both, so that
    the dev queries the students are validated on have labels too)."""
    path = paths.synthetic_dir(name) / schemas.TABLES["synthetic_queries"].filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no synthesized queries (teach.{name}.queries is 'synthetic': run synthesize)")
    queries = read_table(path)
    wanted = [part.strip() for part in split.split(",") if part.strip()]
    selected = queries[np.logical_or.reduce([in_split(queries["split"], part) for part in wanted])]
    if selected.empty:
        known = sorted({s for joined in queries["split"] for s in joined.split(",")})
        raise ConfigError(
            f"teach.synthetic.{name}.split: no synthesized queries in split {split!r} (splits here: {known})"
        )
    return selected.reset_index(drop=True)


def shipped_union(shipped: pd.DataFrame, depth: int) -> pd.DataFrame:
    """The union of every shipped run's top ``depth`` per query, in reciprocal-rank-fusion order (k = 60), as
    candidates of method ``shipped-union``: TWOLAR's pool of several first stages, for a collection that ships them.

    >>> runs = pd.DataFrame({"run": ["a", "a", "b", "b"], "query_id": "q", "doc_id": ["d1", "d2", "d2", "d3"],
    ...                      "rank": [1, 2, 1, 2], "score": 0.0})
    >>> shipped_union(runs, depth=2)[["doc_id", "rank"]].values.tolist()
    [['d2', 1], ['d1', 2], ['d3', 3]]
    """
    from pipeline.retrievers import rrf_fuse

    runs = [frame[frame["rank"] <= depth] for _, frame in shipped.groupby("run", sort=True)]
    return rrf_fuse(runs, k=60).assign(method=SHIPPED_UNION)


def load_pool(name: str, target: TeachTarget, paths: Paths, queries: pd.DataFrame) -> Pool:
    """The pool of ``target``: ``queries`` (its split's: the collection's, or ``synthetic_queries``), sampled to
    ``max_queries``, with a ``retrieve`` method's run or the synthesized queries' pool as candidates (``rank`` =
    the order the pool shows them in), cut at ``depth``, with their passages."""
    if target.queries == "synthetic":
        candidates_path = paths.pool_dir(name) / schemas.TABLES["pool_candidates"].filename
        if not candidates_path.is_file():
            raise FileNotFoundError(
                f"{candidates_path}: no candidate pool (teach.{name}.queries is 'synthetic': run the pool stage)"
            )
    else:
        candidates_path = paths.retrieval_dir(name) / schemas.TABLES["candidates"].filename
    queries = select_queries(queries, target.max_queries, target.seed)
    if target.candidates == SHIPPED_UNION and target.queries == "collection":
        candidates_path = paths.collection_dir(name) / schemas.TABLES["shipped_runs"].filename
        candidates = shipped_union(read_table(candidates_path), target.depth)
    else:
        candidates = read_table(candidates_path)
    methods = sorted(candidates.method.unique())
    # the shipped union is already cut at ``depth`` per run: its own size bounds it
    within_depth = (candidates["rank"] <= target.depth) | (target.candidates == SHIPPED_UNION)
    candidates = candidates[(candidates.method == target.candidates) & within_depth]
    if candidates.empty:
        raise ConfigError(
            f"{teach_key(name, target)}.candidates: no {target.candidates!r} candidates in {candidates_path} "
            f"(methods here: {methods})"
        )
    candidates = candidates[candidates.query_id.isin(set(queries.query_id))]
    corpus = read_table(paths.collection_dir(name) / schemas.TABLES["corpus"].filename)
    corpus = corpus[corpus.doc_id.isin(set(candidates.doc_id))]
    passages = pd.Series(
        [document_contents(t, x) for t, x in zip(corpus.title, corpus.text, strict=True)], index=corpus.doc_id
    )
    candidates = candidates.sort_values(["query_id", "rank"]).assign(passage=lambda c: c.doc_id.map(passages))
    queries = queries[queries.query_id.isin(set(candidates.query_id))].reset_index(drop=True)
    columns = ["query_id", "text"] + (["source_doc_id"] if target.queries == "synthetic" else [])
    return Pool(
        queries=queries[columns],
        candidates=candidates[["query_id", "doc_id", "rank", "passage"]],
        origin=target.queries,
    )
