"""What the teacher is shown: a target's queries (a seeded sample of them) and each one's candidates with their
passages, as a ``Pool``.

The queries are the collection's own (candidates from ``retrieve``, or the union of its shipped runs) or the
synthesized ones (``paths.synthetic/<name>/queries.parquet``, candidates from the pool stage's
``paths.pool/<name>/candidates.parquet``, shown in the pool's order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.config import ConfigError, Paths, TeachTarget, teach_key
from pipeline.io import read_rows_in, read_table
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
        candidates = shipped_union(read_table(candidates_path), target.depth)  # cut at ``depth`` per run already
        methods = sorted(candidates.method.unique())
    else:
        # a shipped union (in a synthesized queries' pool) is bounded by its own size, as above: no depth cut
        depth = None if target.candidates == SHIPPED_UNION else target.depth
        candidates = read_candidates(candidates_path, target.candidates, depth)
        methods = candidate_methods(candidates_path) if candidates.empty else []
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


def read_candidates(path: Path, method: str, depth: int | None) -> pd.DataFrame:
    """The candidates of ``method`` in the table at ``path`` with rank <= ``depth`` (None: any rank) (query_id,
    doc_id, method, rank), in the table's order: ``read_rows_in`` filters a batch at a time, so only those
    rows are ever in memory, not the table's every method to its full depth (8M rows for MS MARCO).

    >>> import tempfile
    >>> from pipeline.io import write_table
    >>> path = Path(tempfile.mkdtemp()) / "candidates.parquet"
    >>> _ = write_table(pd.DataFrame({"collection": "c", "query_id": ["q1", "q1", "q1", "q2"],
    ...     "doc_id": ["a", "b", "a", "c"], "method": ["bm25", "bm25", "splade", "bm25"], "rank": [1, 2, 1, 1],
    ...     "score": 0.0}), schemas.CANDIDATES, path)
    >>> read_candidates(path, "bm25", depth=1).values.tolist()
    [['q1', 'a', 'bm25', 1], ['q2', 'c', 'bm25', 1]]
    """
    where: dict[str, Collection] = {"method": [method]} | ({} if depth is None else {"rank": range(1, depth + 1)})
    return read_rows_in(path, where, columns=["query_id", "doc_id", "method", "rank"])


def candidate_methods(path: Path) -> list[str]:
    """The methods the candidates table at ``path`` holds (for an error message: reads that column only)."""
    return sorted(pq.read_table(path, columns=["method"]).column("method").unique().to_pylist())


def corpus_path(paths: Paths, name: str) -> Path:
    return paths.collection_dir(name) / schemas.TABLES["corpus"].filename


def read_passages(corpus: Path, doc_ids: Iterable[str]) -> pd.Series:
    """The passages (title and text, as the index holds them) of ``doc_ids``, by doc id: ``read_rows_in`` reads
    the corpus a batch at a time and keeps only those rows, so the whole corpus (8.8M passages for MS MARCO) is
    never in memory."""
    rows = read_rows_in(corpus, {"doc_id": set(doc_ids)}, columns=["doc_id", "title", "text"])
    texts = [document_contents(t, x) for t, x in zip(rows.title, rows.text, strict=True)]
    return pd.Series(texts, index=rows.doc_id.tolist(), dtype=object)


def with_passages(pool: Pool, corpus: Path) -> Pool:
    """``pool`` with each candidate's passage (``passage``) read from ``corpus``: what a teach shard does for its
    own queries only, so that the stage never holds every query's passages at once."""
    passages = read_passages(corpus, pool.candidates.doc_id)
    # object dtype: each row points at its document's one string (``map`` would copy every row's text into a new
    # string column: a query's candidates share documents with other queries')
    texts = pd.Series(passages.reindex(pool.candidates.doc_id).to_numpy(), index=pool.candidates.index, dtype=object)
    return dataclasses.replace(pool, candidates=pool.candidates.assign(passage=texts))
