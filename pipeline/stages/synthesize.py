"""synthesize: training queries for a collection with no human-labelled ones (TWOLAR) → ``queries.parquet`` in
``paths.synthetic/<name>`` and ``metrics/synthesize/<name>.json``.

Two kinds of queries, deduplicated across both (case and whitespace do not count):
- ``cropped``: a sentence, or a span of ``min_words``..``max_words`` words, cut from a sampled document;
- generated, one per sampled document: ``generated-llm`` (the teacher, with an InPars-style few-shot prompt,
  through the durable call cache in ``paths.teacher_cache/_synthesize/<name>``: a re-run pays for nothing) or
  ``generated-doc2query`` (a docT5query seq2seq model).

Query ids are ``syn-c-<n>`` and ``syn-g-<n>``; a seeded ``dev_fraction`` of the queries is the ``dev`` split.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline import schemas
from pipeline.config import ConfigError, Params, Paths, SynthesizeTarget, TeacherConfig
from pipeline.io import read_table, write_json, write_table
from pipeline.lucene import document_contents
from pipeline.synthesis import (
    CROPPED,
    Doc2QueryGenerator,
    LlmQueryGenerator,
    QueryGenerator,
    SyntheticQuery,
    crop_queries,
    dev_split,
    document_order,
    generate_queries,
    generation_sampling,
    queries_frame,
    query_key,
    truncate_words,
)

SYNTHESIZE_METRICS_FOLDER = "synthesize"
# The teacher's call cache for synthesis: beside the teach stage's per-collection folders, not inside one (the
# teach stage's folder is its own DVC output).
CACHE_FOLDER = "_synthesize"


def synthesize_cache_dir(paths: Paths, name: str) -> Path:
    """Where the generator's teacher calls are cached.

    >>> synthesize_cache_dir(Paths(teacher_cache="data/teacher_cache"), "scifact").as_posix()
    'data/teacher_cache/_synthesize/scifact'
    """
    return Path(paths.teacher_cache) / CACHE_FOLDER / name


def generation_documents(corpus: pd.DataFrame, avoid: set[str], seed: int, max_words: int) -> list[tuple[str, str]]:
    """The documents to generate queries for, in a seeded order, those in ``avoid`` (the cropped queries'
    sources) last; each is title + text cut to ``max_words`` words.

    >>> corpus = pd.DataFrame({"doc_id": ["d1", "d2"], "title": ["T", ""], "text": ["a b c", "x y"]})
    >>> generation_documents(corpus, {"d1"}, seed=0, max_words=2)
    [('d2', 'x y'), ('d1', 'T a')]
    """
    doc_ids = corpus.doc_id.tolist()
    order = document_order(doc_ids, seed, salt="generate")
    order = [i for i in order if doc_ids[i] not in avoid] + [i for i in order if doc_ids[i] in avoid]
    titles, texts = corpus.title.tolist(), corpus.text.tolist()
    return [(doc_ids[i], truncate_words(document_contents(titles[i], texts[i]), max_words)) for i in order]


def _mean_words(queries: list[SyntheticQuery]) -> float | None:
    return round(sum(len(q.text.split()) for q in queries) / len(queries), 2) if queries else None


def _split_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {str(split): int(count) for split, count in frame.split.value_counts().sort_index().items()}


def run(name: str, target: SynthesizeTarget, teacher: TeacherConfig, paths: Paths) -> dict:
    started = time.perf_counter()
    corpus_path = paths.collection_dir(name) / schemas.TABLES["corpus"].filename
    if not corpus_path.is_file():
        raise FileNotFoundError(f"{corpus_path}: corpus table not found (run `distillrank stage prepare {name}`)")
    corpus = read_table(corpus_path)
    if corpus.empty:
        raise ConfigError(f"synthesize.{name}: the corpus table {corpus_path} has no documents")

    seen: set[str] = set()
    cropped, crop_rejects = crop_queries(corpus, target.cropped, target.min_words, target.max_words, target.seed, seen)
    crop_seconds = time.perf_counter() - started

    generated: list[SyntheticQuery] = []
    generation_rejects: Counter[str] = Counter()
    generated_origin = f"generated-{target.generator}"
    generation: dict = {"generator": target.generator}
    generation_started = time.perf_counter()
    if target.generated > 0:
        documents = generation_documents(corpus, {q.source_doc_id for q in cropped}, target.seed, target.max_doc_words)
        if target.generator == "llm":
            if teacher.backend == "openai" and teacher.endpoint is None:
                raise ConfigError(
                    f"teacher.endpoint: synthesize.{name}.generator 'llm' with backend 'openai' needs an endpoint "
                    f"(or set synthesize.{name}.generator: doc2query)"
                )
            if teacher.backend == "replay":
                raise ConfigError(
                    f"teacher.backend: 'replay' answers listwise ranking prompts only, not synthesize.{name}'s query "
                    f"generation (set synthesize.{name}.generator: doc2query, or a backend that generates)"
                )
            from pipeline.teacher.cache import TeacherCache
            from pipeline.teacher.client import CachedTeacher
            from pipeline.teacher.embedded import SERVER_LOG_NAME
            from pipeline.teacher.endpoint import teacher_endpoint
            from pipeline.teacher.outcome import calls_summary
            from pipeline.teacher.templates import load_template

            template = load_template(target.template)
            sampling = generation_sampling(teacher.sampling)
            with contextlib.ExitStack() as stack:
                server_log = paths.synthetic_dir(name) / SERVER_LOG_NAME
                endpoint = stack.enter_context(teacher_endpoint(teacher, paths, server_log=server_log))
                cache = stack.enter_context(TeacherCache(synthesize_cache_dir(paths, name)))
                client = CachedTeacher(
                    endpoint,
                    sampling,
                    cache,
                    template.sha256,
                    budget=teacher.budget,
                    max_unusable_tries=teacher.max_unusable_tries,
                    breaker=teacher.breaker,
                )
                generator: QueryGenerator = LlmQueryGenerator(client, template, sampling)
                generated, generation_rejects = generate_queries(generator, documents, target.generated, seen)
                counters = client.counters
            generation.update(
                model=endpoint.model,
                template=template.ref,
                calls=calls_summary(counters),
                stopped_early=generator.stopped,
            )
        else:
            generator = Doc2QueryGenerator(
                target.doc2query, target.seed, parameter=f"synthesize.{name}.doc2query.model"
            )
            generated, generation_rejects = generate_queries(generator, documents, target.generated, seen)
            generation.update(model=target.doc2query.model, stopped_early=None)
    generation_seconds = time.perf_counter() - generation_started

    frame = queries_frame(name, cropped, generated, generated_origin)
    frame["split"] = dev_split(frame.query_id.tolist(), target.dev_fraction, target.seed)
    # the promise of this stage, checked where it is made: no empty query, no duplicate across both kinds
    assert frame.text.str.strip().ne("").all() and frame.text.map(query_key).is_unique
    spec = schemas.TABLES["synthetic_queries"]
    write_table(frame, spec.schema, paths.synthetic_dir(name) / spec.filename)

    counts = {str(origin): {"total": len(group), **_split_counts(group)} for origin, group in frame.groupby("origin")}
    summary = {
        "collection": name,
        "queries": len(frame),
        "requested": {CROPPED: target.cropped, generated_origin: target.generated},
        "by_origin": counts,
        "by_split": _split_counts(frame),
        "mean_words": {CROPPED: _mean_words(cropped), generated_origin: _mean_words(generated)},
        "rejected": {
            CROPPED: dict(sorted(crop_rejects.items())),
            generated_origin: dict(sorted(generation_rejects.items())),
        },
        "rejected_generations": sum(generation_rejects.values()),
        "generation": generation,
        "seconds": {
            "cropping": round(crop_seconds, 2),
            "generation": round(generation_seconds, 2),
            "per_generated_query": round(generation_seconds / len(generated), 2) if generated else None,
            "total": round(time.perf_counter() - started, 2),
        },
    }
    write_json(summary, Path(paths.metrics) / SYNTHESIZE_METRICS_FOLDER / f"{name}.json")
    return summary


def _body(params: Params, name: str | None) -> dict:
    assert name is not None
    if name not in params.synthesize:
        raise ConfigError(
            f"synthesize.{name}: not a synthesize target in params.yaml (targets: {sorted(params.synthesize)})"
        )
    return run(name, params.synthesize[name], params.teacher, params.paths)


def main(argv: list[str] | None = None) -> int:
    from pipeline.stages.common import stage_main

    return stage_main("synthesize", argv, _body, per_collection=True)


if __name__ == "__main__":
    sys.exit(main())
