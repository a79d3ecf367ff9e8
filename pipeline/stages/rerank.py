"""rerank: a trained student reranks the first stage of every evaluation collection → ``reranked``, TREC runs.

``distillrank stage rerank <student>``: for each collection under ``evaluation``, the top ``rerank.depth`` of its
first stage (``rerank.first_stage_for(collection)``: a method of the ``candidates`` table, or ``shipped-<run>``
for a run the collection ships) for the queries of the evaluation split, rescored by the student. Writes
``<paths.reranked>/<student>/reranked.parquet`` (every collection) and ``runs/<collection>.trec``; the evaluate
stage picks them up under the student's name. With ``rerank.untrained`` (the default) the student's untrained
starting point (its backbone, or ``init_from``) reranks the same candidates as ``<student>:untrained``
(``runs/<collection>.untrained.trec``), so that every report shows what distillation added.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.config import ConfigError, EvaluationCollection, Params, Paths, RerankConfig
from pipeline.io import ParquetChunkWriter, atomic_path, trec_lines
from pipeline.rerank import RerankTiming, timed_rerank
from pipeline.stages.common import evaluation_queries, read_passages
from pipeline.students.base import Student, StudentLoadError, read_student_info
from pipeline.students.precision import set_scoring_precision
from pipeline.students.registry import kind_module, load_student

SHIPPED_PREFIX = "shipped-"  # as in the evaluate stage
RUNS_FOLDER = "runs"


def first_stage_run(paths: Paths, collection: str, first_stage: str, parameter: str) -> pd.DataFrame:
    """The first-stage run named ``first_stage`` on ``collection``: (query_id, doc_id, rank, score).

    ``shipped-<run>`` reads the collection's ``shipped_runs`` table, anything else the ``candidates`` table's
    method of that name; a run that is not there is an error naming ``parameter`` and the runs that are.
    """
    if first_stage.startswith(SHIPPED_PREFIX):
        path = paths.collection_dir(collection) / schemas.TABLES["shipped_runs"].filename
        wanted, column, prefix = first_stage.removeprefix(SHIPPED_PREFIX), "run", SHIPPED_PREFIX
    else:
        path = paths.retrieval_dir(collection) / schemas.TABLES["candidates"].filename
        wanted, column, prefix = first_stage, "method", ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run?)")
    # only the run's rows are read (the table holds every method of every query)
    columns = ["query_id", "doc_id", "rank", "score"]
    selected = pq.read_table(path, columns=columns, filters=[(column, "=", wanted)]).to_pandas()
    if selected.empty:
        known = sorted(
            f"{prefix}{name}" for name in pq.read_table(path, columns=[column]).column(column).unique().to_pylist()
        )
        raise ConfigError(f"{parameter}: no run {first_stage!r} on {collection} (runs there: {known})")
    return selected


UNTRAINED_SUFFIX = ":untrained"


def run(
    student_name: str,
    student: Student,
    evaluation: dict[str, EvaluationCollection],
    cfg: RerankConfig,
    paths: Paths,
    progress: bool = True,
    untrained: Student | None = None,
    chunk_queries: int = 1000,
) -> dict:
    """Rerank every evaluation collection's first stage with ``student`` (and with its ``untrained`` starting point,
    as run ``<student>:untrained``, when given); write the table and the runs.

    The queries go ``chunk_queries`` at a time, in query_id order (the order ``rerank_run`` sorts its rows in), and
    each chunk's passages are read from the corpus with a filter: the table and the TREC runs are appended chunk by
    chunk, the rows and lines of reranking every query at once."""
    out_dir = paths.reranked_dir(student_name)
    summary: dict[str, dict] = {}
    scorers = {student_name: student}
    if untrained is not None:
        scorers[student_name + UNTRAINED_SUFFIX] = untrained
    spec = schemas.TABLES["reranked"]
    with ParquetChunkWriter(out_dir / spec.filename, spec.schema) as table:
        for (collection, evaluation_cfg), (run_name, scorer) in (
            (item, scorer_item) for item in evaluation.items() for scorer_item in scorers.items()
        ):
            summary.setdefault(collection, {})[run_name] = rerank_collection(
                collection, evaluation_cfg, run_name, scorer, cfg, paths, table, progress, chunk_queries
            ) | {"precision": str(getattr(scorer, "precision", "fp32"))}
    return {"student": student_name, "depth": cfg.depth, "collections": summary}


def rerank_collection(
    collection: str,
    evaluation_cfg: EvaluationCollection,
    run_name: str,
    scorer: Student,
    cfg: RerankConfig,
    paths: Paths,
    table: ParquetChunkWriter,
    progress: bool,
    chunk_queries: int,
) -> dict:
    """Rerank one collection's first stage with one scorer, appending to ``table`` and writing its TREC run."""
    queries = evaluation_queries(paths, collection, evaluation_cfg)
    first_stage = cfg.first_stage_for(collection)
    parameter = (
        f"rerank.first_stage_per_collection.{collection}"
        if collection in cfg.first_stage_per_collection
        else "rerank.first_stage"
    )
    first = first_stage_run(paths, collection, first_stage, parameter)
    first = first[first["query_id"].isin(set(queries["query_id"]))]
    if first.empty:
        raise ConfigError(
            f"{parameter}: run {first_stage!r} has no query of split {evaluation_cfg.split!r} of {collection}"
        )
    texts = dict(zip(queries["query_id"], queries["text"], strict=True))
    corpus = paths.collection_dir(collection) / schemas.TABLES["corpus"].filename
    suffix = run_name.removeprefix(student_name_of(run_name)).replace(":", ".")
    query_ids = sorted(set(first["query_id"]))
    by_query = first.groupby("query_id", sort=False).indices
    unknown_docs = scored_queries = pairs = 0
    seconds = 0.0
    with atomic_path(paths.reranked_dir(student_name_of(run_name)) / RUNS_FOLDER / f"{collection}{suffix}.trec") as tmp:
        with tmp.open("w", encoding="utf-8") as trec:
            for start in range(0, len(query_ids), chunk_queries):
                rows = np.concatenate([by_query[q] for q in query_ids[start : start + chunk_queries]])
                chunk = first.iloc[np.sort(rows)]
                passages = read_passages(corpus, set(chunk["doc_id"]))
                unknown = ~chunk["doc_id"].isin(set(passages))
                unknown_docs += int(unknown.sum())
                # keep the unknown ones out: they cannot be scored (the prepare stage reports such runs)
                chunk = chunk[~unknown]
                if chunk.empty:
                    continue
                reranked, timing = timed_rerank(scorer, texts, passages, chunk, cfg.depth, cfg.batch_size, progress)
                trec.write(trec_lines(reranked, run_name))
                table.write(reranked.assign(collection=collection, student=run_name))
                scored_queries, pairs, seconds = (
                    scored_queries + timing.queries,
                    pairs + timing.pairs,
                    seconds + timing.seconds,
                )
        if unknown_docs == len(first):
            raise ConfigError(f"{parameter}: no document of run {first_stage!r} is in the corpus of {collection}")
    return {
        "first_stage": first_stage,
        "queries": scored_queries,
        "pairs": pairs,
        "unknown_docs_dropped": unknown_docs,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(RerankTiming(scored_queries, pairs, seconds).pairs_per_s, 1),
    }


def student_name_of(run_name: str) -> str:
    """The student a run belongs to: ``minilm:untrained`` is minilm's.

    >>> student_name_of("minilm:untrained"), student_name_of("minilm")
    ('minilm', 'minilm')
    """
    return run_name.removesuffix(UNTRAINED_SUFFIX)


def _body(params: Params, name: str | None) -> dict:
    if name not in params.students:
        raise ConfigError(f"students: no student {name!r} (students: {sorted(params.students)})")
    folder = params.paths.student_dir(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: student folder not found (has `distillrank stage train {name}` run?)")
    try:
        student = load_student(folder, precision=params.rerank.precision)
        info = read_student_info(folder)
    except StudentLoadError as err:
        # not in stage_main's user errors: say which parameter names the folder, without a traceback
        raise ConfigError(f"students.{name}: {err}") from None
    untrained = None
    if params.rerank.untrained:
        cfg = params.students[name]
        untrained = kind_module(cfg.kind).untrained(cfg, max_length=int(info.get("max_length") or 0) or None)
        set_scoring_precision(untrained, params.rerank.precision)
    return run(
        name,
        student,
        params.evaluation,
        params.rerank,
        params.paths,
        untrained=untrained,
        chunk_queries=params.scale.chunk_queries,
    )


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    # the positional argument is the student's name (stage_main calls it "collection")
    return stage_main("rerank", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
