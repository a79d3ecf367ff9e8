"""Reason-to-Rank's reasons as text: the generation target, parsing what the student generates, and the pure
measures of faithfulness (ROUGE-L, answer sentences found in their passage)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd


def reason_text(direct: str | None, comparative: str | None) -> str | None:
    """The generation target for one passage: ``Direct: … Comparative: …`` (None when there is no reason).

    >>> reason_text("It names the waggle dance.", "Ranks above d2, which is about volcanoes.")
    'Direct: It names the waggle dance. Comparative: Ranks above d2, which is about volcanoes.'
    >>> reason_text("Only direct.", None), reason_text(None, "  "), reason_text(None, None)
    ('Direct: Only direct.', None, None)
    """
    parts = []
    if direct and direct.strip():
        parts.append(f"Direct: {direct.strip()}")
    if comparative and comparative.strip():
        parts.append(f"Comparative: {comparative.strip()}")
    return " ".join(parts) if parts else None


_COMPARATIVE = re.compile(r"comparative\s*:", re.IGNORECASE)
_DIRECT = re.compile(r"^\s*direct\s*:", re.IGNORECASE)


def parse_reason_text(text: str) -> dict[str, str]:
    """Split a generated ``Direct: … Comparative: …`` text into its two reasons (case and spacing tolerant).

    >>> parse_reason_text(" Direct: about bees. Comparative: better than d2.")
    {'direct': 'about bees.', 'comparative': 'better than d2.'}
    >>> parse_reason_text("direct : only this")
    {'direct': 'only this', 'comparative': ''}
    >>> parse_reason_text("no markers at all")
    {'direct': 'no markers at all', 'comparative': ''}
    """
    head, _, tail = _split_comparative(text)
    return {"direct": _DIRECT.sub("", head).strip(), "comparative": tail.strip()}


def _split_comparative(text: str) -> tuple[str, str, str]:
    match = _COMPARATIVE.search(text)
    if match is None:
        return text, "", ""
    return text[: match.start()], match.group(0), text[match.end() :]


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


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def answer_sentence_in_passage(answer_sentence: str | None, passage: str) -> bool:
    """Whether the teacher's answer sentence occurs in the passage (case- and whitespace-insensitive substring).

    >>> answer_sentence_in_passage("Honey bees  COMMUNICATE", "Honey bees communicate the location of flowers.")
    True
    >>> answer_sentence_in_passage("bees sing", "Honey bees communicate."), answer_sentence_in_passage("", "x")
    (False, False)
    """
    if not answer_sentence or not answer_sentence.strip():
        return False
    return _normalise(answer_sentence) in _normalise(passage)


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
    present), from the RATIONALES table. Failed parses and empty texts are skipped; when overlapping windows gave
    a passage several reasons of a kind, the one from the window where it ranked highest (lowest window_rank) is
    kept.

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
    texts: dict[tuple[str, str], dict[str, str]] = {}
    for q, d, kind, text in zip(first.query_id, first.doc_id, first.kind, first.text, strict=True):
        texts.setdefault((str(q), str(d)), {})[str(kind)] = str(text).strip()
    return texts


def reason_targets(rationales: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(query_id, doc_id) → the ``Direct: … Comparative: …`` target, from the RATIONALES table (the reasons of
    ``teacher_reasons``).

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q"], "doc_id": ["d", "d", "e"],
    ...     "kind": ["direct", "comparative", "direct"], "text": ["on topic", "above e", ""],
    ...     "parse_status": ["ok", "ok", "ok"], "window_rank": [1, 1, 2]})
    >>> reason_targets(frame)
    {('q', 'd'): 'Direct: on topic Comparative: above e'}
    """
    out = {}
    for key, kinds in teacher_reasons(rationales).items():
        target = reason_text(kinds.get("direct"), kinds.get("comparative"))
        if target:
            out[key] = target
    return out
