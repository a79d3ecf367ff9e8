"""Atomic writes and the few file formats the pipeline reads and writes (Parquet, TREC runs, JSON)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
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


class ParquetChunkWriter:
    """A Parquet table written chunk by chunk (each ``write`` appends one row group or more), atomically: the rows
    go to a temporary file beside ``path`` that replaces ``path`` only when the ``with`` block succeeds, so a
    failure mid-way leaves no partial table (and the previous one, if any, untouched). A block that writes nothing
    leaves an empty table with ``schema``.

    >>> import tempfile
    >>> schema = pa.schema([pa.field("query_id", pa.string()), pa.field("rank", pa.int32())])
    >>> path = Path(tempfile.mkdtemp()) / "t.parquet"
    >>> with ParquetChunkWriter(path, schema) as writer:
    ...     writer.write(pd.DataFrame({"query_id": ["q1"], "rank": [1]}))
    ...     writer.write(pd.DataFrame({"query_id": ["q2", "q2"], "rank": [1, 2]}))
    >>> read_table(path).values.tolist(), writer.rows, pq.ParquetFile(path).num_row_groups
    ([['q1', 1], ['q2', 1], ['q2', 2]], 3, 2)
    """

    def __init__(self, path: Path | str, schema: pa.Schema) -> None:
        self.path, self.schema, self.rows = Path(path), schema, 0
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetChunkWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = pq.ParquetWriter(tmp, self.schema, compression="zstd")
        return self

    def write(self, data: pd.DataFrame | pa.Table | pa.RecordBatch) -> None:
        """Append ``data`` (its columns in any order; missing ones are an error, as in ``write_table``)."""
        if self._writer is None:
            raise RuntimeError(f"{self.path}: write() outside the writer's with block")
        if isinstance(data, pd.DataFrame):
            table = to_arrow(data, self.schema)
        else:
            table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
            table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def __exit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.close()  # the footer is written even after a failure: the temporary file is deleted anyway
        self._writer = None
        self._stack.__exit__(*exc)


def copy_parquet(
    sources: Sequence[Path], writer: ParquetChunkWriter, sort_by_query: Collection[Path] = (), batch_rows: int = 65536
) -> None:
    """Append the rows of every file of ``sources`` to ``writer``, in order, a batch of ``batch_rows`` at a time
    (no file is read whole); a file in ``sort_by_query`` is copied sorted by (query_id, rank), out of core."""
    for source in sources:
        if source in sort_by_query:
            for batch in sorted_run_batches(source, batch_rows):
                writer.write(batch)
        else:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
                writer.write(batch)


def sorted_run_batches(
    source: Path | str, batch_rows: int = 65536, memory_limit: str = "1GB"
) -> Iterator[pa.RecordBatch]:
    """The rows of the Parquet file ``source`` sorted by (query_id, rank), as pandas' stable sort of a run gives
    them (DuckDB compares strings by code point, as Python does; a run lists a document once per query, so the
    order is total). DuckDB sorts out of core past ``memory_limit``."""
    import duckdb

    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": 1})
    try:
        # con.sql streams the result (con.execute(...).to_arrow_reader() would copy every row first)
        yield from con.sql(
            "SELECT * FROM read_parquet($path) ORDER BY query_id, rank", params={"path": str(source)}
        ).to_arrow_reader(batch_rows)
    finally:
        con.close()


def read_table(path: Path | str, schema: pa.Schema | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run?)")
    return pq.read_table(path, schema=schema).to_pandas()


def read_rows_in(
    path: Path | str,
    where: Mapping[str, Collection[str]],
    columns: Sequence[str] | None = None,
    batch_rows: int = 8192,
) -> pd.DataFrame:
    """The rows of the Parquet table at ``path`` whose every ``where`` column holds one of its values (only
    ``columns``; None: all), in file order, typed as ``read_table`` types them. The file is read a batch at a time
    and only the kept rows are held: ``pq.read_table(filters=...)`` reads ahead up to 16 batches of 128K rows,
    which for a table of every query's rows is most of it, so a stage reading one chunk of queries would hold
    them all. Small batches: a batch of long passages decoded is most of what a read holds.

    >>> import tempfile
    >>> path = write_table(pd.DataFrame({"query_id": ["q1", "q2", "q1"], "method": ["a", "a", "b"], "rank": [1, 1, 2]}),
    ...                    pa.schema([("query_id", pa.string()), ("method", pa.string()), ("rank", pa.int32())]),
    ...                    Path(tempfile.mkdtemp()) / "t.parquet")
    >>> read_rows_in(path, {"query_id": {"q1"}}, batch_rows=1).values.tolist()
    [['q1', 'a', 1], ['q1', 'b', 2]]
    >>> read_rows_in(path, {"query_id": ["q1", "q2"], "method": ["a"]}, columns=["rank"]).values.tolist()
    [[1], [1]]
    >>> read_rows_in(path, {"query_id": []}, columns=["rank"]).columns.tolist()
    ['rank']
    """
    import pyarrow.compute as pc

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run?)")
    # streamed: pre-buffering (pyarrow's default) reads a row group's whole column chunk first, 174 MB of text
    # for a 1M-passage corpus written as one row group; decoded on this thread: pyarrow's decoding threads leave
    # freed memory in their own malloc arenas, and a stage's peak crept up chunk after chunk (build: +19% from 1K
    # to 20K queries with them, +7% without)
    file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    full = file.schema_arrow
    wanted = {column: pa.array(sorted(values), type=full.field(column).type) for column, values in where.items()}
    read = None if columns is None else list(dict.fromkeys([*columns, *where]))
    kept = []
    for batch in file.iter_batches(batch_size=batch_rows, columns=read, use_threads=False):
        masks = [pc.is_in(batch.column(column), value_set=values) for column, values in wanted.items()]
        kept.append(batch.filter(functools.reduce(pc.and_, masks)) if masks else batch)
    schema = full if read is None else pa.schema([full.field(c) for c in read])
    table = pa.Table.from_batches(kept, schema=schema.with_metadata(full.metadata))
    return table.to_pandas()[list(columns) if columns is not None else table.column_names]


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
    return write_text(trec_lines(run.sort_values(["query_id", "rank"], kind="stable"), tag), path)


def trec_lines(run: pd.DataFrame, tag: str) -> str:
    r"""The TREC lines of ``run`` (query_id, doc_id, rank, score) in the row order given, scores with 6 decimals.

    >>> trec_lines(pd.DataFrame({"query_id": ["q"], "doc_id": ["d"], "rank": [1], "score": [0.5]}), "bm25")
    'q Q0 d 1 0.500000 bm25\n'
    """
    return "".join(
        f"{q} Q0 {d} {r} {s:.6f} {tag}\n"
        for q, d, r, s in zip(run.query_id, run.doc_id, run["rank"], run.score, strict=True)
    )


def write_trec_run_from_parquet(source: Path | str, path: Path | str, tag: str, batch_rows: int = 65536) -> Path:
    """``write_trec_run`` for a run too large to hold: the rows of the Parquet file ``source`` (query_id, doc_id,
    rank, score) in ``sorted_run_batches`` order, written a batch at a time, atomically: the lines
    ``write_trec_run`` writes, in the same order."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for batch in sorted_run_batches(source, batch_rows):
            out.write(trec_lines(batch.to_pandas(), tag))
    return Path(path)


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


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): its allocator is left as it is
        return None


def release_freed_memory() -> None:
    """Hand back to the OS the memory a finished chunk freed (its passages, prompts and rows): glibc keeps freed
    memory in its arenas and pyarrow's pool keeps its own, so without this the next chunk's rows land beside the
    last one's leftovers, and a stage's peak creeps up with the number of chunks rather than staying one chunk's.
    Costs milliseconds per chunk; with another C library than glibc only pyarrow's pool is released.

    >>> release_freed_memory()
    """
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
