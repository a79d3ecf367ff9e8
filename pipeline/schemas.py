"""Every Parquet table of the pipeline, declared once: its schema and where its files live.

Column names follow IR conventions (``query_id``, ``doc_id``, ``score``, ``rank``, ``relevance``). Tables that
exist once per collection carry a ``collection`` column too, so that DuckDB can union them into one view.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

CORPUS = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

QUERIES = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        # the qrels split(s) that judge the query ("test", "train", ...); "unjudged" when none does
        pa.field("split", pa.string(), nullable=False),
        # where the query comes from: "collection" for a collection's own queries; the synthesize stage's are
        # "cropped", "generated-llm", "generated-doc2query"
        pa.field("origin", pa.string(), nullable=False),
        # the corpus document a synthesized query was cropped from or generated for (null for a collection's own)
        pa.field("source_doc_id", pa.string(), nullable=True),
    ]
)

QRELS = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("relevance", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

# First-stage runs that a collection ships in runs/*.trec (e.g. TREC-DL 2019's bm25, splade-pp-ed).
SHIPPED_RUNS = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
    ]
)

EVAL_PER_QUERY = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("measure", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)

# The teacher's ranking of each query's candidates: one ranked list per (query_id, model, first_stage). ``score``:
# the pointwise score, the imported run's score, or null for listwise answers (only the order is known).
# ``model`` and ``method`` say which teacher; ``first_stage`` which first stage's candidates it ranked (the
# target's candidates for a live teacher; an imported file's own first stage, null when unknown);
# ``template_hash`` the prompt template's sha256, or an imported file's; ``run_id`` which run wrote the label.
TEACHER_RANKINGS = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("teacher_rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=True),
        pa.field("first_stage_rank", pa.int32(), nullable=True),
        pa.field("model", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("first_stage", pa.string(), nullable=True),
        pa.field("template_hash", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# One row per listwise window the teacher answered: what it covered, how its answer parsed, whether it was an
# identity permutation (the degenerate answer small models give), and how many calls it took.
TEACHER_WINDOWS = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("window_start", pa.int32(), nullable=False),
        pa.field("window_end", pa.int32(), nullable=False),
        pa.field("parse_status", pa.string(), nullable=False),  # ok | repaired | failed
        pa.field("missing_ids", pa.int32(), nullable=False),
        pa.field("duplicate_ids", pa.int32(), nullable=False),
        pa.field("out_of_range_ids", pa.int32(), nullable=False),
        pa.field("identity", pa.bool_(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


# Training examples built from teacher rankings: one group per (query, ranked list) (its candidates with that
# list's teacher rank) and TWOLAR's target 1/(teacher_rank + 1). ``collection`` is the teach target's name;
# ``split``: train | dev, at the query level (a dev query is dev in every list).
TRAINING_EXAMPLES = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        # the ranked list the example comes from (``teacher@first_stage``): one training group per (query, list)
        pa.field("list", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("passage", pa.string(), nullable=False),
        pa.field("teacher_rank", pa.int32(), nullable=False),
        pa.field("target", pa.float64(), nullable=False),
        pa.field("teacher_score", pa.float64(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
    ]
)

# Reason-to-Rank rationales: for each passage of a teacher window, a direct reason (how it addresses the query)
# and a comparative one (why it ranks above/below the others), with the answer sentence the teacher found.
RATIONALES = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # direct | comparative
        pa.field("text", pa.string(), nullable=False),
        pa.field("answer_sentence", pa.string(), nullable=True),
        pa.field("compared_doc_ids", pa.list_(pa.string()), nullable=False),
        pa.field("window_rank", pa.int32(), nullable=True),  # the passage's place in the teacher's window order
        pa.field("parse_status", pa.string(), nullable=False),  # ok | repaired | failed
        pa.field("model", pa.string(), nullable=False),
        pa.field("template_hash", pa.string(), nullable=False),
        pa.field("call_key", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# The columns a teacher method (or an imported R2R file) gives for each rationale row; the teach stage adds the
# collection, model, template hash and run id.
RATIONALE_ROW_COLUMNS = [f.name for f in RATIONALES if f.name not in {"collection", "model", "template_hash", "run_id"}]

# A student's reranking of an evaluation collection's first-stage run.
RERANKED = pa.schema(
    [
        pa.field("collection", pa.string(), nullable=False),
        pa.field("student", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("first_stage_rank", pa.int32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    """A table: its schema and the file name it has in its folder."""

    name: str
    schema: pa.Schema
    filename: str
    # "collection": one file per collection under paths.<folder>/<collection>/; "global": one file.
    scope: str
    folder: str  # the Paths attribute of the folder that holds it


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("corpus", CORPUS, "corpus.parquet", "collection", "collections"),
        TableSpec("queries", QUERIES, "queries.parquet", "collection", "collections"),
        TableSpec("qrels", QRELS, "qrels.parquet", "collection", "collections"),
        TableSpec("shipped_runs", SHIPPED_RUNS, "shipped_runs.parquet", "collection", "collections"),
        TableSpec("candidates", CANDIDATES, "candidates.parquet", "collection", "retrieval"),
        TableSpec("eval_per_query", EVAL_PER_QUERY, "per_query.parquet", "global", "evaluation"),
        TableSpec("teacher_rankings", TEACHER_RANKINGS, "teacher_rankings.parquet", "collection", "teacher"),
        TableSpec("teacher_windows", TEACHER_WINDOWS, "teacher_windows.parquet", "collection", "teacher"),
        TableSpec("rationales", RATIONALES, "rationales.parquet", "collection", "teacher"),
        # synthesized queries (same columns as queries) and their pools (same columns as candidates)
        TableSpec("synthetic_queries", QUERIES, "queries.parquet", "collection", "synthetic"),
        TableSpec("pool_candidates", CANDIDATES, "candidates.parquet", "collection", "pool"),
        TableSpec("training_examples", TRAINING_EXAMPLES, "examples.parquet", "collection", "training"),
        TableSpec("reranked", RERANKED, "reranked.parquet", "collection", "reranked"),
    )
}
