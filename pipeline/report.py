"""``distillrank report``: the evaluation as a person reads it, from ``metrics/eval.json``.

    distillrank report [--params params.yaml] [--measure nDCG@10]

For each evaluation collection: every run's headline figure and its delta against the baseline (with the paired
t-test's p), on the whole split and, where ``evaluation.<name>.held_out`` is set, on the held-out queries that no
student trained on (the figure that says whether a student generalises). Students, their untrained starting
points (``<student>:untrained``) and the teacher's ranked lists (``teacher:<teacher>@<first stage>``) are grouped
after the first stages. Then each student's fidelity to its teacher on the dev queries.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tabulate import tabulate

from pipeline.config import DEFAULT_PARAMS_FILE, ConfigError, load_params

TEACHER_PREFIX = "teacher:"


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
    ('0.6652', '')
    """
    return "" if value is None else f"{value:.4f}"


def collection_table(section: Mapping[str, Any], measure: str, default: str, students: set[str]) -> str:
    """One table: run, the measure, delta vs the collection's baseline, p (paired t-test), wins/losses."""
    baseline = section.get("baseline", default)
    runs = section.get("runs", {})
    versus = section.get(f"vs_{baseline}", {})
    rows = []
    for name in run_order(list(runs), students):
        compared = versus.get(name, {})
        p = compared.get("p_value")
        rows.append(
            [
                name,
                figure(runs[name].get(measure)),
                "" if name == baseline else f"{compared.get('delta', 0.0):+.4f}",
                "" if p is None else f"{p:.3g}",
                "" if name == baseline else f"{compared.get('wins', 0)}/{compared.get('losses', 0)}",
                compared.get("queries", ""),
            ]
        )
    headers = ["run", measure, f"Δ vs {baseline}", "p", "wins/losses", "queries"]
    # no number parsing: tabulate would drop the deltas' "+" and print p = 1e-05 as 0.0000
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def reason_rows(fidelity: Mapping[str, Any]) -> list[list[str]]:
    """One row per student that explains (R2R: a ``faithfulness`` entry): its reasons against the teacher's.

    >>> reason_rows({"r": {"faithfulness": {"passages": 5, "rouge_l_direct": 0.31, "rouge_l_comparative": 0.2,
    ...                                     "well_formed": 1.0, "student_answer_support": None}}, "ce": {}})
    [['r', '5', '0.3100', '0.2000', '1.0000', '']]
    """
    rows = []
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
    return rows


def render(metrics: Mapping[str, Any], measure: str, baseline: str, students: set[str]) -> str:
    parts = []
    for name, section in metrics.items():
        if name == "students" or not isinstance(section, Mapping) or "runs" not in section:
            continue
        held = section.get("held_out")
        in_sample = f" (students trained on {section['queries'] - held['queries']} of them: in sample)" if held else ""
        parts.append(f"{name}: all {section.get('queries')} queries{in_sample}")
        parts.append(collection_table(section, measure, baseline, students))
        if held:
            parts.append(
                f"\n{name}: the {held['queries']} held-out queries (the dev split of teach target "
                f"{held['target']}, never trained on)"
            )
            parts.append(collection_table(held, measure, baseline, students))
        parts.append("")
    fidelity = metrics.get("students") or {}
    if fidelity:
        rows = []
        for student, figures in sorted(fidelity.items()):
            dev = figures.get("dev") or {}
            rows.append(
                [
                    student,
                    figures.get("kind"),
                    figures.get("labels"),
                    figure(dev.get("nDCG@10")),
                    figure(dev.get("nDCG@5")),
                    figure(dev.get("kendall_tau")),
                    figures.get("steps"),
                    "" if figures.get("seconds") is None else f"{figures['seconds']:.0f}",
                ]
            )
        parts.append("students: fidelity to the teacher on the dev queries (nDCG with its ranking as labels)")
        headers = ["student", "kind", "labels", "nDCG@10", "nDCG@5", "Kendall's tau", "steps", "train s"]
        parts.append(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
        reasons = reason_rows(fidelity)
        if reasons:
            parts.append("\nreasons: the students' explanations of the dev passages, against the teacher's")
            headers = ["student", "passages", "ROUGE-L direct", "ROUGE-L comparative", "well formed", "answers found"]
            parts.append(tabulate(reasons, headers=headers, tablefmt="simple", disable_numparse=True))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillrank report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    parser.add_argument("--measure", default=None, help="default: the first of evaluate.measures")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = Path(params.paths.metrics) / "eval.json"
    if not path.is_file():
        print(f"error: {path}: no evaluation yet (run `dvc repro` or `make run`)", file=sys.stderr)
        return 2
    metrics = json.loads(path.read_text(encoding="utf-8"))
    measure = args.measure or params.evaluate.measures[0]
    print(render(metrics, measure, params.evaluate.baseline, set(params.students)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
