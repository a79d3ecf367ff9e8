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
