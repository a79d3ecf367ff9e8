"""The ``distillrank`` command: run a stage, query the tables with SQL."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from pathlib import Path

STAGES = (
    "fetch",
    "prepare",
    "index",
    "encode",
    "retrieve",
    "synthesize",
    "pool",
    "teach",
    "build",
    "train",
    "rerank",
    "evaluate",
)
# Commands with their own module: distillrank <command> --help
TOOLS = {
    "rerank": "pipeline.rerank",
    "explain": "pipeline.students.explain",
    "export": "pipeline.students.export",
    "report": "pipeline.report",
    "cache": "pipeline.teacher.cache_cli",
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="distillrank",
        description="Distil an LLM teacher's reranking into small student rerankers.",
        epilog=(
            "commands: stage NAME [COLLECTION] | sql QUERY | report | rerank --model DIR ... | explain --model DIR ..."
        ),
    )
    parser.add_argument("command", choices=("stage", "sql", *TOOLS))
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "sql":
        return _sql(rest)
    if args.command in TOOLS:
        return importlib.import_module(TOOLS[args.command]).main(rest)
    if not rest or rest[0] not in STAGES:
        print(f"usage: distillrank stage {{{','.join(STAGES)}}} [COLLECTION] [--params FILE]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.stages.{rest[0]}")
    return module.main(rest[1:])


if __name__ == "__main__":
    sys.exit(main())
