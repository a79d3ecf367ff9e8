"""What every stage's ``main()`` shares: the command line, params loading, logging and the summary print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Collection
from pathlib import Path

import pandas as pd

from pipeline import schemas
from pipeline.config import DEFAULT_PARAMS_FILE, ConfigError, EvaluationCollection, Params, Paths, load_params
from pipeline.io import RunFormatError, read_rows_in, read_table
from pipeline.lucene import document_contents
from pipeline.sources import CollectionError, in_split
from pipeline.students.base import StudentLoadError

# Errors a user can fix: printed as one clear line, without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    CollectionError,
    RunFormatError,
    FileNotFoundError,
    StudentLoadError,
)
# Stages that call the teacher (whose dependencies are imported only when needed).
TEACHER_STAGES = frozenset({"teach", "synthesize"})
# Libraries whose INFO log is chatter (one line per HTTP request: the openai client's httpx2, or httpx; "llama_cpp":
# the embedded server's log, which goes to its file in the stage's folder): WARNING and up unless the stage runs -v
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "llama_cpp")


def configure_logging(stage: str, verbose: bool = False) -> None:
    """INFO on the console for the pipeline's own loggers; the chatty libraries' too only when ``verbose``."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def _teacher_errors() -> tuple[type[Exception], ...]:
    """The teacher's user-fixable errors (imported only by the stages that need the teacher's dependencies)."""
    from pipeline.teacher.client import TeacherCallError, TeacherConfigError
    from pipeline.teacher.embedded import EmbeddedTeacherError
    from pipeline.teacher.imported import LabelsImportError
    from pipeline.teacher.templates import TemplateError

    return (TeacherCallError, TeacherConfigError, EmbeddedTeacherError, LabelsImportError, TemplateError)


def stage_main(
    stage: str, argv: list[str] | None, body: Callable[[Params, str | None], dict], per_collection: bool
) -> int:
    """Parse ``[collection] [--params FILE]``, load params, run ``body`` and print its summary as JSON."""
    parser = argparse.ArgumentParser(prog=f"distillrank stage {stage}")
    if per_collection:
        parser.add_argument("collection", help="the collection's name under 'collections' in params.yaml")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="parameters file")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log every HTTP request and, on the console, the embedded llama.cpp server's log (otherwise in "
        "llama_server.log in the stage's output folder)",
    )
    args = parser.parse_args(argv)
    configure_logging(stage, args.verbose)
    try:
        params = load_params(args.params)
        summary = body(params, getattr(args, "collection", None))
    except Exception as err:
        if not isinstance(err, USER_ERRORS + (_teacher_errors() if stage in TEACHER_STAGES else ())):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": stage, **summary}, indent=2, default=str))
    return 0


def split_queries(paths: Paths, name: str, split: str, parameter: str) -> pd.DataFrame:
    """The queries of ``split`` in collection ``name``; an empty split is an error naming ``parameter``."""
    queries = read_table(paths.collection_dir(name) / schemas.TABLES["queries"].filename)
    selected = queries[in_split(queries["split"], split)]
    if selected.empty:
        known = sorted({s for joined in queries["split"] for s in joined.split(",")})
        raise ConfigError(f"{parameter}: no queries in split {split!r} of {name} (splits here: {known})")
    return selected.reset_index(drop=True)


def evaluation_queries(paths: Paths, name: str, cfg: EvaluationCollection) -> pd.DataFrame:
    """The queries a collection is evaluated on: its split, or a seeded sample of ``cfg.max_queries`` of it (the
    same sample for every run, the students' reranking and the evaluation)."""
    queries = split_queries(paths, name, cfg.split, f"evaluation.{name}.split")
    if cfg.max_queries is not None and cfg.max_queries < len(queries):
        queries = queries.sample(n=cfg.max_queries, random_state=cfg.seed).sort_values("query_id")
    return queries.reset_index(drop=True)


def read_passages(corpus_path: Path, doc_ids: Collection[str]) -> dict[str, str]:
    """The passage text (title and text joined, as BM25 indexes them) of each of ``doc_ids`` found in the corpus
    table at ``corpus_path``, read with a filter: only those rows are ever held, not the corpus."""
    if not corpus_path.is_file():
        raise FileNotFoundError(f"{corpus_path}: table not found (has the stage that writes it run?)")
    if not doc_ids:
        return {}
    table = read_rows_in(corpus_path, {"doc_id": doc_ids}, columns=["doc_id", "title", "text"])
    return dict(zip(table.doc_id, map(document_contents, table.title, table.text), strict=True))
