"""What every teaching method is given (``Pool``) and gives back (``TeachOutcome``), with the columns of the
frames they exchange, and the call counters as the stages report them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pandas as pd

from pipeline import schemas

if TYPE_CHECKING:  # a type only: the build and train stages read imported labels without the openai client
    from pipeline.teacher.client import TeacherCounters

# a method's labels: rank 1 is the teacher's best; ``score`` is null for methods that rank without scoring
RANKING_COLUMNS = ["query_id", "doc_id", "teacher_rank", "score"]
# one row per window asked (window methods; an empty table for the others)
WINDOW_COLUMNS = [
    "query_id",
    "window_start",
    "window_end",
    "parse_status",
    "missing_ids",
    "duplicate_ids",
    "out_of_range_ids",
    "identity",
    "attempts",
    "response",
]
# the rationales table's columns less the provenance the stage adds (model, template_hash, collection, run_id)
RATIONALE_COLUMNS = schemas.RATIONALE_ROW_COLUMNS


@dataclasses.dataclass(frozen=True)
class Pool:
    """What the teacher sees: queries (query_id, text; and source_doc_id for synthesized ones) and their
    top-``depth`` candidates with passage text, in first-stage order.

    >>> pool = Pool(pd.DataFrame({"query_id": ["q"], "text": ["bees"]}),
    ...             pd.DataFrame({"query_id": "q", "doc_id": ["a", "b"], "rank": [1, 2], "passage": ""}))
    >>> pool.texts(), {q: g.doc_id.tolist() for q, g in pool.by_query().items()}
    ({'q': 'bees'}, {'q': ['a', 'b']})
    """

    queries: pd.DataFrame
    candidates: pd.DataFrame  # query_id, doc_id, rank, passage
    origin: str = "collection"  # "collection" or "synthetic" (TeachTarget.queries)

    def texts(self) -> dict[str, str]:
        """Each query's text by query id."""
        return dict(zip(self.queries.query_id, self.queries.text, strict=True))

    def by_query(self) -> dict[str, pd.DataFrame]:
        """Each query's candidates (in the order the candidates frame has them), by query id, in query order."""
        return {query_id: group for query_id, group in self.candidates.groupby("query_id", sort=False)}


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


@dataclasses.dataclass(frozen=True)
class TeachOutcome:
    """A method's labels (``RANKING_COLUMNS``; imported ones also carry each file's provenance columns), the
    figures of its summary, why it stopped early (a budget) if it did, its windows and its rationales."""

    rankings: pd.DataFrame
    stats: dict
    stopped: str | None = None
    windows: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty(WINDOW_COLUMNS))
    # rationale rows (method "rationales", or an imported R2R file: with its own model/template_hash; else empty)
    rationales: pd.DataFrame = dataclasses.field(default_factory=lambda: _empty(RATIONALE_COLUMNS))


def calls_summary(counters: TeacherCounters) -> dict[str, int | float]:
    """The call counters as every stage that calls the teacher reports them: ``paid`` (sent to the endpoint),
    ``cached`` (served by the cache), errors, tokens and the estimated cost.

    >>> from pipeline.teacher.client import TeacherCounters
    >>> calls_summary(TeacherCounters(calls=3, cached=2, prompt_tokens=10))["paid"]
    3
    """
    return {
        "paid": counters.calls,
        "cached": counters.cached,
        "errors": counters.errors,
        "unusable": counters.unusable,
        "prompt_tokens": counters.prompt_tokens,
        "completion_tokens": counters.completion_tokens,
        "estimated_cost_usd": round(counters.cost_usd, 6),
    }


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the teach stage adds to a calling method's rows: the collection, the first stage the candidates came
    from, the model and template that labelled them, the method and the run."""

    collection: str
    first_stage: str
    model: str
    template_hash: str
    method: str
    run_id: str


@dataclasses.dataclass(frozen=True)
class LabelTables:
    """One chunk of the teach stage's three tables as they are written (``teacher_rankings``,
    ``teacher_windows``, ``rationales``: their schemas' columns) and the candidates (query_id, doc_id, rank) its
    queries were ranked from (for the first stage's figures)."""

    rankings: pd.DataFrame
    windows: pd.DataFrame
    rationales: pd.DataFrame
    candidates: pd.DataFrame

    def by_table(self) -> dict[str, pd.DataFrame]:
        """The frames by the name of the table they go to (the stage's three, and ``candidates``)."""
        return {
            "teacher_rankings": self.rankings,
            "teacher_windows": self.windows,
            "rationales": self.rationales,
            "candidates": self.candidates,
        }


def label_tables(
    outcome: TeachOutcome,
    candidates: pd.DataFrame,
    collection: str,
    method: str,
    run_id: str,
    provenance: pd.DataFrame,
    model: str,
    template_hash: str,
) -> LabelTables:
    """The rows the stage writes for ``outcome`` (all of it, or one chunk's: a query's rows never depend on another
    query's, so the chunks' tables concatenated are the whole outcome's): its labels with their ``provenance``
    columns (model, first_stage, template_hash) and each label's rank in ``candidates`` (``first_stage_rank``;
    null for a document outside them), its windows, and its rationales (``model`` and ``template_hash`` added
    where the rows have none of their own).

    >>> outcome = TeachOutcome(pd.DataFrame({"query_id": "q", "doc_id": ["b", "x"], "teacher_rank": [1, 2],
    ...                                      "score": None}), stats={})
    >>> candidates = pd.DataFrame({"query_id": "q", "doc_id": ["a", "b"], "rank": [1, 2]})
    >>> provenance = pd.DataFrame({"model": "m", "first_stage": "bm25", "template_hash": "h"}, index=[0, 1])
    >>> tables = label_tables(outcome, candidates, "c", "listwise", "r1", provenance, "m", "h")
    >>> tables.rankings[["doc_id", "teacher_rank", "first_stage_rank", "method"]].values.tolist()
    [['b', 1, 2, 'listwise'], ['x', 2, <NA>, 'listwise']]
    """
    first_stage = candidates[["query_id", "doc_id", "rank"]].rename(columns={"rank": "first_stage_rank"})
    # imported labels may rank documents outside the pool: their first-stage rank is null
    rankings = (
        pd.concat([outcome.rankings, provenance], axis=1)
        .merge(first_stage, on=["query_id", "doc_id"], how="left")
        .assign(
            collection=collection,
            first_stage_rank=lambda r: r.first_stage_rank.astype("Int32"),
            method=method,
            run_id=run_id,
        )
    )
    # per-window parse records (window methods; empty for the others, so the table always exists)
    windows = outcome.windows.assign(collection=collection, run_id=run_id)
    # Reason-to-Rank rationales (method "rationales" or an R2R file; empty for the others)
    reasons = outcome.rationales.assign(
        collection=collection, window_rank=lambda r: r.window_rank.astype("Int32"), run_id=run_id
    )
    if "model" not in reasons:  # imported rationales carry their own file's provenance
        reasons = reasons.assign(model=model, template_hash=template_hash)
    return LabelTables(rankings, windows, reasons, candidates[["query_id", "doc_id", "rank"]])


def calling_tables(outcome: TeachOutcome, candidates: pd.DataFrame, provenance: Provenance) -> LabelTables:
    """``label_tables`` for a calling method's ``outcome``: every label has the one model, first stage and
    template of ``provenance``."""
    columns = pd.DataFrame(
        {"model": provenance.model, "first_stage": provenance.first_stage, "template_hash": provenance.template_hash},
        index=outcome.rankings.index,
    )
    return label_tables(
        outcome,
        candidates,
        provenance.collection,
        provenance.method,
        provenance.run_id,
        columns,
        provenance.model,
        provenance.template_hash,
    )
