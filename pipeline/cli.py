"""The ``distillrank`` command: run a stage, query the tables with SQL."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from pathlib import Path

# Every stage: (the name it takes, what it does). dvc.yaml runs them as `distillrank stage <stage> <name>`.
STAGES = {
    "fetch": ("DATASET", "export an ir_datasets collection (a key of 'ir_datasets') to a BEIR-layout folder"),
    "prepare": ("COLLECTION", "load a collection into the corpus, queries, qrels and shipped_runs tables"),
    "index": ("COLLECTION", "the collection's BM25 index (Lucene)"),
    "encode": ("COLLECTION", "the collection's bi-encoder embeddings, a FAISS index (the dense retriever)"),
    "retrieve": ("COLLECTION", "first-stage runs of every query: the candidates table and TREC runs"),
    "synthesize": ("TARGET", "training queries generated from a collection's corpus (a key of 'synthesize')"),
    "pool": ("TARGET", "the candidate pools of a target's synthesized queries"),
    "teach": ("TARGET", "the LLM teacher ranks a target's candidates (a key of 'teach.collection'/'.synthetic')"),
    "build": ("TARGET", "a target's teacher rankings -> training examples"),
    "train": ("STUDENT", "train one student (a key of 'students')"),
    "rerank": ("STUDENT", "the student reranks the first stage of every evaluation collection"),
    "evaluate": ("", "every run on every evaluation collection -> metrics/eval.json, plots/"),
}
# Commands with their own module: distillrank <command> --help
TOOLS = {
    "rerank": "pipeline.rerank",
    "explain": "pipeline.students.explain",
    "export": "pipeline.students.export",
    "report": "pipeline.report",
    "cache": "pipeline.teacher.cache_cli",
}
# What `distillrank --help` says of each command.
COMMANDS = {
    "stage": "run one pipeline stage as dvc.yaml does, e.g. stage teach trec-dl-2019 (stage --help lists them)",
    "sql": "run SQL over views of the pipeline's tables (corpus, queries, candidates, teacher_calls, ...)",
    "report": "the evaluation as a table: every run against BM25, the teacher, the students",
    "rerank": "rerank a first-stage TREC run of a BEIR-layout folder with a trained student",
    "explain": "rerank one query with a Reason-to-Rank student and print its reasons",
    "export": "export a student with its model card: ONNX graphs (cross-/bi-encoders) or a hub-ready copy",
    "cache": "the teacher's call cache: stats, purge",
}


def _sql(argv: list[str]) -> int:
    import duckdb
    from tabulate import tabulate

    from pipeline import duck
    from pipeline.config import DEFAULT_PARAMS_FILE, ConfigError, load_params

    parser = argparse.ArgumentParser(
        prog="distillrank sql",
        description="Run SQL over views of the pipeline's tables (corpus, queries, qrels, candidates, ...).",
    )
    parser.add_argument("query", nargs="?", help='e.g. "SELECT collection, count(*) FROM corpus GROUP BY 1"')
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--max-rows", type=int, default=50, help="rows printed in table format (0: all)")
    parser.add_argument(
        "--print-views", action="store_true", help="print the CREATE VIEW statements (for the duckdb shell)"
    )
    args = parser.parse_args(argv)
    try:
        paths = load_params(args.params).paths
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_views:
        print("\n".join(duck.view_statements(paths)))
        return 0
    if not args.query:
        parser.error("give a query, or --print-views")
    try:
        columns, rows = duck.query(paths, args.query)
    except duckdb.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif args.format == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=1))
    else:
        shown = rows if args.max_rows == 0 else rows[: args.max_rows]
        print(tabulate(shown, headers=columns, tablefmt="simple", floatfmt=".4f", maxcolwidths=60))
        if len(shown) < len(rows):
            print(f"... {len(rows) - len(shown)} more rows (--max-rows 0 for all)")
    return 0


def _listing(rows: dict[str, str]) -> str:
    """Two aligned columns, one row a line."""
    width = max(map(len, rows)) + 2
    return "\n".join(f"  {name:<{width}}{text}" for name, text in rows.items())


def stage_help() -> str:
    """What `distillrank stage --help` prints: what a stage is, and every stage with the name it takes."""
    rows = {f"{stage} {argument}".rstrip(): text for stage, (argument, text) in STAGES.items()}
    return (
        "usage: distillrank stage STAGE [NAME] [--params FILE]\n\n"
        "Run one stage of the pipeline for one name in params.yaml and print its summary as JSON: what\n"
        "`dvc repro` runs for each stage of dvc.yaml, e.g. `distillrank stage teach trec-dl-2019`.\n\n"
        f"stages:\n{_listing(rows)}\n\n"
        "distillrank stage STAGE --help: the stage's own options."
    )


def _stage(argv: list[str]) -> int:
    if argv and argv[0] in {"-h", "--help"}:
        print(stage_help())
        return 0
    if not argv or argv[0] not in STAGES:
        problem = "give a stage"
        if argv:
            from pipeline.config import did_you_mean

            problem = f"unknown stage {argv[0]!r}" + did_you_mean(argv[0], list(STAGES))
        print(f"{stage_help()}\n\ndistillrank stage: error: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.stages.{argv[0]}")
    return module.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="distillrank",
        usage="distillrank COMMAND [ARGS ...]",
        description="Distil an LLM teacher's reranking into small student rerankers.",
        epilog=f"commands:\n{_listing(COMMANDS)}\n\ndistillrank COMMAND --help: the command's own options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    command = parser.parse_args(argv[:1]).command
    rest = argv[1:]
    if command == "sql":
        return _sql(rest)
    if command in TOOLS:
        return importlib.import_module(TOOLS[command]).main(rest)
    return _stage(rest)


if __name__ == "__main__":
    sys.exit(main())
