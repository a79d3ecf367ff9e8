"""TWOLAR's candidate pools: every synthesized query gets the top ``depth_per_method`` of each first-stage method,
deduplicated into one pool of at most ``size`` documents (TWOLAR: 30 from BM25, SPLADE, DRAGON, BM25+monoT5).

Which documents: reciprocal-rank fusion over the methods (score Σ 1/(k + rank)), so a document several methods
agree on enters first, and each method's top documents enter before anyone's tail. The pool is cut at ``size``
in that order; every (query, doc, method, rank, score) of the methods is kept next to it (provenance).

In which order the teacher sees them (``order``): "fused" is the fusion order, the order the paper shows its
pools in; "shuffled" is a seeded permutation per query, because LLM rankers are position-biased (they favour what
comes first, and RankGPT's sliding window carries the initial order through): shuffling keeps the first-stage
order from leaking into the labels. The permutation sorts by a hash of (seed, query_id, doc_id), so adding queries
never reshuffles the others' pools. The pool's rows keep the fused score either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.retrievers import RUN_COLUMNS, rrf_fuse

POOL_METHOD = "pool"  # the ``method`` of the pool's own rows in the pool_candidates table


def build_pool(runs: pd.DataFrame, size: int, k: int = 60) -> pd.DataFrame:
    """The fused, deduplicated pool of each query from ``runs`` (query_id, doc_id, method, rank, score): at most
    ``size`` documents in reciprocal-rank-fusion order → (query_id, doc_id, rank, score = fused score).

    >>> runs = pd.DataFrame({"query_id": "q", "method": ["a", "a", "b", "b"], "doc_id": ["d1", "d2", "d2", "d3"],
    ...                      "rank": [1, 2, 1, 2], "score": 1.0})
    >>> build_pool(runs, size=2, k=1).values.tolist()  # d2: 1/3 + 1/2; d1: 1/2; d3: 1/3 (cut)
    [['q', 'd2', 1, 0.8333333333333333], ['q', 'd1', 2, 0.5]]
    """
    return rrf_fuse([rows for _, rows in runs.groupby("method", sort=True)], k=k, depth=size)


def shuffle_keys(seed: int, query_ids: Iterable[str], doc_ids: Iterable[str]) -> np.ndarray:
    """A sort key per (query, doc) from a hash of (seed, query_id, doc_id): sorting a query's documents by it is a
    seeded random permutation that depends on nothing else (not on the other queries, their number or order, nor
    on the process: Python's ``hash`` is salted per process, so it cannot serve).

    >>> a, b = shuffle_keys(0, ["q1", "q1"], ["d1", "d2"]), shuffle_keys(0, ["q1"], ["d2"])
    >>> bool(a[1] == b[0]), bool(shuffle_keys(1, ["q1"], ["d2"])[0] != b[0])
    (True, True)
    """
    return np.fromiter(
        (
            int.from_bytes(hashlib.sha256(f"{seed}\x00{q}\x00{d}".encode()).digest()[:8], "little")
            for q, d in zip(query_ids, doc_ids, strict=True)
        ),
        dtype=np.uint64,
    )


def shuffle_pool(pool: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Re-rank each query's pool by a seeded permutation (see ``shuffle_keys``); documents and scores unchanged.

    >>> pool = pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "c", "d"], "rank": [1, 2, 3, 4], "score": 0.0})
    >>> shuffled = shuffle_pool(pool, seed=0)
    >>> sorted(shuffled.doc_id) == ["a", "b", "c", "d"], shuffled["rank"].tolist() == [1, 2, 3, 4]
    (True, True)
    """
    keyed = pool.assign(_key=shuffle_keys(seed, pool.query_id.astype(str), pool.doc_id.astype(str)))
    keyed = keyed.sort_values(["query_id", "_key"], kind="stable")
    keyed["rank"] = keyed.groupby("query_id", sort=False).cumcount() + 1
    return keyed[RUN_COLUMNS].reset_index(drop=True)


def pool_table(runs: dict[str, pd.DataFrame], size: int, k: int, order: str, seed: int) -> pd.DataFrame:
    """The pool_candidates rows (without ``collection``): every method's rows (method = its name) and the pool's
    (method = "pool", rank = the order shown to the teacher, score = the fused score).

    >>> a = pd.DataFrame({"query_id": "q", "doc_id": ["d1", "d2"], "rank": [1, 2], "score": [2.0, 1.0]})
    >>> b = pd.DataFrame({"query_id": "q", "doc_id": ["d3", "d1"], "rank": [1, 2], "score": [5.0, 4.0]})
    >>> table = pool_table({"a": a, "b": b}, size=2, k=60, order="fused", seed=0)
    >>> table[table.method == "pool"].doc_id.tolist(), len(table)
    (['d1', 'd3'], 6)
    """
    if order not in {"fused", "shuffled"}:
        raise ValueError(f"pool.order: 'fused' or 'shuffled', got {order!r}")
    method_rows = pd.concat([run[RUN_COLUMNS].assign(method=method) for method, run in runs.items()], ignore_index=True)
    pool = build_pool(method_rows, size=size, k=k)
    if order == "shuffled":
        pool = shuffle_pool(pool, seed)
    pool = pool.sort_values(["query_id", "rank"], kind="stable").assign(method=POOL_METHOD)
    return pd.concat([method_rows, pool], ignore_index=True)[["query_id", "doc_id", "method", "rank", "score"]]


def source_recall(
    table: pd.DataFrame, sources: pd.DataFrame, depths: Iterable[int], methods: Iterable[str] | None = None
) -> dict[str, dict[str, float]]:
    """Share of the queries whose ``source_doc_id`` is in a method's top k, for each method and depth: {method:
    {"@k": share}}. ``table``: pool_candidates rows (query_id, doc_id, method, rank); ``sources``: (query_id,
    source_doc_id), one row per query (queries without a source document are left out). Queries a method
    returned nothing for count as misses.

    >>> table = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "doc_id": ["a", "s1", "s2"], "method": "m",
    ...                       "rank": [1, 2, 1]})
    >>> sources = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "source_doc_id": ["s1", "s2", "s3"]})
    >>> source_recall(table, sources, [1, 2])  # @1: q2 only; @2: q1 and q2; q3 was retrieved by nothing
    {'m': {'@1': 0.3333333333333333, '@2': 0.6666666666666666}}
    """
    hits, n = source_hits(table, sources, depths, methods)
    return {
        method: {at: float(count / n) if n else 0.0 for at, count in found.items()} for method, found in hits.items()
    }


def source_hits(
    table: pd.DataFrame, sources: pd.DataFrame, depths: Iterable[int], methods: Iterable[str] | None = None
) -> tuple[dict[str, dict[str, int]], int]:
    """What ``source_recall`` divides: ({method: {"@k": queries whose source is in its top k}}, queries with a
    source). Counts of disjoint sets of queries add up, so a stage can count chunk by chunk.

    >>> table = pd.DataFrame({"query_id": ["q1", "q2"], "doc_id": ["s1", "x"], "method": "m", "rank": [1, 1]})
    >>> source_hits(table, pd.DataFrame({"query_id": ["q1", "q2"], "source_doc_id": ["s1", "s2"]}), [1])
    ({'m': {'@1': 1}}, 2)
    """
    sources = sources.dropna(subset=["source_doc_id"])
    methods = list(dict.fromkeys(table.method)) if methods is None else list(methods)
    hits = table.merge(sources, left_on=["query_id", "doc_id"], right_on=["query_id", "source_doc_id"])
    result = {}
    for method in methods:
        # the best rank of the source document (a method lists a document once)
        ranks = hits.loc[hits.method == method].groupby("query_id")["rank"].min()
        result[method] = {f"@{k}": int((ranks <= k).sum()) for k in depths}
    return result, len(sources)


def unique_share(table: pd.DataFrame, methods: Iterable[str]) -> dict[str, float]:
    """For each method, the share of its (query, doc) rows that no other method retrieved: what the method adds
    to the pool that the others would not.

    >>> table = pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "a"], "method": ["m", "m", "n"]})
    >>> unique_share(table, ["m", "n"])
    {'m': 0.5, 'n': 0.0}
    """
    counts = unique_counts(table, methods)
    return {method: unique / rows if rows else 0.0 for method, (unique, rows) in counts.items()}


def unique_counts(table: pd.DataFrame, methods: Iterable[str]) -> dict[str, tuple[int, int]]:
    """What ``unique_share`` divides: {method: (its rows no other method retrieved, its rows)}; rows of disjoint
    sets of queries add up.

    >>> unique_counts(pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "a"], "method": ["m", "m", "n"]}), "mn")
    {'m': (1, 2), 'n': (0, 1)}
    """
    methods = list(methods)
    rows = table[table.method.isin(methods)].drop_duplicates(["query_id", "doc_id", "method"])
    found_by = rows.groupby(["query_id", "doc_id"]).method.transform("size")
    return {
        method: (int((found_by[rows.method == method] == 1).sum()), int((rows.method == method).sum()))
        for method in methods
    }
