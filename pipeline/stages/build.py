"""build: teacher rankings → training examples (``<paths.training>/<target>/examples.parquet``).

One group per (query, ranked list): the candidates of one teacher's list (``list`` = ``teacher@first_stage``: several
imported files give one list each per query) with the query and passage texts, the list's teacher rank and
score, and TWOLAR's target ``1 / (teacher_rank + 1)``. A passage that several lists rank is an example in each of
them, with each list's own rank: lists are never merged (TWOLAR trains on each first stage's list as is).

Each query is in the ``train`` or the ``dev`` split, at the query level, so that no dev query is trained on in
any list: synthesized queries keep the ``dev`` split the synthesize stage gave them; otherwise a seeded
``build.dev_fraction`` of the queries is held out (at least one when there are two or more queries). Students are
validated on the dev queries, and ``evaluate`` measures every run on them (``evaluation.<name>.held_out``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.config import BuildConfig, ConfigError, Params, Paths, TeachTarget, teach_key
from pipeline.duck import distinct_values
from pipeline.io import ParquetChunkWriter, read_rows_in, read_table, release_freed_memory
from pipeline.lucene import document_contents
from pipeline.stages.common import read_passages
from pipeline.teacher.imported import list_name


class NoTeacherLabels(FileNotFoundError):
    """The teacher's rankings are missing or empty: the teach stage has to run (or label something) first."""


def twolar_target(teacher_rank: pd.Series | np.ndarray) -> np.ndarray:
    """TWOLAR's target: ``1 / (teacher_rank + 1)`` (rank 1 → 0.5).

    >>> twolar_target(np.array([1, 2, 3])).round(4).tolist()
    [0.5, 0.3333, 0.25]
    """
    return 1.0 / (np.asarray(teacher_rank, dtype=np.float64) + 1.0)


def held_out(query_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the queries (at least one when there are two or more and fraction > 0).

    >>> ids = [str(i) for i in range(20)]
    >>> held_out(ids, 0.1, seed=0) == held_out(ids, 0.1, seed=0)
    True
    >>> len(held_out(ids, 0.1, 0)), len(held_out(["a", "b"], 0.1, 0)), held_out(["a"], 0.5, 0)
    (2, 1, set())
    """
    ids = sorted(set(query_ids))
    if len(ids) < 2 or fraction <= 0:
        return set()
    count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    rng = np.random.default_rng(seed)
    return set(rng.choice(np.array(ids, dtype=object), size=count, replace=False).tolist())


def build_examples(
    name: str,
    rankings: pd.DataFrame,
    queries: pd.DataFrame,
    corpus: pd.DataFrame,
    cfg: BuildConfig,
    keep_dev_split: bool,
    dev_queries: set[str] | None = None,
) -> tuple[pd.DataFrame, int]:
    """The training examples (TRAINING_EXAMPLES columns) and the number of ranked documents dropped because the
    corpus or the queries lack them. ``keep_dev_split``: queries whose split is "dev" form the dev split;
    ``dev_queries``: exactly these queries are dev (k-fold benches), whatever else is set."""
    corpus = corpus[corpus.doc_id.isin(set(rankings.doc_id))]
    passages = dict(zip(corpus.doc_id, map(document_contents, corpus.title, corpus.text), strict=True))
    return examples_with_passages(name, rankings, queries, passages, cfg, keep_dev_split, dev_queries)


def dev_split(queries: pd.DataFrame, known_query_ids: list[str], cfg: BuildConfig, keep_dev_split: bool) -> set[str]:
    """The dev queries: the queries' own ``dev`` split when ``keep_dev_split`` and there is one, else a seeded
    ``cfg.dev_fraction`` of ``known_query_ids`` (the queries with at least one example)."""
    if keep_dev_split and (queries["split"] == "dev").any():
        return set(queries.query_id[queries["split"] == "dev"])
    return held_out(known_query_ids, cfg.dev_fraction, cfg.seed)


def examples_with_passages(
    name: str,
    rankings: pd.DataFrame,
    queries: pd.DataFrame,
    passages: dict[str, str],
    cfg: BuildConfig,
    keep_dev_split: bool,
    dev_queries: set[str] | None = None,
) -> tuple[pd.DataFrame, int]:
    """``build_examples`` with the ranked documents' passages given (doc_id → text) instead of the corpus."""
    texts = queries.drop_duplicates("query_id").set_index("query_id")
    frame = rankings.assign(query=rankings.query_id.map(texts["text"]), passage=rankings.doc_id.map(passages))
    known = frame["query"].notna() & frame.passage.notna()
    dropped = int((~known).sum())
    frame = frame[known]
    if dev_queries is not None:
        dev = set(dev_queries)
    else:
        dev = dev_split(texts.reset_index(), frame.query_id.unique().tolist(), cfg, keep_dev_split)
    stages = frame["first_stage"] if "first_stage" in frame else pd.Series(None, index=frame.index, dtype=object)
    lists = [list_name(m, f if isinstance(f, str) and f else None) for m, f in zip(frame.model, stages, strict=True)]
    frame = (
        frame.assign(list=lists)
        .sort_values(["query_id", "list", "teacher_rank"], kind="stable")
        .assign(
            collection=name,
            target=lambda f: twolar_target(f.teacher_rank),
            teacher_score=lambda f: f.score.astype("float64"),
            split=lambda f: np.where(f.query_id.isin(dev), "dev", "train"),
        )
    )
    return frame.reset_index(drop=True), dropped


def query_texts_path(name: str, target: TeachTarget, paths: Paths) -> Path:
    """The table of the queries the teacher labelled: the collection's or the synthesized set."""
    if target.queries == "synthetic":
        return paths.synthetic_dir(name) / schemas.TABLES["synthetic_queries"].filename
    return paths.collection_dir(name) / schemas.TABLES["queries"].filename


def read_query_texts(name: str, target: TeachTarget, paths: Paths) -> pd.DataFrame:
    """The queries the teacher labelled (query_id, text, split), from the collection or the synthesized set."""
    return read_table(query_texts_path(name, target, paths))[["query_id", "text", "split"]]


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    """``items`` in consecutive runs of at most ``size``.

    >>> list(chunks(["a", "b", "c"], 2)), list(chunks([], 2))
    ([['a', 'b'], ['c']], [])
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


def split_counts(examples: pd.DataFrame) -> dict[str, tuple[int, int, int]]:
    """Per split: the examples' queries, groups (query, list) and pairs.

    >>> split_counts(pd.DataFrame({"split": ["train", "train", "dev"], "query_id": ["a", "a", "b"],
    ...                            "list": ["x", "y", "x"]}))
    {'dev': (1, 1, 1), 'train': (1, 2, 2)}
    """
    return {
        str(split): (int(group.query_id.nunique()), len(group.groupby(["query_id", "list"])), len(group))
        for split, group in examples.groupby("split")
    }


def run(name: str, target: TeachTarget, cfg: BuildConfig, paths: Paths, chunk_queries: int = 1000) -> dict:
    """Build the examples of teach target ``name``, ``chunk_queries`` queries at a time (in query_id order, the
    order of the table): the table ``build_examples`` gives for every query at once. Neither the teacher's
    rankings, the queries nor the corpus is ever held whole: each chunk reads its own rows of them."""
    rankings_path = paths.teacher_dir(name) / schemas.TABLES["teacher_rankings"].filename
    if not rankings_path.is_file():
        raise NoTeacherLabels(f"{rankings_path}: no teacher rankings (run `distillrank stage teach {name}` first)")
    if pq.ParquetFile(rankings_path).metadata.num_rows == 0:
        raise NoTeacherLabels(f"{rankings_path}: the teacher ranked nothing (re-run teach; check its budget)")
    queries_path = query_texts_path(name, target, paths)
    if not queries_path.is_file():
        raise FileNotFoundError(f"{queries_path}: table not found (has the stage that writes it run?)")
    corpus = paths.collection_dir(name) / schemas.TABLES["corpus"].filename
    keep_dev_split = target.queries == "synthetic"
    query_ids = distinct_values(rankings_path, "query_id")
    # first pass: the dev split is drawn over every query with an example (a known query, one of its documents in
    # the corpus) before any chunk is built; the document ids of one chunk at a time tell which those are
    query_splits = pq.read_table(queries_path, columns=["query_id", "split"]).to_pandas()
    known_queries = set(query_splits.query_id)
    with_example: list[str] = []
    teachers: set[tuple[str, str]] = set()
    for ids in chunks(query_ids, chunk_queries):
        rows = read_rows_in(rankings_path, {"query_id": ids}, columns=["query_id", "doc_id", "model", "method"])
        in_corpus = set(read_rows_in(corpus, {"doc_id": set(rows.doc_id)}, columns=["doc_id"]).doc_id)
        with_example += sorted(set(rows.query_id[rows.doc_id.isin(in_corpus)]) & known_queries)
        teachers.update(rows[["model", "method"]].drop_duplicates().itertuples(index=False, name=None))
        del rows, in_corpus
        release_freed_memory()
    dev = dev_split(query_splits.drop_duplicates("query_id"), with_example, cfg, keep_dev_split)
    del query_splits, known_queries, with_example
    spec = schemas.TABLES["training_examples"]
    out = paths.training_dir(name) / spec.filename
    queries_by_split: dict[str, int] = {}
    groups_by_split: dict[str, int] = {}
    pairs_by_split: dict[str, int] = {}
    lists: set[str] = set()
    dropped = 0
    with ParquetChunkWriter(out, spec.schema) as writer:
        for ids in chunks(query_ids, chunk_queries):
            chunk = read_rows_in(rankings_path, {"query_id": ids})
            queries = read_rows_in(queries_path, {"query_id": ids}, columns=["query_id", "text", "split"])
            passages = read_passages(corpus, set(chunk.doc_id))
            examples, chunk_dropped = examples_with_passages(name, chunk, queries, passages, cfg, keep_dev_split, dev)
            dropped += chunk_dropped
            writer.write(examples)
            lists.update(examples.list.unique())
            for split, counts in split_counts(examples).items():
                queries_by_split[split] = queries_by_split.get(split, 0) + counts[0]
                groups_by_split[split] = groups_by_split.get(split, 0) + counts[1]
                pairs_by_split[split] = pairs_by_split.get(split, 0) + counts[2]
            # dropped before the next chunk is read, not when it replaces them: one chunk's rows at a time
            del chunk, queries, passages, examples
            release_freed_memory()
        if writer.rows == 0:
            raise ConfigError(
                f"{teach_key(name, target)}: none of the teacher's ranked documents/queries are in the collection"
            )
    return {
        "target": name,
        "queries_from": target.queries,
        "queries": dict(sorted(queries_by_split.items())),
        "groups": dict(sorted(groups_by_split.items())),
        "lists": sorted(lists),
        "pairs": dict(sorted(pairs_by_split.items())),
        "mean_group_size": round(writer.rows / sum(groups_by_split.values()), 2),
        "dropped_pairs": dropped,
        "teacher": sorted(f"{m}/{t}" for m, t in teachers),
        "output": str(out),
    }


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.teach:
        raise ConfigError(
            f"{name}: not a teach target in params.yaml (teach.collection / teach.synthetic: {sorted(params.teach)})"
        )
    return run(name, params.teach[name], params.build, params.paths, params.scale.chunk_queries)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("build", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
