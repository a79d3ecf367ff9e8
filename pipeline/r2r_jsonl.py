"""Reason-to-Rank's teacher files (``format: r2r-jsonl``): one query a line, its BM25 candidates with their texts,
the teacher's permutation of them and a direct reason, a comparative ("listwise") reason and an answer sentence for
every passage. Users of the R2R code (arXiv 2410.05168) have their GPT-4 labels in exactly this format::

    {"qid": "1185869", "query": "...", "sorted_docids": ["2968771", ...], "unsorted_docs": ["text", ...],
     "re_rank_id": [2, 4, 3, 5, 1], "scores": ["0", ...],
     "reason": {"ranked_passages": [{"identifier": 2, "direct_reason": "...", "listwise_reason": "...",
                                     "direct_answer_sentence": "..."}, ...]}}

``unsorted_docs`` are the candidates in the order the teacher saw them (BM25's), ``sorted_docids`` their ids in
that order, ``re_rank_id`` the teacher's permutation of the 1-based positions (best first), and each
``identifier`` a position. One file gives a whole collection (the passages are in it), the teacher's rankings
and its rationales: ``read_r2r_jsonl`` returns all of them, ``prepare`` writes the collection and ``teach``
(``teacher.imported``) the labels, from the same reading.

The real files' quirks are handled and counted (``R2RFile.quirks``), never silently merged:

- **placeholder ids**: the R2R code writes a position-like small number ("0", "2") when it lost a passage's id;
- **one id, several texts**: the same id with different passages in different queries;

a passage whose id is either gets its own id ``<qid>:<position>`` (its text is kept, and never merged with another
passage's); the others keep the file's id, so a passage shown for several queries is one corpus document.

- **string scores** (``"0"``, ``"1"``): parsed as numbers and kept as each label's ``score``;
- **no-answer sentences** ("Not applicable", "N/A", "None of the sentences ..."): the answer sentence is null.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.schemas import RATIONALE_ROW_COLUMNS

RANKINGS_COLUMNS = ["query_id", "doc_id", "teacher_rank", "score"]


class R2RFileError(ValueError):
    """An R2R teacher file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class R2RFile:
    """Everything one R2R teacher file holds, as the pipeline's columns.

    ``corpus`` (doc_id, title, text), ``queries`` (query_id, text), ``first_stage`` (query_id, doc_id, rank: the
    order the teacher saw), ``rankings`` (query_id, doc_id, teacher_rank, score), ``rationales``
    (``schemas.RATIONALE_ROW_COLUMNS``: a ``direct`` and a ``comparative`` row per passage), ``quirks`` (counts),
    ``sha256`` (the file's)."""

    corpus: pd.DataFrame
    queries: pd.DataFrame
    first_stage: pd.DataFrame
    rankings: pd.DataFrame
    rationales: pd.DataFrame
    quirks: dict[str, int] = field(default_factory=dict)
    sha256: str = ""


_NO_ANSWER = re.compile(r"^(n/?a|none|not applicable|no (direct )?answer\b.*|none of the\b.*)$")


def is_no_answer(sentence: str | None) -> bool:
    """Whether an answer sentence says there is none (the teacher's "Not applicable", "N/A", "None of the ...").

    >>> [is_no_answer(s) for s in ["Not applicable", "N/A.", "None of the sentences directly answer the query.",
    ...                            "", None, "Bees dance."]]
    [True, True, True, True, True, False]
    """
    if sentence is None:
        return True
    text = " ".join(sentence.lower().split()).strip(" .")
    return not text or bool(_NO_ANSWER.match(text))


def is_placeholder_id(doc_id: str, candidates: int) -> bool:
    """An id the R2R code wrote for a lost one: a small number no larger than the number of candidates.

    >>> is_placeholder_id("0", 5), is_placeholder_id("2", 5), is_placeholder_id("7306165", 5), is_placeholder_id("", 5)
    (True, True, False, True)
    """
    return not doc_id.strip() or (doc_id.isdigit() and int(doc_id) <= candidates)


def _field(record: dict, key: str, kind: type, where: str) -> object:
    if key not in record:
        raise R2RFileError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric query ids
    if not isinstance(value, kind):
        raise R2RFileError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _score(value: object, where: str) -> tuple[float, bool]:
    """(the number, whether it came as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise R2RFileError(f"{where}: score {value!r} is not a number")
    try:
        return float(value), isinstance(value, str)
    except ValueError:
        raise R2RFileError(f"{where}: score {value!r} is not a number") from None


@dataclass
class _Record:
    line_no: int
    query_id: str
    query: str
    ids: list[str]
    texts: list[str]
    order: list[int]  # 1-based positions, best first
    scores: list[float]
    reasons: dict[int, dict]  # position -> the ranked_passages entry


def _parse_line(record: dict, where: str, quirks: dict[str, int]) -> _Record:
    query_id = str(_field(record, "qid", str, where)).strip()
    if not query_id:
        raise R2RFileError(f"{where}: field 'qid' is empty")
    query = str(_field(record, "query", str, where))
    if not query.strip():
        raise R2RFileError(f"{where}: query {query_id} has an empty text")
    ids = [str(i) for i in _field(record, "sorted_docids", list, where)]  # type: ignore[union-attr]
    texts = list(_field(record, "unsorted_docs", list, where))  # type: ignore[arg-type]
    order = list(_field(record, "re_rank_id", list, where))  # type: ignore[arg-type]
    n = len(texts)
    if len(ids) != n or not n:
        raise R2RFileError(f"{where}: {len(ids)} sorted_docids for {n} unsorted_docs")
    if any(not isinstance(t, str) for t in texts):
        raise R2RFileError(f"{where}: every unsorted_docs entry must be a string")
    if sorted(order) != list(range(1, n + 1)):
        raise R2RFileError(f"{where}: re_rank_id {order} is not a permutation of 1..{n}")
    raw_scores = record.get("scores")
    if raw_scores is None:
        scores = [float("nan")] * n
    else:
        if not isinstance(raw_scores, list) or len(raw_scores) != n:
            raise R2RFileError(f"{where}: 'scores' must be a list of {n} values")
        parsed = [_score(s, where) for s in raw_scores]
        scores = [value for value, _ in parsed]
        quirks["string_scores"] += sum(as_string for _, as_string in parsed)
    entries = ((record.get("reason") or {}).get("ranked_passages")) or []
    if not isinstance(entries, list):
        raise R2RFileError(f"{where}: reason.ranked_passages must be a list")
    reasons: dict[int, dict] = {}
    for entry in entries:
        position = entry.get("identifier") if isinstance(entry, dict) else None
        if isinstance(position, str) and position.strip().isdigit():
            position = int(position)
        if not isinstance(position, int) or not 1 <= position <= n:
            raise R2RFileError(f"{where}: reason identifier {position!r} is not a position in 1..{n}")
        if position in reasons:
            quirks["duplicate_reasons"] += 1  # the first one is kept
            continue
        reasons[position] = entry
    quirks["passages_without_reasons"] += n - len(reasons)
    return _Record(0, query_id, query, ids, [str(t) for t in texts], [int(p) for p in order], scores, reasons)


def _text(entry: dict, key: str) -> str:
    value = entry.get(key)
    return value.strip() if isinstance(value, str) else ""


def read_r2r_jsonl(path: Path | str) -> R2RFile:
    """Read an R2R teacher file (see the module docstring); every error names the file and line.

    >>> import json, tempfile, os
    >>> line = {"qid": 7, "query": "bees", "sorted_docids": ["11", "0"], "unsorted_docs": ["Bees dance.", "Lava."],
    ...         "re_rank_id": [1, 2], "scores": ["1", "0"], "reason": {"ranked_passages": [
    ...         {"identifier": 1, "direct_reason": "About bees.", "listwise_reason": "Above 2.",
    ...          "direct_answer_sentence": "Bees dance."},
    ...         {"identifier": 2, "direct_reason": "Off topic.", "listwise_reason": "Below 1.",
    ...          "direct_answer_sentence": "N/A"}]}}
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False); _ = f.write(json.dumps(line)); f.close()
    >>> r2r = read_r2r_jsonl(f.name); os.unlink(f.name)
    >>> r2r.rankings.values.tolist()
    [['7', '11', 1, 1.0], ['7', '7:2', 2, 0.0]]
    >>> r2r.quirks["placeholder_ids"], r2r.quirks["string_scores"], r2r.quirks["no_answer_sentences"]
    (1, 2, 1)
    >>> r2r.rationales[["doc_id", "kind", "text", "answer_sentence"]].values.tolist()[:2]
    [['11', 'direct', 'About bees.', 'Bees dance.'], ['11', 'comparative', 'Above 2.', 'Bees dance.']]
    """
    path = Path(path)
    if not path.is_file():
        raise R2RFileError(f"{path}: R2R teacher file not found")
    from pipeline.sources import CollectionError, iter_jsonl

    quirks = dict.fromkeys(
        (
            "placeholder_ids",
            "ids_with_several_texts",
            "passages_renamed",
            "string_scores",
            "no_answer_sentences",
            "passages_without_reasons",
            "duplicate_reasons",
            "empty_reasons",
        ),
        0,
    )
    records: list[_Record] = []
    seen_queries: dict[str, int] = {}
    try:
        lines = list(iter_jsonl(path))
    except CollectionError as err:
        raise R2RFileError(str(err)) from None
    for line_no, record in lines:
        where = f"{path}:{line_no}"
        parsed = _parse_line(record, where, quirks)
        if parsed.query_id in seen_queries:
            raise R2RFileError(
                f"{where}: query {parsed.query_id} again (first on line {seen_queries[parsed.query_id]})"
            )
        seen_queries[parsed.query_id] = line_no
        parsed.line_no = line_no
        records.append(parsed)
    if not records:
        raise R2RFileError(f"{path}: no queries in the file")

    # ids the file gives more than one text: every occurrence is renamed (none is "the" right one)
    texts_of: dict[str, set[str]] = {}
    for rec in records:
        for doc_id, text in zip(rec.ids, rec.texts, strict=True):
            texts_of.setdefault(doc_id, set()).add(text)
    several = {doc_id for doc_id, texts in texts_of.items() if len(texts) > 1}
    quirks["ids_with_several_texts"] = len(several)

    corpus: dict[str, str] = {}
    first_rows, ranking_rows, rationale_rows = [], [], []
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for rec in records:
        n = len(rec.texts)
        doc_ids = []
        for position, (doc_id, text) in enumerate(zip(rec.ids, rec.texts, strict=True), start=1):
            placeholder = is_placeholder_id(doc_id, n)
            quirks["placeholder_ids"] += placeholder
            if placeholder or doc_id in several:
                quirks["passages_renamed"] += 1
                doc_id = f"{rec.query_id}:{position}"
            corpus.setdefault(doc_id, text)
            doc_ids.append(doc_id)
            first_rows.append((rec.query_id, doc_id, position))
        if len(set(doc_ids)) < n:
            raise R2RFileError(f"{path}:{rec.line_no}: query {rec.query_id} lists one passage twice ({doc_ids})")
        call_key = f"{digest[:12]}:{rec.line_no}"
        for teacher_rank, position in enumerate(rec.order, start=1):
            doc_id = doc_ids[position - 1]
            ranking_rows.append((rec.query_id, doc_id, teacher_rank, rec.scores[position - 1]))
            entry = rec.reasons.get(position)
            if entry is None:
                continue
            answer = _text(entry, "direct_answer_sentence")
            if is_no_answer(answer):
                quirks["no_answer_sentences"] += 1
                answer = None
            others = [d for d in doc_ids if d != doc_id]
            for kind, key in (("direct", "direct_reason"), ("comparative", "listwise_reason")):
                text = _text(entry, key)
                if not text:
                    quirks["empty_reasons"] += 1
                    continue
                rationale_rows.append((rec.query_id, doc_id, kind, text, answer, others, teacher_rank, "ok", call_key))
    return R2RFile(
        corpus=pd.DataFrame({"doc_id": list(corpus), "title": "", "text": list(corpus.values())}),
        queries=pd.DataFrame([(r.query_id, r.query) for r in records], columns=["query_id", "text"]),
        first_stage=pd.DataFrame(first_rows, columns=["query_id", "doc_id", "rank"]),
        rankings=pd.DataFrame(ranking_rows, columns=RANKINGS_COLUMNS),
        rationales=pd.DataFrame(rationale_rows, columns=RATIONALE_ROW_COLUMNS),
        quirks=quirks,
        sha256=digest,
    )
