"""What the teacher is shown: a target's queries (a seeded sample of them) and each one's candidates with their
passages, as a ``Pool``.

The queries are the collection's own (candidates from ``retrieve``, or the union of its shipped runs) or the
synthesized ones (``paths.synthetic/<name>/queries.parquet``, candidates from the pool stage's
``paths.pool/<name>/candidates.parquet``, shown in the pool's order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

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


def load_pool(name: str, target: TeachTarget, paths: Paths, queries: pd.DataFrame, passages: bool = True) -> Pool:
    """The pool of ``target``: ``queries`` (its split's: the collection's, or ``synthetic_queries``), sampled to
    ``max_queries``, with a ``retrieve`` method's run or the synthesized queries' pool as candidates (``rank`` =
    the order the pool shows them in), cut at ``depth``, with their passages (``passages``; else without the
    column: ``with_passages`` adds them later)."""
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
    candidates = candidates.sort_values(["query_id", "rank"])
    queries = queries[queries.query_id.isin(set(candidates.query_id))].reset_index(drop=True)
    columns = ["query_id", "text"] + (["source_doc_id"] if target.queries == "synthetic" else [])
    pool = Pool(queries=queries[columns], candidates=candidates[["query_id", "doc_id", "rank"]], origin=target.queries)
    return with_passages(pool, corpus_path(paths, name)) if passages else pool


def corpus_path(paths: Paths, name: str) -> Path:
    return paths.collection_dir(name) / schemas.TABLES["corpus"].filename


def read_passages(corpus: Path, doc_ids: Iterable[str]) -> pd.Series:
    """The passages (title and text, as the index holds them) of ``doc_ids``, by doc id: pyarrow reads the corpus
    a row group at a time and keeps only those rows, so the whole corpus (8.8M passages for MS MARCO) is never in
    memory."""
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: table not found (has the stage that writes it run?)")
    wanted = sorted(set(doc_ids))
    table = pq.read_table(corpus, columns=["doc_id", "title", "text"], filters=[("doc_id", "in", wanted)])
    rows = table.to_pydict()
    texts = [document_contents(t, x) for t, x in zip(rows["title"], rows["text"], strict=True)]
    return pd.Series(texts, index=rows["doc_id"], dtype=object)


def with_passages(pool: Pool, corpus: Path) -> Pool:
    """``pool`` with each candidate's passage (``passage``) read from ``corpus``: what a teach shard does for its
    own queries only, so that the stage never holds every query's passages at once."""
    passages = read_passages(corpus, pool.candidates.doc_id)
    return dataclasses.replace(pool, candidates=pool.candidates.assign(passage=pool.candidates.doc_id.map(passages)))
