"""Pointwise prompts and scores from first-token log-probabilities (no LLM)."""

from __future__ import annotations

import doctest
import math

import pytest

import pipeline.teacher.pointwise as pointwise
from pipeline.teacher.pointwise import (
    FLOOR_MARGIN,
    PointwiseScore,
    first_token_logprobs,
    graded_score,
    pointwise_messages,
    yes_no_score,
)
from pipeline.teacher.templates import TemplateError, load_template


def test_doctests() -> None:
    result = doctest.testmod(pointwise, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed"


# --- prompts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pointwise-yes-no", "pointwise-graded"])
def test_pointwise_messages(name: str) -> None:
    messages = pointwise_messages(load_template(name), "who wrote {x}", "one two\nthree four", max_words=3)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Query: who wrote {x}" in user  # braces in the query are text, not placeholders
    assert "Passage: one two three\n" in user and "four" not in user


def test_the_pointwise_instructions() -> None:
    yes_no = pointwise_messages(load_template("pointwise-yes-no"), "q", "p")[1]["content"]
    assert yes_no.endswith("Does the passage answer the query? Answer Yes or No.")
    graded = pointwise_messages(load_template("pointwise-graded"), "q", "p")[1]["content"]
    assert "0 = irrelevant" in graded and "3 = perfectly relevant" in graded
    assert "single digit" in graded


def test_pointwise_messages_refuse_a_listwise_template() -> None:
    with pytest.raises(TemplateError, match="not pointwise"):
        pointwise_messages(load_template("rankgpt-listwise"), "q", "p")


# --- input shapes -------------------------------------------------------------------------------------------


def test_first_token_logprobs_accepts_the_usual_shapes() -> None:
    expected = [("Yes", -0.1), ("No", -2.4)]
    assert first_token_logprobs({"Yes": -0.1, "No": -2.4}) == expected
    assert first_token_logprobs([{"Yes": -0.1, "No": -2.4}, {"!": -0.5}]) == expected
    openai_entries = [{"token": "Yes", "logprob": -0.1, "bytes": [89, 101, 115]}, {"token": "No", "logprob": -2.4}]
    assert first_token_logprobs(openai_entries) == expected
    assert first_token_logprobs([]) == [] and first_token_logprobs({}) == []


def test_every_shape_gives_the_same_score() -> None:
    as_dict = {"Yes": -0.1, "No": -2.4, "Maybe": -5.0}
    as_entries = [{"token": t, "logprob": lp} for t, lp in as_dict.items()]
    assert yes_no_score(as_dict) == yes_no_score([as_dict]) == yes_no_score(as_entries)


# --- yes / no -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "score", "flags"),
    [
        ({"Yes": -0.1, "No": -2.4}, 2.3, ()),
        ({"No": -0.05, "Yes": -3.0}, -2.95, ()),
        ({" yes": -0.7, "NO": -0.7}, 0.0, ()),  # case and whitespace do not matter
        ({"\u2581Yes": -1.0, "\u0120No": -2.0}, 1.0, ()),  # nor do token-piece space markers
        ({"Yes\n": -0.2, "no ": -1.9}, 1.7, ()),
        # variants of one answer add up: log(e^-1 + e^-1) = -1 + log 2
        ({"Yes": -1.0, "yes": -1.0, "No": -1.0}, math.log(2), ()),
        # one answer absent: floored at the lowest listed logprob minus the margin
        ({"Yes": -0.3, "Sure": -4.0}, -0.3 - (-4.0 - FLOOR_MARGIN), ("no_absent",)),
        ({"No": -0.2, "Maybe": -3.0}, (-3.0 - FLOOR_MARGIN) - -0.2, ("yes_absent",)),
        ({"Yes": -0.01}, FLOOR_MARGIN, ("no_absent",)),  # the only token listed is the answer itself
        # neither: no information
        ({"The": -0.3, "Passage": -1.5}, 0.0, ("no_answer_token",)),
        ({}, 0.0, ("no_answer_token",)),
        ({"Yesterday": -0.1, "Nope": -1.0}, 0.0, ("no_answer_token",)),  # whole-token match only
    ],
)
def test_yes_no_score(top: dict[str, float], score: float, flags: tuple[str, ...]) -> None:
    result = yes_no_score(top)
    assert result.score == pytest.approx(score)
    assert result.flags == flags
    assert result.degenerate == ("no_answer_token" in flags)


def test_yes_no_answer_mass_and_margin() -> None:
    result = yes_no_score({"Yes": math.log(0.5), "No": math.log(0.2), "Maybe": math.log(0.3)})
    assert result.answer_mass == pytest.approx(0.7)
    assert result.score == pytest.approx(math.log(0.5 / 0.2))
    assert yes_no_score({"Yes": -0.3, "Sure": -4.0}, margin=0.0).score == pytest.approx(3.7)
    with pytest.raises(ValueError, match="margin"):
        yes_no_score({"Yes": -0.3}, margin=-1.0)


def test_yes_no_score_orders_passages_by_relevance() -> None:
    sure = yes_no_score({"Yes": -0.01, "No": -5.0}).score
    unsure = yes_no_score({"Yes": -0.7, "No": -0.7}).score
    never = yes_no_score({"No": -0.01, "Yes": -6.0}).score
    assert sure > unsure > never


# --- graded -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "score", "flags"),
    [
        ({"3": 0.0}, 3.0, ("missing_grades",)),
        ({"0": math.log(0.25), "1": math.log(0.25), "2": math.log(0.25), "3": math.log(0.25)}, 1.5, ()),
        ({"3": math.log(0.6), "2": math.log(0.3), "0": math.log(0.1)}, 2.4, ("missing_grades",)),
        # renormalised: only the grades' share counts, whatever else the model wanted to say
        ({"2": math.log(0.1), "1": math.log(0.1), "The": math.log(0.8)}, 1.5, ("missing_grades",)),
        # variants add up ("1" and " 1"), and "10" is not a grade
        ({"1": math.log(0.25), " 1": math.log(0.25), "3": math.log(0.5), "10": -0.1}, 2.0, ("missing_grades",)),
        ({"The": -0.1}, 1.5, ("no_answer_token",)),
        ([], 1.5, ("no_answer_token",)),
    ],
)
def test_graded_score(top: dict[str, float], score: float, flags: tuple[str, ...]) -> None:
    result = graded_score(top)
    assert result.score == pytest.approx(score)
    assert result.flags == flags


def test_graded_score_on_another_scale() -> None:
    result = graded_score({"4": math.log(0.5), "0": math.log(0.5)}, max_grade=4)
    assert result == PointwiseScore(2.0, ("missing_grades",), 1.0)
    assert graded_score({"4": 0.0}, max_grade=3).degenerate  # 4 is not a grade on 0..3
    with pytest.raises(ValueError, match="max_grade"):
        graded_score({"1": 0.0}, max_grade=0)


def test_a_non_numeric_logprob_is_an_error() -> None:
    with pytest.raises(TypeError, match="must be a number"):
        yes_no_score([{"token": "Yes", "logprob": None}])
    with pytest.raises(TypeError, match="must be a number"):
        yes_no_score({"Yes": "-0.1"})
