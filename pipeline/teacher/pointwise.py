"""Pointwise teaching: one prompt per (query, passage), scored from the first generated token's log-probabilities.

The caller asks the endpoint for one token with ``logprobs=True, top_logprobs=k`` (llama.cpp's server and vLLM
return them for chat completions) and passes the first position's top-k here. Reading the distribution rather
than the sampled word gives a graded score even from a model that always answers "Yes", and costs one token.

Only the top k tokens come back, so an answer token may be absent: its log-probability is then at most the
lowest one listed, and we use that minus ``margin`` as a floor and flag the score, instead of guessing.

``teach`` scores every (query, candidate) of a pool so; all the rest here is pure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import SamplingConfig
from pipeline.teacher.client import BudgetExceeded, result_from_record
from pipeline.teacher.listwise import DEFAULT_MAX_WORDS, truncate_words
from pipeline.teacher.outcome import RANKING_COLUMNS, Pool, TeachOutcome
from pipeline.teacher.templates import PromptTemplate, TemplateError, load_template

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig
    from pipeline.teacher.client import CachedTeacher

# How far below the lowest listed log-probability an absent answer token is put (nats). Any value >= 0 is a
# valid bound; 1 keeps "absent" distinct from "tied with the last listed token".
FLOOR_MARGIN = 1.0
MAX_GRADE = 3

# Token-piece space markers (SentencePiece, byte-level BPE) that a server may leave in a token's text.
_SPACE_MARKERS = "\u2581\u0120"

TopLogprobs = Mapping[str, float] | Sequence[Mapping[str, object]]


def pointwise_messages(
    template: PromptTemplate, query: str, passage: str, max_words: int = DEFAULT_MAX_WORDS
) -> list[dict[str, str]]:
    """The chat messages for one (query, passage) judgement: the system message (if not empty), then the ask.

    >>> from pipeline.teacher.templates import load_template
    >>> m = pointwise_messages(load_template("pointwise-yes-no"), "capital of france", "Paris is   the capital", 3)
    >>> [x["role"] for x in m], m[1]["content"].splitlines()[:2]
    (['system', 'user'], ['Query: capital of france', 'Passage: Paris is the'])
    """
    if template.kind != "pointwise":
        raise TemplateError(f"template {template.name!r} is a {template.kind} template, not pointwise")
    system = template.render("system")
    user = template.render("user", query=query, passage=truncate_words(passage, max_words))
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


@dataclass(frozen=True)
class PointwiseScore:
    """A relevance score and what had to be assumed to get it.

    ``flags``: ``yes_absent`` / ``no_absent`` (that answer was not in the top-k and was floored),
    ``missing_grades`` (some grades were not in the top-k and count as probability 0), ``no_answer_token`` (no
    answer token at all: the score is the no-information value). ``answer_mass`` is the probability the
    model put on the answer tokens it was shown: low mass means it wanted to say something else.
    """

    score: float
    flags: tuple[str, ...] = ()
    answer_mass: float = 0.0

    @property
    def degenerate(self) -> bool:
        return "no_answer_token" in self.flags


def first_token_logprobs(top_logprobs: TopLogprobs) -> list[tuple[str, float]]:
    """The first generated position's top candidates as ``(token, logprob)`` pairs, from any of the shapes
    callers have at hand:

    - ``{"Yes": -0.1, "No": -2.4}``: token to log-probability for the first position;
    - ``[{"Yes": -0.1, ...}, {...}]``: one such mapping per generated position (the first is used);
    - ``[{"token": "Yes", "logprob": -0.1}, ...]``: OpenAI's ``top_logprobs`` entries for the first position.

    Pairs, not a dict: OpenAI may list the same text twice (two token ids that decode alike).

    >>> first_token_logprobs([{"token": "Yes", "logprob": -0.1, "bytes": [89]}, {"token": "No", "logprob": -2.4}])
    [('Yes', -0.1), ('No', -2.4)]
    >>> first_token_logprobs([{"Yes": -0.1}, {".": -0.01}]), first_token_logprobs([])
    ([('Yes', -0.1)], [])
    """
    if isinstance(top_logprobs, Mapping):
        return [(str(token), _logprob(lp)) for token, lp in top_logprobs.items()]
    if not top_logprobs:
        return []
    first = top_logprobs[0]
    if isinstance(first.get("token"), str):
        return [(str(entry["token"]), _logprob(entry.get("logprob"))) for entry in top_logprobs]
    return [(str(token), _logprob(lp)) for token, lp in first.items()]


def _logprob(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a log-probability must be a number, got {value!r}")
    return float(value)


def answer_key(token: str) -> str:
    """A token's text as an answer: case folded, surrounding whitespace and space markers removed.

    >>> answer_key(" Yes"), answer_key("YES\\n"), answer_key("\u2581yes")
    ('yes', 'yes', 'yes')
    """
    return token.strip().strip(_SPACE_MARKERS).strip().lower()


def logsumexp(values: Sequence[float]) -> float:
    """``log(sum(exp(v)))`` without overflow; ``-inf`` for no values.

    >>> round(logsumexp([math.log(0.2), math.log(0.3)]), 6) == round(math.log(0.5), 6)
    True
    """
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def yes_no_score(top_logprobs: TopLogprobs, margin: float = FLOOR_MARGIN) -> PointwiseScore:
    """``logprob(yes) - logprob(no)`` at the first generated token: the log-odds of relevance.

    Variants of an answer ("Yes", " yes", "YES") are one answer: their probabilities add up.

    >>> yes_no_score({"Yes": -0.1, "No": -2.4})
    PointwiseScore(score=2.3, flags=(), answer_mass=0.99...)
    >>> round(yes_no_score({"Yes": -0.5, " yes": -1.2, "No": -2.0}).score, 4)  # log(e^-0.5 + e^-1.2) + 2.0
    1.9032

    An absent answer is floored at the lowest listed log-probability minus ``margin`` (here -3.0 - 1.0):

    >>> yes_no_score({"No": -0.2, "Maybe": -3.0})
    PointwiseScore(score=-3.8, flags=('yes_absent',), answer_mass=0.81...)

    No answer token at all gives 0, even odds, flagged:

    >>> yes_no_score({"The": -0.3, "Passage": -1.5})
    PointwiseScore(score=0.0, flags=('no_answer_token',), answer_mass=0.0)
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (got {margin})")
    pairs = first_token_logprobs(top_logprobs)
    yes = [lp for token, lp in pairs if answer_key(token) == "yes"]
    no = [lp for token, lp in pairs if answer_key(token) == "no"]
    mass = sum(math.exp(lp) for lp in yes + no)
    if not yes and not no:
        return PointwiseScore(0.0, ("no_answer_token",), 0.0)
    floor = min(lp for _, lp in pairs) - margin
    flags = tuple(flag for flag, present in (("yes_absent", yes), ("no_absent", no)) if not present)
    lp_yes = logsumexp(yes) if yes else floor
    lp_no = logsumexp(no) if no else floor
    return PointwiseScore(round(lp_yes - lp_no, 12), flags, round(mass, 12))


def graded_score(top_logprobs: TopLogprobs, max_grade: int = MAX_GRADE) -> PointwiseScore:
    """The expected grade over "0".."max_grade", with the grades' probabilities renormalised to sum to 1.

    Grades absent from the top-k count as probability 0 (flagged ``missing_grades``). With no grade token at
    all the score is ``max_grade / 2``, the expectation under a uniform distribution: no information, as 0 is
    for ``yes_no_score``, rather than a spurious "irrelevant".

    >>> graded_score({"3": math.log(0.6), "2": math.log(0.3), "0": math.log(0.1)})
    PointwiseScore(score=2.4, flags=('missing_grades',), answer_mass=1.0)
    >>> round(graded_score({"1": -0.9, " 1": -2.3, "2": -1.2, "0": -3.0, "3": -4.0, "I": -2.5}).score, 3)  # "1" twice
    1.329
    >>> graded_score({"The": -0.1})
    PointwiseScore(score=1.5, flags=('no_answer_token',), answer_mass=0.0)
    """
    if max_grade < 1:
        raise ValueError(f"max_grade must be at least 1 (got {max_grade})")
    grades = {str(g): g for g in range(max_grade + 1)}
    by_grade: dict[int, list[float]] = {}
    for token, lp in first_token_logprobs(top_logprobs):
        grade = grades.get(answer_key(token))
        if grade is not None:
            by_grade.setdefault(grade, []).append(lp)
    if not by_grade:
        return PointwiseScore(max_grade / 2, ("no_answer_token",), 0.0)
    logp = {grade: logsumexp(lps) for grade, lps in by_grade.items()}
    top = max(logp.values())
    weights = {grade: math.exp(lp - top) for grade, lp in logp.items()}
    expected = sum(grade * w for grade, w in weights.items()) / sum(weights.values())
    flags = ("missing_grades",) if len(by_grade) <= max_grade else ()
    mass = sum(math.exp(lp) for lp in logp.values())
    return PointwiseScore(round(expected, 12), flags, round(mass, 12))


def teach(pool: Pool, client: CachedTeacher, teacher: TeacherConfig) -> TeachOutcome:
    """One call per (query, passage); the ranking follows the score (ties keep the first-stage order). A query
    is labelled only when all its pairs were scored (a budget stop may leave some without an answer)."""
    cfg = teacher.pointwise
    template = load_template(cfg.template)
    sampling = SamplingConfig(temperature=0.0, max_tokens=1, seed=teacher.sampling.seed, top_logprobs=cfg.top_logprobs)
    texts = pool.texts()
    batch = [
        pointwise_messages(template, texts[q], passage, cfg.max_words)
        for q, passage in zip(pool.candidates.query_id, pool.candidates.passage, strict=True)
    ]
    stopped = None
    try:
        client.complete_many(batch, sampling_override=sampling, desc="teacher (pointwise)")
    except BudgetExceeded as err:
        stopped = str(err)
    # Read the answers back from the cache: after a budget stop only some pairs have one.
    # (No answer is marked unusable: a greedy one-token answer without the answer token would be re-paid for nothing.)
    scorer = graded_score if cfg.template == "pointwise-graded" else yes_no_score
    scores: list[float | None] = []
    flags: Counter[str] = Counter()
    for messages in batch:
        record = client.cache.get(client.key(messages, sampling))
        if record is None:
            scores.append(None)
            continue
        scored = scorer(result_from_record(record, cached=True).logprobs or [{}])
        flags.update(scored.flags)
        scores.append(scored.score)
    candidates = pool.candidates.assign(score=scores)
    complete = candidates.groupby("query_id").score.transform(lambda s: s.notna().all())
    candidates = candidates[complete].sort_values(["query_id", "score", "rank"], ascending=[True, False, True])
    candidates["teacher_rank"] = candidates.groupby("query_id").cumcount() + 1
    stats = {
        "pairs": len(batch),
        "scored_pairs": int(sum(s is not None for s in scores)),
        "flags": dict(flags),
        "no_answer_token": flags.get("no_answer_token", 0),
        "template": f"{template.name}@v{template.version}",
    }
    return TeachOutcome(candidates[RANKING_COLUMNS].reset_index(drop=True), stats, stopped)
