"""``distillrank explain``: rerank one query's candidates with a Reason-to-Rank student and show its reasons.

The candidates are the top ``--depth`` documents of ``--query-id`` in a first-stage run (``--run``, TREC format);
the query text is that query's text in the collection (``--collection``, a BEIR-layout folder), unless ``--query``
gives another text (e.g. a rephrasing of the same information need). A free-text query without a query id has no
candidates in a run, so ``--query-id`` is always required.

Example::

    distillrank explain --model data/students/r2r --collection tests/fixtures/tiny \\
        --run tests/fixtures/tiny/runs/weak.trec --query-id q1 --depth 5 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

EXIT_USAGE = 2
# the repository's presets (presets/<name>.yaml): where an R2R student comes from
PRESETS = Path(__file__).resolve().parents[2] / "presets"


class ExplainError(ValueError):
    """A problem the user can fix (wrong folder, unknown query id, missing run); printed without a traceback."""


def _snippet(title: str, text: str, words: int = 12) -> str:
    """The title, or the first ``words`` words of the text.

    >>> _snippet("", "one two three four", words=2), _snippet("Bees", "text")
    ('one two …', 'Bees')
    """
    if title and title.strip():
        return title.strip()
    tokens = text.split()
    return " ".join(tokens[:words]) + (" …" if len(tokens) > words else "")


def r2r_presets(folder: Path = PRESETS) -> list[tuple[str, str]]:
    """(preset, student folder) for every R2R student (``kind: r2r``) a preset of ``folder`` trains."""
    import yaml

    found = []
    for path in sorted(Path(folder).glob("*.yaml"), key=lambda path: path.stem):
        try:
            params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        students = params.get("students") or {}
        root = (params.get("paths") or {}).get("students", "data/students")
        found += [
            (path.stem, f"{root}/{name}")
            for name, cfg in students.items()
            if isinstance(cfg, dict) and cfg.get("kind") == "r2r"
        ]
    return found


def r2r_hint(folder: Path = PRESETS) -> str:
    """Where an R2R student comes from: the presets that train one, and the folder each writes.

    >>> r2r_hint(Path("/nonexistent"))
    "train a student of kind 'r2r' (students.<name>.kind: r2r in params.yaml)"
    """
    presets = r2r_presets(folder)
    if not presets:
        return "train a student of kind 'r2r' (students.<name>.kind: r2r in params.yaml)"
    by_folder: dict[str, list[str]] = {}
    for preset, student in presets:
        by_folder.setdefault(student, []).append(preset)
    return "an R2R student comes from a preset: " + "; ".join(
        f"`make preset PRESET={names[0]}`"
        + "".join(f" (or PRESET={name})" for name in names[1:])
        + f" trains {student}"
        for student, names in by_folder.items()
    )


def candidates(run: pd.DataFrame, query_id: str, depth: int) -> list[str]:
    """The top ``depth`` doc ids of ``query_id`` in ``run`` (by rank, then score).

    >>> run = pd.DataFrame({"query_id": ["q", "q", "r"], "doc_id": ["b", "a", "c"], "rank": [2, 1, 1],
    ...                     "score": [1.0, 2.0, 1.0]})
    >>> candidates(run, "q", 5), candidates(run, "q", 1)
    (['a', 'b'], ['a'])
    """
    rows = run[run["query_id"] == query_id].sort_values(["rank", "score"], ascending=[True, False], kind="stable")
    return list(rows["doc_id"].head(depth))


def explain(
    model_dir: Path,
    collection: Path,
    run_path: Path,
    query_id: str,
    query: str | None = None,
    depth: int = 10,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> tuple[str, list[dict]]:
    """Rerank and explain: (the query text used, one dict per passage in the student's order with rank, doc_id,
    score, first_stage_rank, title, direct, comparative, answer ("" for a student not trained on answer
    sentences))."""
    from pipeline.io import RunFormatError, read_trec_run
    from pipeline.sources import CollectionError, read_beir_corpus, read_beir_queries
    from pipeline.students.base import StudentLoadError, read_student_info

    if not Path(model_dir).is_dir():
        raise ExplainError(f"{model_dir}: the folder does not exist; {r2r_hint()}")
    try:
        info = read_student_info(model_dir)
    except StudentLoadError as err:
        raise ExplainError(f"{err}; {r2r_hint()}") from None
    if info.get("kind") != "r2r":
        raise ExplainError(
            f"{model_dir}: a {info.get('kind')!r} student cannot explain; explain needs an R2R student (kind 'r2r'): "
            f"{r2r_hint()}"
        )
    if not Path(run_path).is_file():
        raise ExplainError(f"{run_path}: run file not found")
    try:
        run = read_trec_run(run_path)
        corpus = read_beir_corpus(Path(collection) / "corpus.jsonl")
        queries = read_beir_queries(Path(collection) / "queries.jsonl")
    except (RunFormatError, CollectionError) as err:
        raise ExplainError(str(err)) from None
    doc_ids = candidates(run, query_id, depth)
    if not doc_ids:
        known = sorted(run["query_id"].unique())
        shown = ", ".join(known[:10]) + (" …" if len(known) > 10 else "")
        raise ExplainError(f"query id {query_id!r} is not in {run_path} (its queries: {shown})")
    if query is None:
        texts = queries.set_index("query_id")["text"]
        if query_id not in texts.index:
            raise ExplainError(
                f"query id {query_id!r} is not in {collection}/queries.jsonl; give its text with --query"
            )
        query = str(texts[query_id])
    documents = corpus.set_index("doc_id")
    missing = [d for d in doc_ids if d not in documents.index]
    if missing:
        raise ExplainError(f"{run_path}: documents {missing[:5]} of query {query_id!r} are not in {collection}")
    passages = [f"{documents.at[d, 'title']} {documents.at[d, 'text']}".strip() for d in doc_ids]

    from pipeline.students.r2r.student import load as load_r2r_student

    student = load_r2r_student(Path(model_dir), info, device)
    scores = student.score(query, passages, batch_size=batch_size)
    order = sorted(range(len(doc_ids)), key=lambda i: (-float(scores[i]), i))
    reasons = student.explain(query, [passages[i] for i in order], max_new_tokens)
    return query, [
        {
            "rank": rank,
            "doc_id": doc_ids[i],
            "score": float(scores[i]),
            "first_stage_rank": i + 1,
            "title": _snippet(str(documents.at[doc_ids[i], "title"]), str(documents.at[doc_ids[i], "text"])),
            "direct": reason["direct"],
            "comparative": reason["comparative"],
            "answer": reason.get("answer", ""),
        }
        for rank, (i, reason) in enumerate(zip(order, reasons, strict=True), start=1)
    ]


def format_text(query_id: str, query: str, rows: list[dict]) -> str:
    """A readable listing of the reranking and its reasons.

    >>> print(format_text("q1", "bees", [{"rank": 1, "doc_id": "d1", "score": 0.5, "first_stage_rank": 2,
    ...     "title": "Honey bees", "direct": "about bees", "comparative": "above d2"}]))
    query q1: bees
    <BLANKLINE>
     1. d1  score 0.5000  (first stage 2)  Honey bees
        direct:      about bees
        comparative: above d2
    """
    lines = [f"query {query_id}: {query}", ""]
    for row in rows:
        lines.append(
            f"{row['rank']:>2}. {row['doc_id']}  score {row['score']:.4f}  (first stage {row['first_stage_rank']})"
            f"  {row['title']}"
        )
        lines.append(f"    direct:      {row['direct'] or '-'}")
        lines.append(f"    comparative: {row['comparative'] or '-'}")
        if row.get("answer"):
            lines.append(f"    answer:      {row['answer']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distillrank explain",
        description="Rerank a query's first-stage candidates with a Reason-to-Rank student and print, for each "
        "passage, its new rank, score and the generated direct and comparative reasons (and answer sentence).",
    )
    parser.add_argument("--model", type=Path, required=True, help="an R2R student folder (kind 'r2r')")
    parser.add_argument("--collection", type=Path, required=True, help="BEIR-layout folder (corpus, queries)")
    parser.add_argument("--run", type=Path, required=True, help="first-stage run (TREC format) with the candidates")
    parser.add_argument("--query-id", required=True, help="the query whose candidates are taken from the run")
    parser.add_argument("--query", help="query text (default: the text of --query-id in the collection)")
    parser.add_argument("--depth", type=int, default=10, help="candidates taken from the run (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="reason length limit (default: trained)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error("--depth must be at least 1")
    try:
        query, rows = explain(
            args.model,
            args.collection,
            args.run,
            args.query_id,
            args.query,
            args.depth,
            args.max_new_tokens,
            args.batch_size,
            args.device,
        )
    except (ExplainError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        print(format_text(args.query_id, query, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
