"""Reason-to-Rank's reasons as text: the generation target, parsing what the student generates, and the pure
measures of faithfulness (ROUGE-L, well-formed explanations, answer sentences found in their passage)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd


def reason_text(direct: str | None, comparative: str | None, answer: str | None = None) -> str | None:
    """The generation target for one passage: ``Direct: … Comparative: …`` and, when given, `` Answer: …`` (the
    answer sentence; None when there is no reason).

    >>> reason_text("It names the waggle dance.", "Ranks above d2, which is about volcanoes.")
    'Direct: It names the waggle dance. Comparative: Ranks above d2, which is about volcanoes.'
    >>> reason_text("On bees.", "Above d2.", "Bees dance.")
    'Direct: On bees. Comparative: Above d2. Answer: Bees dance.'
    >>> reason_text("Only direct.", None), reason_text(None, "  "), reason_text(None, None, "x")
    ('Direct: Only direct.', None, None)
    """
    parts = []
    if direct and direct.strip():
        parts.append(f"Direct: {direct.strip()}")
    if comparative and comparative.strip():
        parts.append(f"Comparative: {comparative.strip()}")
    if parts and answer and answer.strip():
        parts.append(f"Answer: {answer.strip()}")
    return " ".join(parts) if parts else None


_MARKERS = re.compile(r"\b(direct|comparative|answer)\s*:", re.IGNORECASE)


def parse_reason_text(text: str) -> dict[str, str]:
    """Split a generated ``Direct: … Comparative: … Answer: …`` text into its parts (case and spacing tolerant;
    a part that is missing is ""). Text before any marker is the direct reason.

    >>> parse_reason_text(" Direct: about bees. Comparative: better than d2.")
    {'direct': 'about bees.', 'comparative': 'better than d2.', 'answer': ''}
    >>> parse_reason_text("direct : only this Answer: Bees dance.")
    {'direct': 'only this', 'comparative': '', 'answer': 'Bees dance.'}
    >>> parse_reason_text("no markers at all")
    {'direct': 'no markers at all', 'comparative': '', 'answer': ''}
    """
    parts = {"direct": "", "comparative": "", "answer": ""}
    matches = list(_MARKERS.finditer(text))
    head = text[: matches[0].start()] if matches else text
    if head.strip():
        parts["direct"] = head.strip()
    for i, match in enumerate(matches):
        following = matches[i + 1] if i + 1 < len(matches) else None
        kind = match.group(1).lower()
        body = text[match.end() : following.start() if following else len(text)].strip()
        if not parts[kind]:  # the first occurrence of a part counts
            parts[kind] = body
    return parts


def well_formed(parts: dict[str, str], finished: bool, min_words: int = 3) -> bool:
    """A generated explanation is well formed when its comparative reason has at least ``min_words`` words, its
    direct reason is not empty, and generation stopped by itself (not at the token limit).

    >>> well_formed({"direct": "On bees.", "comparative": "Ranks above d2."}, True)
    True
    >>> well_formed({"direct": "On bees.", "comparative": "Ranks above d2."}, False)
    False
    >>> well_formed({"direct": "On bees.", "comparative": ""}, True)
    False
    """
    return finished and bool(parts.get("direct", "").strip()) and len(parts.get("comparative", "").split()) >= min_words


def rouge_l_f1(generated: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge_score``, stemmed) of a generated reason against the teacher's.

    >>> rouge_l_f1("the passage explains the waggle dance", "the passage explains the waggle dance")
    1.0
    >>> round(rouge_l_f1("bees dance", "the passage explains the waggle dance of bees"), 3)
    0.2
    >>> rouge_l_f1("", "anything")
    0.0
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, generated)["rougeL"].fmeasure)


def mean_rouge_l(generated: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over aligned pairs (NaN for no pairs).

    >>> mean_rouge_l(["a b c", "x"], ["a b c", "y"])
    0.5
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reasons for {len(references)} references")
    if not generated:
        return float("nan")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references, strict=True)]))


_ANSWER_PREFIX = re.compile(
    r"^\s*(answer( sentence)?|the (passage|text|document) (states|says|mentions)( that)?|according to the passage,?)"
    r"\s*:?\s*",
    re.IGNORECASE,
)
_NON_WORD = re.compile(r"[^0-9a-z]+")


def matching_form(text: str) -> str:
    """The form in which an answer sentence is looked for in its passage: a leading "Answer:" / "The passage
    states:" dropped, then lower case with every run of characters other than ASCII letters and digits (straight
    and curly quotes, punctuation, ellipses, spacing) made one space.

    >>> matching_form('The passage states: \u201cHoney bees\u2019 dance...\u201d')
    'honey bees dance'
    >>> matching_form("Answer: Bees  DANCE.")
    'bees dance'
    """
    text = _ANSWER_PREFIX.sub("", text)
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def answer_sentence_in_passage(answer_sentence: str | None, passage: str) -> bool:
    """Whether an answer sentence occurs in the passage, compared in ``matching_form`` (quotes, prefixes such as
    "The passage states:", case, punctuation and spacing do not count).

    >>> answer_sentence_in_passage("Honey bees  COMMUNICATE", "Honey bees communicate the location of flowers.")
    True
    >>> answer_sentence_in_passage('The passage states: "honey bees communicate."', "Honey bees communicate.")
    True
    >>> answer_sentence_in_passage("bees sing", "Honey bees communicate."), answer_sentence_in_passage("", "x")
    (False, False)
    """
    if not answer_sentence or not answer_sentence.strip():
        return False
    needle = matching_form(answer_sentence)
    return bool(needle) and needle in matching_form(passage)


def answer_support_rate(answer_sentences: Sequence[str | None], passages: Sequence[str]) -> float:
    """The share of (non-empty) answer sentences that occur in their passage; NaN when there is none.

    >>> answer_support_rate(["bees communicate", "not there", None], ["Bees communicate.", "text", "text"])
    0.5
    >>> import math; math.isnan(answer_support_rate([None], ["x"]))
    True
    """
    pairs = [(a, p) for a, p in zip(answer_sentences, passages, strict=True) if a and a.strip()]
    if not pairs:
        return float("nan")
    return float(np.mean([answer_sentence_in_passage(a, p) for a, p in pairs]))


def teacher_reasons(rationales: pd.DataFrame | None) -> dict[tuple[str, str], dict[str, str]]:
    """(query_id, doc_id) → the teacher's reasons by kind (``{"direct": …, "comparative": …}``, only the kinds
    present; ``"answer"``: the answer sentence, when there is one), from the RATIONALES table. Failed parses and
    empty texts are skipped; when overlapping windows gave a passage several reasons of a kind, the one from the
    window where it ranked highest (lowest window_rank) is kept.

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q", "q"], "doc_id": ["d", "d", "e", "d"],
    ...     "kind": ["direct", "comparative", "direct", "direct"], "text": ["on topic", "above e", "", "later"],
    ...     "parse_status": ["ok", "ok", "ok", "ok"], "window_rank": [1, 1, 2, 3]})
    >>> teacher_reasons(frame)
    {('q', 'd'): {'direct': 'on topic', 'comparative': 'above e'}}
    """
    if rationales is None or rationales.empty:
        return {}
    frame = rationales
    if "parse_status" in frame:
        frame = frame[frame["parse_status"] != "failed"]
    frame = frame[frame["text"].fillna("").str.strip() != ""]
    if "window_rank" in frame:
        frame = frame.sort_values("window_rank", kind="stable", na_position="last")
    first = frame.drop_duplicates(["query_id", "doc_id", "kind"])
    answers = first["answer_sentence"] if "answer_sentence" in first else pd.Series(None, index=first.index)
    texts: dict[tuple[str, str], dict[str, str]] = {}
    for q, d, kind, text, answer in zip(first.query_id, first.doc_id, first.kind, first.text, answers, strict=True):
        reasons = texts.setdefault((str(q), str(d)), {})
        reasons[str(kind)] = str(text).strip()
        if isinstance(answer, str) and answer.strip() and "answer" not in reasons:
            reasons["answer"] = answer.strip()
    return texts


def reason_targets(rationales: pd.DataFrame | None, with_answer: bool = False) -> dict[tuple[str, str], str]:
    """(query_id, doc_id) → the ``Direct: … Comparative: …`` target (with ``Answer: …`` when ``with_answer`` and
    the teacher gave an answer sentence), from the RATIONALES table (the reasons of ``teacher_reasons``).

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q"], "doc_id": ["d", "d", "e"],
    ...     "kind": ["direct", "comparative", "direct"], "text": ["on topic", "above e", ""],
    ...     "answer_sentence": ["Bees dance.", "Bees dance.", None],
    ...     "parse_status": ["ok", "ok", "ok"], "window_rank": [1, 1, 2]})
    >>> reason_targets(frame)
    {('q', 'd'): 'Direct: on topic Comparative: above e'}
    >>> reason_targets(frame, with_answer=True)
    {('q', 'd'): 'Direct: on topic Comparative: above e Answer: Bees dance.'}
    """
    out = {}
    for key, kinds in teacher_reasons(rationales).items():
        target = reason_text(
            kinds.get("direct"), kinds.get("comparative"), kinds.get("answer") if with_answer else None
        )
        if target:
            out[key] = target
    return out
