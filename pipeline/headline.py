"""The headline figures: one small JSON file per collection × run, what ``dvc metrics show`` prints.

``dvc metrics show`` prints one row per metrics file and one column per key, the union over every file: a
single file holding every run, or files with keys of their own, make a table hundreds of columns wide. So the
evaluate stage writes, besides ``<paths.metrics>/eval.json`` (every figure, a plain output), one file per
evaluated collection, query set and run, all with the same few keys::

    <paths.metrics>/headline/<collection>/all/<run>.json        every query of the evaluation split
    <paths.metrics>/headline/<collection>/held-out/<run>.json   the held-out queries (evaluation.<name>.held_out)

each ``{<measure>: value, ..., "delta": Δ of the headline measure against the collection's baseline run,
"p": the paired t-test's p}``; the baseline run's own file has no ``delta`` or ``p``. dvc.yaml declares the
folder as the evaluate stage's metrics, so ``dvc metrics show`` prints one row per collection × run with
``evaluate.measures`` + 2 columns.

A run's file name is its name with ``:`` as ``.`` (``minilm-bi:untrained`` → ``minilm-bi.untrained.json``,
``teacher:gpt@bm25`` → ``teacher.gpt@bm25.json``: a colon is no file name on Windows) and any character but
letters, digits and ``._@+-`` as ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

FOLDER = "headline"
ALL = "all"
HELD_OUT = "held-out"
DELTA = "delta"
P_VALUE = "p"
STUDENTS_SECTION = "students"  # eval.json's students' fidelity figures: not a collection
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")


def sections(metrics: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """``(collection, query set, section)`` for every collection of ``eval.json``: its whole split (``all``),
    then its held-out queries (``held-out``) where it has them.

    >>> [(c, part) for c, part, _ in sections({"c": {"runs": {}, "held_out": {"runs": {}}}, "students": {}})]
    [('c', 'all'), ('c', 'held-out')]
    """
    for name, section in metrics.items():
        if name == STUDENTS_SECTION or not isinstance(section, Mapping) or "runs" not in section:
            continue
        yield name, ALL, section
        held = section.get("held_out")
        if isinstance(held, Mapping) and "runs" in held:
            yield name, HELD_OUT, held


def comparison(section: Mapping[str, Any], run: str) -> Mapping[str, Any] | None:
    """The run's comparison with the section's baseline (``vs_<baseline>``); None for the baseline itself."""
    baseline = section.get("baseline")
    if run == baseline:
        return None
    return section.get(f"vs_{baseline}", {}).get(run)


def record(section: Mapping[str, Any], run: str, measures: Sequence[str] = ()) -> dict[str, float]:
    """One run's headline figures: its measures (``measures`` first, in that order, then any other), the delta
    and the p-value against the baseline (none for the baseline, nor a p the test left undefined).

    >>> section = {"baseline": "bm25", "runs": {"bm25": {"nDCG@10": 0.5}, "s": {"nDCG@10": 0.6, "R@100": 0.9}},
    ...            "vs_bm25": {"s": {"delta": 0.1, "p_value": 0.03, "wins": 3}}}
    >>> record(section, "s", ["nDCG@10"]), record(section, "bm25")
    ({'nDCG@10': 0.6, 'R@100': 0.9, 'delta': 0.1, 'p': 0.03}, {'nDCG@10': 0.5})
    """
    figures = section["runs"][run]
    order = [m for m in measures if m in figures] + [m for m in figures if m not in measures]
    out = {m: figures[m] for m in order}
    compared = comparison(section, run)
    if compared:
        out[DELTA] = compared["delta"]
        if compared.get("p_value") is not None:
            out[P_VALUE] = compared["p_value"]
    return out


def file_stem(run: str) -> str:
    """The file name (without ``.json``) of run ``run``.

    >>> file_stem("minilm-bi:untrained"), file_stem("teacher:org/model 7b@bm25")
    ('minilm-bi.untrained', 'teacher.org_model_7b@bm25')
    """
    return _UNSAFE.sub("_", run.replace(":", "."))


def files(metrics: Mapping[str, Any], measures: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Every headline file of ``eval.json``'s figures: path relative to the headline folder → its JSON.

    Two runs whose names make the same file name get ``-2``, ``-3``... after the later ones (in sorted order).

    >>> metrics = {"c": {"baseline": "bm25", "runs": {"bm25": {"nDCG@10": 0.5}, "s:untrained": {"nDCG@10": 0.4}},
    ...                  "vs_bm25": {"s:untrained": {"delta": -0.1, "p_value": None}}}}
    >>> files(metrics)
    {'c/all/bm25.json': {'nDCG@10': 0.5}, 'c/all/s.untrained.json': {'nDCG@10': 0.4, 'delta': -0.1}}
    """
    out: dict[str, dict[str, float]] = {}
    for collection, part, section in sections(metrics):
        taken: set[str] = set()
        for run in sorted(section["runs"]):
            stem = candidate = file_stem(run)
            n = 1
            while candidate in taken:
                n += 1
                candidate = f"{stem}-{n}"
            taken.add(candidate)
            out[f"{collection}/{part}/{candidate}.json"] = record(section, run, measures)
    return out
