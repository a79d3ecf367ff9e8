"""Load a collection into the pipeline's tables: from a BEIR-layout folder or from an ir_datasets id.

BEIR layout::

    corpus.jsonl        {"_id": ..., "title": ..., "text": ...} one object a line
    queries.jsonl       {"_id": ..., "text": ...}
    qrels/<split>.tsv   query-id <TAB> corpus-id <TAB> score   (header optional, integer grades)
    runs/<name>.trec    optional first-stage runs in TREC format

Every problem is reported with the file and line it comes from, before anything is written. The JSONL and
TSV readers are hand-written (rather than ``pandas.read_json``) because a user fixing a 5-million-line corpus
needs the line number of the bad record, which the library readers do not give.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from tqdm import tqdm

from pipeline.io import RunFormatError, read_trec_run

log = logging.getLogger(__name__)

UNJUDGED = "unjudged"
COLLECTION_ORIGIN = "collection"
KNOWN_SPLITS = ("train", "dev", "validation", "test")


class CollectionError(ValueError):
    """Bad collection input; the message names the file and line."""


@dataclass(frozen=True)
class LoadedCollection:
    """The four tables of one collection, as DataFrames matching ``pipeline.schemas``."""

    name: str
    corpus: pd.DataFrame
    queries: pd.DataFrame
    qrels: pd.DataFrame
    shipped_runs: pd.DataFrame
    unknown_qrels: int  # qrels rows that name a query or document the collection lacks


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a malformed line raises with its number. A UTF-8 byte
    order mark (what some editors write) is accepted."""
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CollectionError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise CollectionError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def _string_field(record: dict, key: str, path: Path, line_no: int, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise CollectionError(f"{path}:{line_no}: missing required field {key!r}")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "_id":
        return str(value)  # numeric ids are common in exported collections
    if not isinstance(value, str):
        raise CollectionError(f"{path}:{line_no}: field {key!r} must be a string, got {type(value).__name__}")
    if required and key == "_id" and not value.strip():
        raise CollectionError(f"{path}:{line_no}: field '_id' is empty")
    return value


def read_beir_corpus(path: Path) -> pd.DataFrame:
    """Read ``corpus.jsonl`` into (doc_id, title, text)."""
    if not path.is_file():
        raise CollectionError(f"{path}: corpus file not found")
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for line_no, record in tqdm(iter_jsonl(path), desc=f"corpus {path.parent.name}", unit=" docs", leave=False):
        doc_id = _string_field(record, "_id", path, line_no, required=True)
        if doc_id in seen:
            raise CollectionError(f"{path}:{line_no}: duplicate _id {doc_id!r} (first on line {seen[doc_id]})")
        seen[doc_id] = line_no
        ids.append(doc_id)
        titles.append(_string_field(record, "title", path, line_no, required=False))
        texts.append(_string_field(record, "text", path, line_no, required=True))
    if not ids:
        raise CollectionError(f"{path}: the corpus is empty")
    return pd.DataFrame({"doc_id": ids, "title": titles, "text": texts})


def read_beir_queries(path: Path) -> pd.DataFrame:
    """Read ``queries.jsonl`` into (query_id, text)."""
    if not path.is_file():
        raise CollectionError(f"{path}: queries file not found")
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for line_no, record in iter_jsonl(path):
        query_id = _string_field(record, "_id", path, line_no, required=True)
        if query_id in seen:
            raise CollectionError(f"{path}:{line_no}: duplicate _id {query_id!r} (first on line {seen[query_id]})")
        seen[query_id] = line_no
        text = _string_field(record, "text", path, line_no, required=True)
        if not text.strip():  # it would be retrieved nothing and taught nothing, silently
            raise CollectionError(f"{path}:{line_no}: query {query_id!r} has an empty text")
        rows.append((query_id, text))
    if not rows:
        raise CollectionError(f"{path}: no queries")
    return pd.DataFrame(rows, columns=["query_id", "text"])


def read_beir_qrels(path: Path) -> pd.DataFrame:
    """Read ``qrels/<split>.tsv`` into (query_id, doc_id, relevance, split).

    The header line (``query-id corpus-id score``) is optional; a 4-column TREC qrels line
    (``qid 0 docid rel``) is accepted too, and so is a UTF-8 byte order mark (what some editors write).
    """
    split = path.stem
    rows: list[tuple[str, str, int]] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if line_no == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
                continue
            if len(parts) == 4:  # TREC qrels: qid iteration docid relevance
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise CollectionError(
                    f"{path}:{line_no}: expected 3 tab-separated fields 'query-id corpus-id score', got {len(parts)}"
                )
            query_id, doc_id, score = (p.strip() for p in parts)
            try:
                relevance = int(score)
            except ValueError:
                raise CollectionError(f"{path}:{line_no}: relevance score must be an integer, got {score!r}") from None
            rows.append((query_id, doc_id, relevance))
    frame = pd.DataFrame(rows, columns=["query_id", "doc_id", "relevance"])
    frame["split"] = split
    return frame


def assign_splits(queries: pd.DataFrame, qrels: pd.DataFrame) -> pd.Series:
    """The split of each query: the qrels split(s) that judge it, joined by ',' (else ``unjudged``).

    >>> q = pd.DataFrame({"query_id": ["1", "2", "3"]})
    >>> r = pd.DataFrame({"query_id": ["1", "2", "2"], "split": ["test", "train", "dev"]})
    >>> assign_splits(q, r).tolist()
    ['test', 'dev,train', 'unjudged']
    """
    by_query = qrels.groupby("query_id")["split"].agg(lambda s: ",".join(sorted(set(s))))
    return queries["query_id"].map(by_query).fillna(UNJUDGED).astype(str)


def check_unknown_qrels(
    qrels: pd.DataFrame,
    queries: pd.DataFrame,
    corpus: pd.DataFrame,
    on_unknown: Literal["warn", "drop", "fail"],
    where: str,
) -> tuple[pd.DataFrame, int]:
    """Count qrels rows naming a query or document the collection lacks; then warn and keep them, drop them,
    or fail.

    Keeping is the default because a reranking collection (TREC-DL's pooled passages) legitimately lacks
    judged documents that no first-stage run retrieved, and they still count in nDCG's ideal ranking:
    dropping them would inflate every figure.
    """
    known_query = qrels["query_id"].isin(set(queries["query_id"]))
    known_doc = qrels["doc_id"].isin(set(corpus["doc_id"]))
    known = known_query & known_doc
    unknown = int((~known).sum())
    if unknown:
        message = (
            f"{where}: {unknown} of {len(qrels)} qrels rows name unknown queries or documents "
            f"({int((~known_query).sum())} rows with an unknown query id, "
            f"{int((~known_doc).sum())} with an unknown doc id)"
        )
        if on_unknown == "fail":
            raise CollectionError(message + "; set prepare.on_unknown_qrels to 'warn' or 'drop' to go on")
        if on_unknown == "drop":
            log.warning("%s; dropped", message)
            return qrels[known].reset_index(drop=True), unknown
        log.warning("%s; kept (set prepare.on_unknown_qrels: drop to remove them)", message)
    return qrels, unknown


def empty_shipped_runs() -> pd.DataFrame:
    """The shipped-runs table of a collection that ships none."""
    return pd.DataFrame({"run": [], "query_id": [], "doc_id": [], "rank": [], "score": []})


def _with_collection(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame.assign(collection=name)


def load_beir_folder(
    folder: Path | str, name: str, on_unknown_qrels: Literal["warn", "drop", "fail"] = "warn"
) -> LoadedCollection:
    """Load a BEIR-layout folder; nothing is returned (or written) unless every file is valid."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CollectionError(f"{folder}: collection folder not found")
    corpus = read_beir_corpus(folder / "corpus.jsonl")
    queries = read_beir_queries(folder / "queries.jsonl")
    qrels_files = sorted((folder / "qrels").glob("*.tsv"))
    qrels = (
        pd.concat([read_beir_qrels(path) for path in qrels_files], ignore_index=True)
        if qrels_files
        else pd.DataFrame({"query_id": [], "doc_id": [], "relevance": [], "split": []})
    )
    qrels, unknown = check_unknown_qrels(qrels, queries, corpus, on_unknown_qrels, str(folder / "qrels"))
    queries = queries.assign(split=assign_splits(queries, qrels), origin=COLLECTION_ORIGIN, source_doc_id=None)
    runs = []
    for path in sorted((folder / "runs").glob("*.trec")):
        try:
            runs.append(read_trec_run(path).assign(run=path.stem))
        except RunFormatError as err:
            raise CollectionError(str(err)) from None
    shipped = pd.concat(runs, ignore_index=True) if runs else empty_shipped_runs()
    return LoadedCollection(
        name=name,
        corpus=_with_collection(corpus, name),
        queries=_with_collection(queries, name),
        qrels=_with_collection(qrels, name),
        shipped_runs=_with_collection(shipped, name),
        unknown_qrels=unknown,
    )


def load_r2r_file(path: Path | str, name: str) -> LoadedCollection:
    """A Reason-to-Rank teacher file as a collection: its passages (the corpus), its queries (split "train": R2R's
    files label training queries; ``build`` holds out a dev split), no qrels, and the order the teacher saw the
    candidates in as the shipped run "bm25" (score: minus the position). Its quirks are logged; the teach stage
    reports them with the labels."""
    from pipeline.r2r_jsonl import R2RFileError, read_r2r_jsonl

    try:
        r2r = read_r2r_jsonl(path)
    except R2RFileError as err:
        raise CollectionError(str(err)) from None
    quirks = {k: v for k, v in r2r.quirks.items() if v}
    if quirks:
        log.info("%s: R2R file quirks (handled): %s", path, quirks)
    queries = r2r.queries.assign(split="train", origin=COLLECTION_ORIGIN, source_doc_id=None)
    shipped = r2r.first_stage.assign(run="bm25", score=lambda f: -f["rank"].astype(float))
    qrels = pd.DataFrame({"query_id": [], "doc_id": [], "relevance": [], "split": []})
    return LoadedCollection(
        name=name,
        corpus=_with_collection(r2r.corpus, name),
        queries=_with_collection(queries, name),
        qrels=_with_collection(qrels, name),
        shipped_runs=_with_collection(shipped, name),
        unknown_qrels=0,
    )


def split_of_ir_datasets_id(dataset_id: str) -> str:
    """The qrels split an ir_datasets id names by its last component, else ``test``.

    >>> split_of_ir_datasets_id("beir/scifact/train"), split_of_ir_datasets_id("vaswani")
    ('train', 'test')
    """
    last = dataset_id.rstrip("/").rsplit("/", 1)[-1]
    return last if last in KNOWN_SPLITS else "test"


def _ir_dataset(dataset_id: str):  # -> ir_datasets.datasets.base.Dataset
    import ir_datasets

    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise CollectionError(f"ir_datasets: unknown dataset id {dataset_id!r}") from None


def load_ir_datasets(
    dataset_ids: list[str], name: str, on_unknown_qrels: Literal["warn", "drop", "fail"] = "warn"
) -> LoadedCollection:
    """Load one collection from ``ir_datasets`` ids that share a corpus (e.g. ``beir/scifact/train`` and
    ``beir/scifact/test``): documents from the first id, queries and qrels from each, the qrels split named
    by each id's last component. ir_datasets downloads the files on first use (this needs a network).

    Documents without a title get an empty one; the text is the document's ``text`` field, or its
    ``default_text()`` where it has none.
    """
    if not dataset_ids:
        raise CollectionError(f"ir_datasets.{name}.ids: give at least one ir_datasets id")
    first = _ir_dataset(dataset_ids[0])
    if not first.has_docs():
        raise CollectionError(f"ir_datasets:{dataset_ids[0]}: the dataset has no documents")
    docs = []
    for doc in tqdm(first.docs_iter(), desc=f"corpus {dataset_ids[0]}", unit=" docs", leave=False):
        title = getattr(doc, "title", "") or ""
        text = doc.text if hasattr(doc, "text") else doc.default_text()
        docs.append((str(doc.doc_id), title, text))
    corpus = pd.DataFrame(docs, columns=["doc_id", "title", "text"])
    if corpus.empty:
        raise CollectionError(f"ir_datasets:{dataset_ids[0]}: the corpus is empty")
    query_frames, qrels_frames = [], []
    for dataset_id in dataset_ids:
        dataset = _ir_dataset(dataset_id)
        if dataset.has_queries():
            query_frames.append(
                pd.DataFrame(
                    [
                        (str(q.query_id), q.text if hasattr(q, "text") else q.default_text())
                        for q in dataset.queries_iter()
                    ],
                    columns=["query_id", "text"],
                )
            )
        if dataset.has_qrels():
            qrels_frames.append(
                pd.DataFrame(
                    [(str(r.query_id), str(r.doc_id), int(r.relevance)) for r in dataset.qrels_iter()],
                    columns=["query_id", "doc_id", "relevance"],
                ).assign(split=split_of_ir_datasets_id(dataset_id))
            )
    if not query_frames:
        raise CollectionError(f"ir_datasets:{','.join(dataset_ids)}: no queries")
    queries = pd.concat(query_frames, ignore_index=True).drop_duplicates("query_id", ignore_index=True)
    qrels = (
        pd.concat(qrels_frames, ignore_index=True)
        if qrels_frames
        else pd.DataFrame({"query_id": [], "doc_id": [], "relevance": [], "split": []})
    )
    qrels, unknown = check_unknown_qrels(qrels, queries, corpus, on_unknown_qrels, f"ir_datasets:{name}")
    queries = queries.assign(split=assign_splits(queries, qrels), origin=COLLECTION_ORIGIN, source_doc_id=None)
    shipped = empty_shipped_runs()
    return LoadedCollection(
        name=name,
        corpus=_with_collection(corpus, name),
        queries=_with_collection(queries, name),
        qrels=_with_collection(qrels, name),
        shipped_runs=_with_collection(shipped, name),
        unknown_qrels=unknown,
    )


def write_beir_folder(collection: LoadedCollection, folder: Path | str) -> Path:
    """Write a collection as a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).

    Written into a temporary sibling folder and renamed into place, so a failed export leaves no
    half-written collection behind.
    """
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with (tmp / "corpus.jsonl").open("w", encoding="utf-8") as out:
            for doc_id, title, text in zip(
                collection.corpus.doc_id, collection.corpus.title, collection.corpus.text, strict=True
            ):
                out.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
        with (tmp / "queries.jsonl").open("w", encoding="utf-8") as out:
            for query_id, text in zip(collection.queries.query_id, collection.queries.text, strict=True):
                out.write(json.dumps({"_id": query_id, "text": text}, ensure_ascii=False) + "\n")
        (tmp / "qrels").mkdir()
        for split, rows in collection.qrels.groupby("split"):
            rows[["query_id", "doc_id", "relevance"]].rename(
                columns={"query_id": "query-id", "doc_id": "corpus-id", "relevance": "score"}
            ).to_csv(tmp / "qrels" / f"{split}.tsv", sep="\t", index=False)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def in_split(splits: pd.Series, split: str) -> pd.Series:
    """Which rows belong to ``split`` (a query judged in several splits has them joined by ',').

    >>> in_split(pd.Series(["test", "dev,train", "unjudged"]), "train").tolist()
    [False, True, False]
    """
    return splits.str.split(",").apply(lambda names: split in names)
