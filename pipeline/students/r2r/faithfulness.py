"""Faithfulness of an R2R student's reasons to the teacher's, measured on dev passages once training ends."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.students.r2r.model import PromptEncoder, R2RModel, generate_texts
from pipeline.students.r2r.reasons import (
    answer_support_rate,
    matching_form,
    mean_rouge_l,
    parse_reason_text,
    teacher_reasons,
    well_formed,
)

log = logging.getLogger(__name__)

FAITHFULNESS_EXAMPLES = 3  # generated/teacher reason pairs kept in the summary, for the report to quote
EXAMPLE_CHARS = 400  # each example text is kept whole up to this many characters


def faithfulness_sample(keys: Sequence[tuple[str, str]], cap: int | None, seed: int) -> list[tuple[str, str]]:
    """A seeded choice of at most ``cap`` distinct (query_id, doc_id) keys (None: all), in sorted order (so that
    the choice depends on the set of keys and the seed only, not on their order).

    >>> faithfulness_sample([("q2", "b"), ("q1", "a"), ("q2", "b")], cap=5, seed=0)
    [('q1', 'a'), ('q2', 'b')]
    >>> keys = [("q", f"d{i:02d}") for i in range(30)]
    >>> chosen = faithfulness_sample(keys, cap=24, seed=1)
    >>> len(chosen), chosen == sorted(chosen), chosen == faithfulness_sample(keys[::-1], cap=24, seed=1)
    (24, True, True)
    """
    ordered = sorted(set(keys))
    if cap is None or len(ordered) <= cap:
        return ordered
    index = np.random.default_rng(seed).choice(len(ordered), size=cap, replace=False)
    return [ordered[i] for i in sorted(index)]


def teacher_answer_support(rationales: pd.DataFrame | None, passages: dict[str, str]) -> tuple[float, int]:
    """(share of the teacher's answer sentences that occur in their passage, number of sentences measured).

    ``passages`` maps doc_id to passage text (one labels target is one collection, so doc ids are unique).
    Sentences are compared in ``reasons.matching_form`` (quotes, prefixes such as "The passage states:", case and
    punctuation do not count). Failed parses are skipped; a sentence repeated for the same passage counts once;
    sentences whose passage is unknown are left out (and logged). NaN when there is no sentence.

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q", "q"], "doc_id": ["d1", "d1", "d2", "d3"],
    ...     "answer_sentence": ["Bees dance.", "bees  DANCE.", "Lava flows.", None]})
    >>> teacher_answer_support(frame, {"d1": "Bees dance. They fly.", "d2": "Volcanoes erupt.", "d3": "x"})
    (0.5, 2)
    """
    if rationales is None or rationales.empty or "answer_sentence" not in rationales:
        return float("nan"), 0
    frame = rationales
    if "parse_status" in frame:
        frame = frame[frame["parse_status"] != "failed"]
    frame = frame[frame["answer_sentence"].fillna("").str.strip() != ""]
    sentences = {
        (str(q), str(d), matching_form(str(a)))
        for q, d, a in zip(frame.query_id, frame.doc_id, frame.answer_sentence, strict=True)
    }
    known = sorted(s for s in sentences if s[1] in passages)
    if len(known) < len(sentences):
        log.warning("%d teacher answer sentences have no passage in the examples", len(sentences) - len(known))
    if not known:
        return float("nan"), 0
    rate = answer_support_rate([a for _, _, a in known], [passages[d] for _, d, _ in known])
    return rate, len(known)


def _round(value: float) -> float | None:
    """JSON-safe rounding: NaN (no pairs to measure) becomes None (null)."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS]


def measure_faithfulness(
    model: R2RModel,
    encoder: PromptEncoder,
    examples: pd.DataFrame,
    rationales: pd.DataFrame | None,
    max_new_tokens: int,
    seed: int = 0,
    cap: int | None = 24,
    name: str = "r2r",
) -> dict[str, Any]:
    """How close the student's reasons are to the teacher's, on dev passages with teacher rationales.

    At most ``cap`` passages (``faithfulness_sample``; None: all) get greedy reasons (as ``explain``);
    ``rouge_l_direct`` / ``rouge_l_comparative`` are the mean ROUGE-L F1 against the teacher's reason of that
    kind (over the passages that have one); ``well_formed`` the share of passages whose explanation is well formed
    (``reasons.well_formed``: a direct reason, a comparative one of 3 words or more, generation stopped by itself);
    ``student_answer_support`` (when the student generates answer sentences) the share of its non-empty answer
    sentences found in their passage. ``teacher_answer_support`` is measured over all ``rationales``. Scores are
    rounded to 4 decimals; None where there is nothing to measure.
    """
    passages_by_doc = {str(d): str(p) for d, p in zip(examples["doc_id"], examples["passage"], strict=True)}
    support, sentences = teacher_answer_support(rationales, passages_by_doc)
    teacher = teacher_reasons(rationales)
    dev = examples[examples["split"] == "dev"].drop_duplicates(["query_id", "doc_id"])
    rows = {
        (str(q), str(d)): (str(query), str(passage))
        for q, d, query, passage in zip(dev.query_id, dev.doc_id, dev["query"], dev.passage, strict=True)
        if (str(q), str(d)) in teacher
    }
    chosen = faithfulness_sample(list(rows), cap, seed)
    result: dict[str, Any] = {
        "passages": len(chosen),
        "rouge_l_direct": None,
        "rouge_l_comparative": None,
        "well_formed": None,
        "student_answer_support": None,
        "student_answer_sentences": 0,
        "teacher_answer_support": _round(support),
        "teacher_answer_sentences": sentences,
        "answer_matching": "quotes, leading 'Answer:'/'The passage states:', case and punctuation ignored",
        "examples": [],
    }
    if not chosen:
        log.warning("students.%s: no dev passage has teacher rationales; reason faithfulness is not measured", name)
        return result
    log.info("students.%s: generating reasons for %d dev passages (faithfulness)", name, len(chosen))
    # one batched call over all queries: the sample spreads over many dev queries
    texts = generate_texts(model, encoder, [rows[k][0] for k in chosen], [rows[k][1] for k in chosen], max_new_tokens)
    generated = {k: parse_reason_text(text) for k, (text, _) in zip(chosen, texts, strict=True)}
    finished = {k: done for k, (_, done) in zip(chosen, texts, strict=True)}
    for kind in ("direct", "comparative"):
        pairs = [(generated[k][kind], teacher[k][kind]) for k in chosen if teacher[k].get(kind)]
        if pairs:
            result[f"rouge_l_{kind}"] = _round(mean_rouge_l([g for g, _ in pairs], [t for _, t in pairs]))
    result["well_formed"] = _round(float(np.mean([well_formed(generated[k], finished[k]) for k in chosen])))
    answers = [(generated[k]["answer"], rows[k][1]) for k in chosen if generated[k]["answer"].strip()]
    if answers:
        result["student_answer_support"] = _round(answer_support_rate([a for a, _ in answers], [p for _, p in answers]))
        result["student_answer_sentences"] = len(answers)
    result["examples"] = [
        {
            "query_id": k[0],
            "doc_id": k[1],
            "query": _clip(rows[k][0]),
            "student_direct": _clip(generated[k]["direct"]),
            "student_comparative": _clip(generated[k]["comparative"]),
            "student_answer": _clip(generated[k]["answer"]),
            "teacher_direct": _clip(teacher[k].get("direct", "")),
            "teacher_comparative": _clip(teacher[k].get("comparative", "")),
            "teacher_answer": _clip(teacher[k].get("answer", "")),
        }
        for k in chosen[:FAITHFULNESS_EXAMPLES]
    ]
    return result
