"""Imported teacher labels: rankings a user already has, from TREC run files, rank_llm's JSON output, or
Reason-to-Rank's teacher files (``r2r-jsonl``: rankings *and* rationales, see ``pipeline.r2r_jsonl``).

Several files may be imported together (``teacher.imported.files``): each names its teacher and the first stage
it reranked, and every label keeps that provenance (``model``, ``first_stage``) with the file's sha256
(``template_hash``). Each (query, file) is one ranked list; a passage that several files rank is a label in
each of their lists, with each list's own rank (lists are never merged: ``build`` makes one group per list).

rank_llm writes its reranked requests as JSON (a list) or JSONL (one request a line), each
``{"query": {"text": ..., "qid": ...}, "candidates": [{"docid": ..., "score": ..., "doc": {...}}, ...]}`` with
the candidates in the reranked order. Errors name the file (and the line for JSONL and TREC).

``teach`` gives a pool's queries their imported labels (the same signature as the other methods: it calls no one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from pipeline.config import ImportedConfig
from pipeline.io import RunFormatError, read_trec_run
from pipeline.teacher.outcome import RATIONALE_COLUMNS, Pool, TeachOutcome

if TYPE_CHECKING:
    from pipeline.config import TeacherConfig
    from pipeline.teacher.client import CachedTeacher

# each imported label's provenance: its file's teacher, the first stage it reranked, the file's sha256
PROVENANCE_COLUMNS = ["model", "first_stage", "template_hash"]


class LabelsImportError(ValueError):
    """A labels file that cannot be imported; the message names the file and line."""


def file_hash(path: Path) -> str:
    """The sha256 of the file, the provenance recorded with imported labels (in the ``template_hash`` column)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rank_llm_requests(path: Path) -> list[tuple[int, dict]]:
    text = path.read_text(encoding="utf-8-sig")  # a byte order mark (some editors write one) is no JSON
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LabelsImportError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        return [(0, request) for request in data]
    requests = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise LabelsImportError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
    return requests


def read_rank_llm(path: Path) -> pd.DataFrame:
    """rank_llm output → (query_id, doc_id, teacher_rank, score), ranks from the candidates' order.

    >>> import tempfile, os
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    >>> _ = f.write('[{"query": {"qid": 7, "text": "q"}, "candidates": [{"docid": "b", "score": 2}, {"docid": "a"}]}]')
    >>> f.close(); read_rank_llm(Path(f.name)).values.tolist(); os.unlink(f.name)
    [['7', 'b', 1, 2.0], ['7', 'a', 2, nan]]
    """
    rows = []
    for line_no, request in _rank_llm_requests(path):
        where = f"{path}:{line_no}" if line_no else str(path)
        try:
            query_id = str(request["query"]["qid"])
            candidates = request["candidates"]
        except (KeyError, TypeError):
            raise LabelsImportError(f"{where}: expected {{'query': {{'qid': ...}}, 'candidates': [...]}}") from None
        seen: set[str] = set()
        for rank, candidate in enumerate(candidates, start=1):
            if not isinstance(candidate, dict) or "docid" not in candidate:
                raise LabelsImportError(f"{where}: query {query_id}: candidate {rank} has no 'docid'")
            doc_id = str(candidate["docid"])
            if doc_id in seen:
                raise LabelsImportError(f"{where}: query {query_id}: document {doc_id} is ranked twice")
            seen.add(doc_id)
            score = candidate.get("score")
            rows.append((query_id, doc_id, rank, float(score) if score is not None else float("nan")))
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "teacher_rank", "score"])


def read_trec_rankings(path: Path) -> pd.DataFrame:
    """A TREC run → (query_id, doc_id, teacher_rank, score); the order is by score (then rank), as trec_eval
    reads a run, and ranks are renumbered 1..n per query."""
    try:
        run = read_trec_run(path)
    except RunFormatError as err:
        raise LabelsImportError(str(err)) from None
    run = run.sort_values(["query_id", "score", "rank"], ascending=[True, False, True], kind="stable")
    run["teacher_rank"] = run.groupby("query_id").cumcount() + 1
    return run[["query_id", "doc_id", "teacher_rank", "score"]].reset_index(drop=True)


def import_rankings(
    path: Path | str, fmt: Literal["trec", "rank_llm-json", "r2r-jsonl"]
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, int]]:
    """One file's rankings (query_id, doc_id, teacher_rank, score), its rationales (R2R files, read by
    ``pipeline.r2r_jsonl``: ``schemas.RATIONALE_ROW_COLUMNS``; None for the others) and its quirks (R2R files:
    counts; empty for the others)."""
    from pipeline.r2r_jsonl import R2RFileError, read_r2r_jsonl

    path = Path(path)
    if not path.is_file():
        raise LabelsImportError(f"{path}: labels file not found (teacher.imported.files)")
    rationales, quirks = None, {}
    if fmt == "r2r-jsonl":
        try:
            r2r = read_r2r_jsonl(path)
        except R2RFileError as err:
            raise LabelsImportError(str(err)) from None
        rankings, rationales, quirks = r2r.rankings, r2r.rationales, r2r.quirks
    else:
        rankings = read_trec_rankings(path) if fmt == "trec" else read_rank_llm(path)
    if rankings.empty:
        raise LabelsImportError(f"{path}: no rankings in the file")
    return rankings, rationales, quirks


def list_name(teacher: str, first_stage: str | None) -> str:
    """The name of one ranked list's source: ``teacher@first_stage`` (just the teacher when the first stage is not
    known). Training groups, teacher runs and fidelity figures are named by it.

    >>> list_name("rank_vicuna-7b", "tas-b"), list_name("gpt-x", None)
    ('rank_vicuna-7b@tas-b', 'gpt-x')
    """
    return f"{teacher}@{first_stage}" if first_stage else teacher


@dataclass(frozen=True)
class ImportedLabels:
    """Every imported file's rankings and rationales (R2R files), each row with its file's provenance columns
    (``model`` = the file's teacher, ``template_hash`` = the file's sha256; rankings also ``first_stage``), and one
    summary per file (path, teacher, first stage, sha256, queries, rows; R2R files: rationales and quirks)."""

    rankings: pd.DataFrame
    rationales: pd.DataFrame | None
    files: list[dict]


def import_files(cfg: ImportedConfig) -> ImportedLabels:
    """Read every file of ``cfg`` (see ``ImportedLabels``)."""
    frames, reasons, summaries = [], [], []
    for file in cfg.files:
        rankings, rationales, quirks = import_rankings(file.path, file.format)
        digest = file_hash(Path(file.path))
        frames.append(rankings.assign(model=file.teacher, first_stage=file.first_stage, template_hash=digest))
        summary = {
            "path": file.path,
            "teacher": file.teacher,
            "first_stage": file.first_stage,
            "format": file.format,
            "sha256": digest,
            "queries": int(rankings.query_id.nunique()),
            "rows": len(rankings),
        }
        if rationales is not None:
            reasons.append(rationales.assign(model=file.teacher, template_hash=digest))
            summary.update(rationales=len(rationales), quirks=quirks)
        summaries.append(summary)
    if not frames:
        raise LabelsImportError("teacher.imported.files: no file to import")
    return ImportedLabels(
        pd.concat(frames, ignore_index=True), pd.concat(reasons, ignore_index=True) if reasons else None, summaries
    )


def rank_within_pool(rankings: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
    """The imported ranking restricted to each query's candidates; candidates it did not rank come last, in
    first-stage order (a reranker's output over the pool). Columns of ``rankings`` are kept; missing ones are
    null-scored.

    >>> r = pd.DataFrame({"query_id": "q", "doc_id": ["x", "b", "a"], "teacher_rank": [1, 2, 3], "score": [3., 2, 1]})
    >>> c = pd.DataFrame({"query_id": "q", "doc_id": ["a", "b", "c"], "rank": [1, 2, 3]})
    >>> rank_within_pool(r, c)[["doc_id", "teacher_rank"]].values.tolist()
    [['b', 1], ['a', 2], ['c', 3]]
    """
    merged = candidates[["query_id", "doc_id", "rank"]].merge(
        rankings.drop(columns=["rank"], errors="ignore"), on=["query_id", "doc_id"], how="left"
    )
    unranked = merged["teacher_rank"].isna()
    merged = merged.assign(_unranked=unranked).sort_values(
        ["query_id", "_unranked", "teacher_rank", "rank"], kind="stable"
    )
    merged["teacher_rank"] = merged.groupby("query_id", sort=False).cumcount() + 1
    # candidates the file did not rank carry its provenance too (one file at a time)
    for column in PROVENANCE_COLUMNS:
        if column in rankings and len(rankings):
            merged[column] = rankings[column].iloc[0]
    return merged.drop(columns=["rank", "_unranked"]).reset_index(drop=True)


def teach(pool: Pool, client: CachedTeacher | None, teacher: TeacherConfig) -> TeachOutcome:
    """Every imported file's rankings of the pool's queries (documents outside the pool are kept: they are labels),
    with each file's ``PROVENANCE_COLUMNS``, and an R2R file's rationales (with their file's model and
    template_hash). ``client`` is not used: imported labels make no call."""
    labels = import_files(teacher.imported)
    rankings, files = labels.rankings, labels.files
    wanted = set(pool.queries.query_id)
    covered = rankings[rankings.query_id.isin(wanted)]
    stats: dict = {"files": files, "queries_in_files": int(rankings.query_id.nunique()), "rows_in_files": len(rankings)}
    if teacher.imported.scope == "pool":
        covered = pd.concat(
            [rank_within_pool(frame, pool.candidates) for _, frame in covered.groupby("template_hash", sort=False)],
            ignore_index=True,
        )
        stats["scope"] = "pool"
    rationales = pd.DataFrame(columns=[*RATIONALE_COLUMNS, "model", "template_hash"])
    if labels.rationales is not None:
        rationales = labels.rationales[labels.rationales.query_id.isin(wanted)].reset_index(drop=True)
    for summary in files:
        mine = covered[covered.template_hash == summary["sha256"]]
        summary.update(sha256=summary["sha256"][:12], queries_labelled=int(mine.query_id.nunique()))
    return TeachOutcome(covered.reset_index(drop=True), stats, rationales=rationales)
