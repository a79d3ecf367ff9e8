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

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, EvaluationCollection, Params, Paths, RerankConfig
from pipeline.io import read_table, write_table, write_trec_run
from pipeline.lucene import document_contents
from pipeline.rerank import timed_rerank
from pipeline.stages.common import evaluation_queries
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
        table = read_table(paths.collection_dir(collection) / schemas.TABLES["shipped_runs"].filename)
        wanted, column, prefix = first_stage.removeprefix(SHIPPED_PREFIX), "run", SHIPPED_PREFIX
    else:
        table = read_table(paths.retrieval_dir(collection) / schemas.TABLES["candidates"].filename)
        wanted, column, prefix = first_stage, "method", ""
    selected = table[table[column] == wanted]
    if selected.empty:
        known = sorted(f"{prefix}{name}" for name in table[column].unique())
        raise ConfigError(f"{parameter}: no run {first_stage!r} on {collection} (runs there: {known})")
    return selected[["query_id", "doc_id", "rank", "score"]].reset_index(drop=True)


def _passages(paths: Paths, collection: str, doc_ids: set[str]) -> dict[str, str]:
    corpus = read_table(paths.collection_dir(collection) / schemas.TABLES["corpus"].filename)
    corpus = corpus[corpus["doc_id"].isin(doc_ids)]
    return {
        d: document_contents(t, x) for d, t, x in zip(corpus["doc_id"], corpus["title"], corpus["text"], strict=True)
    }


UNTRAINED_SUFFIX = ":untrained"


def run(
    student_name: str,
    student: Student,
    evaluation: dict[str, EvaluationCollection],
    cfg: RerankConfig,
    paths: Paths,
    progress: bool = True,
    untrained: Student | None = None,
) -> dict:
    """Rerank every evaluation collection's first stage with ``student`` (and with its ``untrained`` starting point,
    as run ``<student>:untrained``, when given); write the table and the runs."""
    out_dir = paths.reranked_dir(student_name)
    frames = []
    summary: dict[str, dict] = {}
    scorers = {student_name: student}
    if untrained is not None:
        scorers[student_name + UNTRAINED_SUFFIX] = untrained
    for (collection, evaluation_cfg), (run_name, scorer) in (
        (item, scorer_item) for item in evaluation.items() for scorer_item in scorers.items()
    ):
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
        passages = _passages(paths, collection, set(first["doc_id"]))
        unknown = ~first["doc_id"].isin(set(passages))
        if unknown.all():
            raise ConfigError(f"{parameter}: no document of run {first_stage!r} is in the corpus of {collection}")
        # keep the unknown ones out: they cannot be scored (the prepare stage reports such runs)
        first = first[~unknown]
        texts = dict(zip(queries["query_id"], queries["text"], strict=True))
        reranked, timing = timed_rerank(scorer, texts, passages, first, cfg.depth, cfg.batch_size, progress)
        suffix = run_name.removeprefix(student_name).replace(":", ".")
        write_trec_run(reranked, out_dir / RUNS_FOLDER / f"{collection}{suffix}.trec", tag=run_name)
        frames.append(reranked.assign(collection=collection, student=run_name))
        summary.setdefault(collection, {})[run_name] = {
            "first_stage": first_stage,
            "precision": str(getattr(scorer, "precision", "fp32")),
            "queries": timing.queries,
            "pairs": timing.pairs,
            "unknown_docs_dropped": int(unknown.sum()),
            "seconds": round(timing.seconds, 2),
            "pairs_per_s": round(timing.pairs_per_s, 1),
        }
    spec = schemas.TABLES["reranked"]
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame({name: pd.Series(dtype=object) for name in spec.schema.names})
    )
    write_table(table, spec.schema, out_dir / spec.filename)
    return {"student": student_name, "depth": cfg.depth, "collections": summary}


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
    return run(name, student, params.evaluation, params.rerank, params.paths, untrained=untrained)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    # the positional argument is the student's name (stage_main calls it "collection")
    return stage_main("rerank", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
