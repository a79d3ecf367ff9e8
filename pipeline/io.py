"""Atomic writes and the few file formats the pipeline reads and writes (Parquet, TREC runs, JSON)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A reader never sees a half-written file, and a failure leaves the previous file (if any) untouched. The file
    gets the mode a plain ``open`` gives (0666 less the umask: 0644 usually), not ``mkstemp``'s owner-only 0600:
    tables and metrics are shared artifacts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    # O_EXCL: a fresh file of our own (as mkstemp makes), with the mode the kernel derives from the umask
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert a DataFrame to ``schema`` exactly (column order, types); missing columns are an error."""
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ValueError(f"table is missing columns {missing} (schema: {schema.names})")
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def write_table(data: pd.DataFrame | pa.Table, schema: pa.Schema, path: Path | str) -> Path:
    """Write ``data`` as Parquet with ``schema``, atomically."""
    table = to_arrow(data, schema) if isinstance(data, pd.DataFrame) else data.cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_table(path: Path | str, schema: pa.Schema | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run?)")
    return pq.read_table(path, schema=schema).to_pandas()


def write_text(text: str, path: Path | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(obj: object, path: Path | str) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_trec_run(run: pd.DataFrame, path: Path | str, tag: str) -> Path:
    """Write a run (query_id, doc_id, rank, score) in TREC format, ``qid Q0 docid rank score tag``.

    Scores keep 6 decimals, as Anserini/pyserini write them, so runs compare line for line.
    """
    ordered = run.sort_values(["query_id", "rank"], kind="stable")
    lines = [
        f"{q} Q0 {d} {r} {s:.6f} {tag}\n"
        for q, d, r, s in zip(ordered.query_id, ordered.doc_id, ordered["rank"], ordered.score, strict=True)
    ]
    return write_text("".join(lines), path)


class RunFormatError(ValueError):
    pass


def read_trec_run(path: Path | str) -> pd.DataFrame:
    """Read a TREC run file into (query_id, doc_id, rank, score); errors name the file and line. A UTF-8 byte
    order mark is accepted."""
    path = Path(path)
    rows: list[tuple[str, str, int, float]] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise RunFormatError(
                    f"{path}:{line_no}: expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}"
                )
            qid, _, docid, rank, score, _ = parts
            try:
                rows.append((qid, docid, int(rank), float(score)))
            except ValueError:
                raise RunFormatError(f"{path}:{line_no}: rank must be an integer and score a number") from None
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "rank", "score"])
