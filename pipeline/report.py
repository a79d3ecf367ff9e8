"""``distillrank report``: the evaluation as a person reads it, from ``metrics/eval.json`` and the teachers' figures.

    distillrank report [--params params.yaml] [--outputs]

For each evaluation collection: every run's measures, and its delta against the baseline on the headline measure
(the first of ``evaluate.measures``) with the paired t-test's p and the queries won/lost/tied, on the whole split
and, where ``evaluation.<name>.held_out`` is set, on the held-out queries that no student trained on (the figure
that says whether a student generalises): the figures of ``dvc metrics show`` (``metrics/headline/``, written
by :mod:`pipeline.headline` from the same ``eval.json``). Students, their untrained starting points
(``<student>:untrained``) and the teacher's ranked lists (``teacher:<teacher>@<first stage>``) are grouped after
the first stages. Then each teach target's teacher (``metrics/teacher/<target>.json``), and each student with its
fidelity to its teacher on the dev queries. ``--outputs`` adds where everything is (what ``make run`` prints).

Every line fits in 120 columns. The Prefect flow publishes the same tables as its markdown artifact
(:func:`render_markdown`), so the UI and the terminal always show the same figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import headline
from pipeline.config import DEFAULT_PARAMS_FILE, ConfigError, load_params

TEACHER_PREFIX = "teacher:"
WIDTH = 120
NONE = "-"  # a cell with nothing to say (no empty cell: the markdown artifact would show a blank)
EVAL_FILE = "eval.json"
TEACHER_FOLDER = "teacher"
MODEL_WIDTH = 24  # a teacher's model name wraps at this width
RERANKED_RUNS = "runs"  # <paths.reranked>/<student>/runs/<collection>[.untrained].trec (the rerank stage)

Cell = str | tuple[str, ...]  # a tuple: one line each
_NOTHING = {NONE, "n/a", "baseline"}
_FIGURE = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?(-\d+(\.\d+)?)?|\d+(/\d+)+|\(\d+ lists\)")


@dataclass
class Table:
    """One table of the report: a title line, headers, rows, and notes printed after it."""

    title: str
    headers: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    wrap: dict[int, int] = field(default_factory=dict)  # column → the width its lines wrap at, in a terminal


def run_order(names: list[str], students: set[str]) -> list[str]:
    """First stages, then each student next to its untrained start, then the teacher's lists.

    >>> run_order(["teacher:g@bm25", "s:untrained", "bm25", "s", "shipped-bm25"], {"s"})
    ['bm25', 'shipped-bm25', 's:untrained', 's', 'teacher:g@bm25']
    """

    def key(name: str) -> tuple[int, str]:
        if name.startswith(TEACHER_PREFIX):
            return 3, name
        base = name.split(":")[0]
        if base in students:
            return 2, f"{base}:{0 if name.endswith(':untrained') else 1}"
        return 1, name

    return sorted(names, key=key)


def figure(value: float | None) -> str:
    """A measure as the tables print it.

    >>> figure(0.66523), figure(None)
    ('0.6652', '-')
    """
    return NONE if value is None else f"{value:.4f}"


def p_value(value: float | None) -> str:
    """A p-value, 3 significant digits; ``n/a`` where the test is undefined (every delta equal).

    >>> p_value(7.28e-06), p_value(0.0445), p_value(None)
    ('7.28e-06', '0.0445', 'n/a')
    """
    return "n/a" if value is None else f"{value:.3g}"


def _measures(section: Mapping[str, Any], preferred: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(m for figures in section.get("runs", {}).values() for m in figures))
    return [m for m in preferred if m in present] + [m for m in present if m not in preferred]


def delta_measure(section: Mapping[str, Any], columns: Sequence[str]) -> str:
    """The measure of the section's deltas against its baseline (the headline measure), else its first column."""
    compared = section.get(f"vs_{section.get('baseline')}", {}).values()
    return next((c["measure"] for c in compared if c.get("measure")), columns[0] if columns else "the measure")


def collection_table(title: str, section: Mapping[str, Any], measures: Sequence[str], students: set[str]) -> Table:
    """One query set of a collection: each run's measures (the headline files' figures), its delta on the
    headline measure against the baseline, p and wins/losses/ties; a queries column where a run (a teacher's list)
    was measured on fewer queries than the others."""
    baseline = section.get("baseline", NONE)
    runs = section.get("runs", {})
    columns = _measures(section, measures)
    compared = {run: headline.comparison(section, run) for run in runs}
    measure = delta_measure(section, columns)
    counts = {run: c.get("queries") for run, c in compared.items() if c}
    partial = any(n != section.get("queries") for n in counts.values())
    rows: list[list[Cell]] = []
    for run in run_order(list(runs), students):
        figures = headline.record(section, run, columns)
        c = compared[run]
        row: list[Cell] = [run, *(figure(figures.get(m)) for m in columns)]
        if run == baseline:
            row += ["baseline", NONE, NONE]
        elif c is None:
            row += [NONE, NONE, NONE]
        else:
            record = "/".join(str(c.get(k, NONE)) for k in ("wins", "losses", "ties"))
            row += [f"{c['delta']:+.4f}", p_value(c.get("p_value")), record]
        if partial:
            row.append(str(counts.get(run, section.get("queries", NONE))))
        rows.append(row)
    headers = ["run", *columns, f"Δ {measure}", "p", "W/L/T", *(["queries"] if partial else [])]
    return Table(title, headers, rows)


def collection_tables(metrics: Mapping[str, Any], measures: Sequence[str], students: set[str]) -> list[Table]:
    """Every collection's tables: its whole split, then its held-out queries."""
    tables, measure = [], None
    for name, part, section in headline.sections(metrics):
        measure = measure or delta_measure(section, _measures(section, measures))
        against = f"against {section['baseline']}" if section.get("baseline") else "no baseline"
        count = section.get("queries")
        if part == headline.ALL:
            held = section.get("held_out")
            trained = f", students trained on {count - held['queries']}: in sample" if held and count else ""
            title = f"{name}: all {'' if count is None else f'{count} '}queries ({against}{trained})"
        else:
            title = (
                f"{name}: {count} held-out queries, never trained on (teach target "
                f"{section.get('target')}'s dev split; {against})"
            )
        tables.append(collection_table(title, section, measures, students))
    if tables:
        tables[-1].notes.append(
            f"Δ: the run's {measure} minus the baseline's, the mean over the queries; p: paired t-test; "
            "W/L/T: queries won, lost, tied against the baseline."
        )
    return tables


def _names(text: str) -> tuple[str, ...]:
    """A list of names (``a, b``), one a line.

    >>> _names("rank_vicuna-7b, rankgpt-gpt-3.5-turbo"), _names("m")
    (('rank_vicuna-7b,', 'rankgpt-gpt-3.5-turbo'), ('m',))
    """
    parts = [p.strip() for p in text.split(",")]
    return tuple(part + ("," if i < len(parts) - 1 else "") for i, part in enumerate(parts))


def teacher_quality(t: Mapping[str, Any]) -> tuple[Cell, Cell, Cell]:
    """(measure, teacher, first stage) of a teacher's labels: nDCG against the qrels for a collection's own
    queries (the range of its lists when it has several), where it puts the source document for synthesized ones.

    >>> teacher_quality({"quality": {"measure": "nDCG@10", "first_stage": 0.72, "queries": 43,
    ...     "lists": {"a@x": {"nDCG@10": 0.66}, "b@y": {"nDCG@10": 0.75}}}})
    ('nDCG@10', ('0.6600-0.7500', '(2 lists)'), '0.7200')
    >>> teacher_quality({"quality": {}, "source_doc": {"teacher_mrr": 0.67, "first_stage_mrr": 0.89}})
    (('source doc', 'MRR'), '0.6700', '0.8900')
    >>> teacher_quality({"quality": {}})
    ('none: no qrels', 'n/a', 'n/a')
    """
    quality, source = t.get("quality") or {}, t.get("source_doc") or {}
    if quality:
        lists = [v.get(quality.get("measure", "nDCG@10")) for v in (quality.get("lists") or {}).values()]
        lists = [v for v in lists if v is not None]
        if quality.get("teacher") is not None:
            mine: Cell = figure(quality["teacher"])
        elif lists:
            mine = (f"{figure(min(lists))}-{figure(max(lists))}", f"({len(lists)} lists)")
        else:
            mine = "n/a"
        return str(quality.get("measure", "nDCG@10")), mine, figure(quality.get("first_stage"))
    if source:
        return ("source doc", "MRR"), figure(source.get("teacher_mrr")), figure(source.get("first_stage_mrr"))
    return "none: no qrels", "n/a", "n/a"


def teacher_calls(t: Mapping[str, Any]) -> str:
    """Paid / cached calls (the counters of older runs too: made / from_cache); files for an imported teacher.

    >>> teacher_calls({"calls": {"paid": 3, "cached": 117}}), teacher_calls({"calls": {"made": 0, "from_cache": 9}})
    ('3/117', '0/9')
    >>> teacher_calls({"method": "imported", "files": [{}, {}]}), teacher_calls({})
    ('none (2 files)', 'n/a')
    """
    calls = t.get("calls")
    if calls:
        paid, cached = calls.get("paid", calls.get("made")), calls.get("cached", calls.get("from_cache"))
        return f"{NONE if paid is None else paid}/{NONE if cached is None else cached}"
    if t.get("method") == "imported":
        return f"none ({len(t.get('files', []))} files)"
    return "n/a"


def teacher_table(teachers: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """One row per teach target (``metrics/teacher/<target>.json``); the identity-window share (the windows the
    LLM returned unchanged) as a column only when a window method (listwise, rationales) taught a target."""
    if not teachers:
        return None
    identity = any(t.get("identity_share") is not None for t in teachers.values())
    rows: list[list[Cell]] = []
    notes = []
    for name, t in sorted(teachers.items()):
        queries = t.get("queries") or {}
        measure, mine, first = teacher_quality(t)
        row: list[Cell] = [
            name,
            (str(queries.get("labelled", NONE)), str(t.get("queries_from", NONE))),
            str(t.get("method", NONE)),
            _names(str(t.get("model", NONE))),
            teacher_calls(t),
            measure,
            mine,
            first,
        ]
        if identity:
            share = t.get("identity_share")
            row.append(f"{share:.0%}" if share is not None else f"n/a ({t.get('method', NONE)})")
        rows.append(row)
        if t.get("stopped_early"):
            notes.append(f"{name}: the teacher stopped early ({t['stopped_early']}): it labelled what it had")
    headers = ["target", "queries", "method", "model", "calls paid/cached", "measure", "teacher", "first stage"]
    headers += ["identity windows"] if identity else []
    return Table("teachers: what the students learn from, and how good it is", headers, rows, notes, {3: MODEL_WIDTH})


def student_table(fidelity: Mapping[str, Any]) -> Table | None:
    """One row per student: what it is, what it learnt from, its training, its fidelity to the teacher on the
    dev queries (nDCG and Kendall's tau with the teacher's ranking as labels)."""
    if not fidelity:
        return None
    rows: list[list[Cell]] = []
    for student, figures in sorted(fidelity.items()):
        figures = figures if isinstance(figures, Mapping) else {}
        dev = figures.get("dev") or {}
        seconds = figures.get("seconds")
        rows.append(
            [
                student,
                str(figures.get("kind", NONE)),
                str(figures.get("backbone", NONE)),
                str(figures.get("labels", NONE)),
                str(figures.get("loss", NONE)),
                str(figures.get("steps", NONE)),
                NONE if seconds is None else f"{seconds:.0f}",
                figure(dev.get("nDCG@10")),
                figure(dev.get("nDCG@5")),
                figure(dev.get("kendall_tau")),
            ]
        )
    headers = ["student", "kind", "backbone", "labels", "loss", "steps", "train s", "nDCG@10", "nDCG@5", "tau"]
    title = "students: fidelity to the teacher on the dev queries (nDCG, Kendall's tau: its ranking as labels)"
    return Table(title, headers, rows)


def reason_table(fidelity: Mapping[str, Any]) -> Table | None:
    """One row per student that explains (R2R: a ``faithfulness`` entry): its reasons against the teacher's.

    >>> reason_table({"r": {"faithfulness": {"passages": 5, "rouge_l_direct": 0.31, "rouge_l_comparative": 0.2,
    ...                                      "well_formed": 1.0, "student_answer_support": None}}, "ce": {}}).rows
    [['r', '5', '0.3100', '0.2000', '1.0000', '-']]
    """
    rows: list[list[Cell]] = []
    for student, figures in sorted(fidelity.items()):
        faith = figures.get("faithfulness") if isinstance(figures, Mapping) else None
        if not faith:
            continue
        rows.append(
            [
                student,
                str(faith.get("passages", 0)),
                figure(faith.get("rouge_l_direct")),
                figure(faith.get("rouge_l_comparative")),
                figure(faith.get("well_formed")),
                figure(faith.get("student_answer_support")),
            ]
        )
    if not rows:
        return None
    headers = ["student", "passages", "ROUGE-L direct", "ROUGE-L comparative", "well formed", "answers found"]
    return Table("reasons: the students' explanations of the dev passages, against the teacher's", headers, rows)


def tables(
    metrics: Mapping[str, Any],
    measures: Sequence[str] = (),
    students: set[str] | None = None,
    teachers: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Table]:
    """Every table of the report: the collections' (the headline), the teachers', the students'."""
    fidelity = metrics.get(headline.STUDENTS_SECTION) or {}
    students = set(fidelity) if students is None else students
    found = [
        *collection_tables(metrics, measures, students),
        teacher_table(teachers or {}),
        student_table(fidelity),
        reason_table(fidelity),
    ]
    return [t for t in found if t is not None]


def _lines(cell: Cell) -> tuple[str, ...]:
    return cell if isinstance(cell, tuple) else (cell,)


def _wrap_lines(lines: tuple[str, ...], width: int) -> tuple[str, ...]:
    """Each line wrapped at ``width`` (at hyphens too: model names have no spaces).

    >>> _wrap_lines(("qwen2.5-coder-1.5b-instruct-q4_k_m",), 24)
    ('qwen2.5-coder-1.5b-', 'instruct-q4_k_m')
    """
    return tuple(part for line in lines for part in (textwrap.wrap(line, width) or [line]))


def numeric_columns(table: Table) -> list[bool]:
    """Which columns hold figures (right-aligned): every cell a number, a ratio like ``34/9/0``, or one that says
    there is nothing (``-``, ``n/a``, ``baseline``), at least one a number.

    >>> numeric_columns(Table("t", ["run", "Δ", "W/L/T"], [["bm25", "baseline", "-"], ["s", "+0.1", "3/4/0"]]))
    [False, True, True]
    """
    out = []
    for i in range(len(table.headers)):
        lines = [line for row in table.rows for line in _lines(row[i])]
        figures = [line for line in lines if line not in _NOTHING]
        out.append(bool(figures) and all(_FIGURE.fullmatch(line) for line in figures))
    return out


def text_table(table: Table) -> str:
    """A table as plain text: columns two spaces apart, a dashed line under the headers, figures right-aligned,
    a cell of several lines (a tuple) on as many lines.

    >>> print(text_table(Table("t", ["run", "nDCG@10"], [["bm25", "0.5"], [("student", "(new)"), "0.75"]])))
    run      nDCG@10
    -------  -------
    bm25         0.5
    student     0.75
    (new)
    """
    right = numeric_columns(table)
    rows = [
        [_wrap_lines(_lines(c), table.wrap[i]) if i in table.wrap else _lines(c) for i, c in enumerate(row)]
        for row in table.rows
    ]
    widths = [max([len(h), *(len(line) for row in rows for line in row[i])]) for i, h in enumerate(table.headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(padded).rstrip()

    out = [line(table.headers), line(["-" * w for w in widths])]
    for row in rows:
        height = max(len(cell) for cell in row)
        out += [line([cell[k] if k < len(cell) else "" for cell in row]) for k in range(height)]
    return "\n".join(out)


def render_text(report: Sequence[Table]) -> str:
    """The report for a terminal: each table under its title (wrapped to :data:`WIDTH`), a blank line between."""
    if not report:
        return "No evaluation: no collection was evaluated.\n"
    parts = []
    for table in report:
        parts.append(textwrap.fill(table.title, WIDTH, subsequent_indent="  "))
        parts.append(text_table(table))
        parts += [textwrap.fill(note, WIDTH, subsequent_indent="  ") for note in table.notes]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _markdown_cell(cell: Cell) -> str:
    text = "<br>".join(cell) if isinstance(cell, tuple) else cell
    return text.replace("|", "\\|") or NONE


def render_markdown(report: Sequence[Table], heading: str = "# distillrank evaluation") -> str:
    """The report as markdown (the Prefect artifact): a ``##`` heading per table, a pipe table, its notes.

    >>> t = Table("c: all 4 queries", ["run", "model"], [["bm25", "0.8123"], ["s", ("a", "b|c")]])
    >>> print(render_markdown([t]))
    # distillrank evaluation
    <BLANKLINE>
    ## c: all 4 queries
    <BLANKLINE>
    | run | model |
    |---|---|
    | bm25 | 0.8123 |
    | s | a<br>b\\|c |
    """
    if not report:
        return f"{heading}\n\nNo metrics: no collection was evaluated."
    sections = [heading]
    for table in report:
        lines = [f"## {table.title}", ""]
        lines.append("| " + " | ".join(_markdown_cell(h) for h in table.headers) + " |")
        lines.append("|" + "|".join("---:" if r else "---" for r in numeric_columns(table)) + "|")
        lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in table.rows]
        lines += ["", *table.notes] if table.notes else []
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def read_teachers(metrics_dir: Path) -> dict[str, dict]:
    """Every teach target's figures, ``<metrics>/teacher/<target>.json``, by target (an unreadable file is
    skipped: the report shows what it can)."""
    teachers = {}
    for path in sorted((metrics_dir / TEACHER_FOLDER).glob("*.json")):
        try:
            teachers[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return teachers


def render(metrics: Mapping[str, Any], measures: Sequence[str], students: set[str], teachers=None) -> str:
    """The terminal report of ``eval.json``'s figures (and the teachers')."""
    return render_text(tables(metrics, measures, students, teachers))


# --- where everything is (make run's closing message) -------------------------------------------------------


def dvc_remotes(root: Path) -> list[str] | None:
    """The DVC remotes configured for the repository at ``root`` (every config level, as ``dvc remote list``);
    None when it cannot tell."""
    try:
        from dvc.config import Config

        return sorted(Config(dvc_dir=str(root / ".dvc"))["remote"])
    except Exception:  # no DVC, no repository, a broken config: say nothing about remotes
        return None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def outputs_text(params, root: Path, remotes: list[str] | None) -> str:
    """Where a run's outputs are, with the actual student names, and what to do next."""
    paths = params.paths
    students = list(params.students)
    rows: list[tuple[str, str]] = [
        (
            "headline",
            f"{paths.metrics}/{headline.FOLDER}/ (dvc metrics show); every figure: {paths.metrics}/{EVAL_FILE}",
        ),
        ("per query", f"{paths.evaluation}/per_query.parquet, {paths.plots}/deltas/<collection>.png"),
        ("first stages", f"{paths.retrieval}/<collection>/runs/*.trec"),
    ]
    for student in students:
        folder = _relative(paths.student_dir(student), root)
        runs_dir = paths.reranked_dir(student) / RERANKED_RUNS
        runs = sorted(p.name for p in runs_dir.glob("*.trec"))
        rows.append((f"student {student}", f"{folder}/ (its model card: README.md)"))
        rows.append(("  reranked runs", f"{_relative(runs_dir, root)}/" + (f": {', '.join(runs)}" if runs else "")))
        rows.append(("  training", f"{paths.plots}/training/{student}.png (the curves; .csv: dvc plots show)"))
    if not students:
        rows.append(("students", "none in params.yaml (students:)"))
    beside = Path(sys.executable).parent / "distillrank"
    distillrank = _relative(beside, root) if beside.exists() else "distillrank"
    schedule = params.schedule
    rows += [
        ("tables (SQL)", f'{distillrank} sql "SELECT * FROM candidates LIMIT 5"   or   make sql'),
        (
            "Prefect",
            f"make serve: the UI on http://127.0.0.1:4200, dvc repro at cron {schedule.cron} {schedule.timezone}",
        ),
    ]
    if remotes:
        rows.append(("share", f"dvc push (remote: {', '.join(remotes)})"))
    elif remotes is not None:
        rows.append(("remote", "none configured: the outputs are in .dvc/cache only (dvc remote add -d NAME URL)"))
    width = max(len(label) for label, _ in rows) + 2
    lines = ["Outputs:"] + [f"  {label + ':':<{width}}{text}" for label, text in rows]
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent=" " * (width + 2)) for line in lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillrank report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    parser.add_argument(
        "--outputs", action="store_true", help="then where the outputs are: students, reranked runs, plots"
    )
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics_dir = Path(params.paths.metrics)
    path = metrics_dir / EVAL_FILE
    if not path.is_file():
        print(f"error: {path}: no evaluation yet (run `dvc repro` or `make run`)", file=sys.stderr)
        return 2
    metrics = json.loads(path.read_text(encoding="utf-8"))
    print(render(metrics, params.evaluate.measures, set(params.students), read_teachers(metrics_dir)), end="")
    if args.outputs:
        root = Path.cwd()
        print()
        print(outputs_text(params, root, dvc_remotes(root)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
