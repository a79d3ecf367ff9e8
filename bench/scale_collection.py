"""The ``synthetic-scale`` source: a seeded BEIR-layout collection of N passages (N up to millions), for measuring
the pipeline at MS MARCO's size where no such collection is on this machine.

    .venv/bin/python bench/scale_collection.py --passages 1000000 --queries 20000 --seed 0 --out data/scale-1m

Text is drawn from a real corpus (default: TREC-DL 2019's 10,852 MS MARCO passages, so the lengths are MS MARCO's):

- every generated passage takes one seed passage's length (the real length histogram, exactly) and its words are
  a mixture: with probability ``alpha`` the next word of that seed passage (read on from a random offset, in order,
  so phrases and topical co-occurrence survive), else a word drawn from the seed corpus's unigram distribution
  (its whole vocabulary, Zipf tail included);
- query i has a known source passage: 2–4 of the passage's distinct content words (not among the ``STOP_RANKS``
  most frequent words), drawn with weight -log p(word) (rarer words are likelier, as in real keyword queries), plus
  0–2 noise words from the unigram distribution, shuffled. Its qrels row names the source passage, grade 1.

The first ``test_queries`` queries are the ``test`` split, the rest ``train``. ``subset_queries`` makes a collection
with fewer train queries over the same corpus (a symlink) without regenerating it: the same test split and the first
train queries, so that runs with 1K, 5K and 20K queries differ in nothing else.

Memory is constant in N: passages are generated in blocks of ``BLOCK`` from a per-block random stream
(``numpy`` ``default_rng([seed, 0, block])``) and written as they come; only the queries (O(number of queries))
are held. Everything is written into a temporary folder beside ``--out`` that is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.io import atomic_folder  # noqa: E402
from pipeline.sources import CollectionError, iter_jsonl  # noqa: E402

DEFAULT_SEED_CORPUS = REPO.parent / "shared" / "data" / "trec-dl-2019" / "corpus.jsonl"
BLOCK = 4096  # passages per random stream: large enough for numpy to vectorize, small enough to stay in cache
STOP_RANKS = 100  # the most frequent words are never a query's content words (they are "the", "of", "and" ...)
MANIFEST = "collection.json"
VERSION = 1  # bump when the generated text changes for the same arguments
_QUERY_STREAM = 1  # random-stream ids: 0 passages (per block), 1 queries (per query), 2 source choice
_SOURCE_STREAM = 2


class ScaleCollectionError(ValueError):
    """A bad argument or seed corpus; the message names the parameter or file."""


@dataclass(frozen=True)
class SeedModel:
    """What is fitted on the seed corpus: the vocabulary (most frequent first), its unigram CDF, and every seed
    passage's word ids (concatenated; passage k is ``tokens[offsets[k]:offsets[k + 1]]``)."""

    vocab: np.ndarray  # object array of str, by decreasing frequency
    cdf: np.ndarray  # float64, cumulative unigram probability of vocab[0..i]
    log_p: np.ndarray  # float64, log unigram probability of each word
    tokens: np.ndarray  # int32 word ids
    offsets: np.ndarray  # int64, len = seed passages + 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def fit_seed_model(texts: Sequence[str] | Iterator[str]) -> SeedModel:
    """Fit the unigram distribution and keep the passages' word sequences (whitespace words, case and punctuation
    as written: the pipeline's analyzers tokenize them as they would real text).

    >>> model = fit_seed_model(["the cat sat", "the dog", ""])
    >>> list(model.vocab), model.lengths.tolist(), round(float(model.cdf[-1]), 6)
    (['the', 'cat', 'sat', 'dog'], [3, 2], 1.0)
    """
    passages = [text.split() for text in texts]
    passages = [words for words in passages if words]  # an empty passage has no length to lend
    if not passages:
        raise ScaleCollectionError("seed corpus: no passage has any word")
    counts = Counter(word for words in passages for word in words)
    # by decreasing count, ties in first-seen order (Counter keeps insertion order): reproducible
    vocab = [word for word, _ in sorted(counts.items(), key=lambda item: -item[1])]
    index = {word: i for i, word in enumerate(vocab)}
    freq = np.array([counts[word] for word in vocab], dtype=np.float64)
    prob = freq / freq.sum()
    tokens = np.fromiter((index[w] for words in passages for w in words), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(words) for words in passages])]).astype(np.int64)
    return SeedModel(
        vocab=np.array(vocab, dtype=object), cdf=np.cumsum(prob), log_p=np.log(prob), tokens=tokens, offsets=offsets
    )


def read_seed_texts(paths: Sequence[Path]) -> Iterator[str]:
    """The ``title`` and ``text`` of every passage of BEIR ``corpus.jsonl`` files, one string each (read by the
    prepare stage's own reader: a malformed line is named by its file and number)."""
    for path in paths:
        if not Path(path).is_file():
            raise ScaleCollectionError(f"--seed-corpus {path}: file not found")
        try:
            for _, record in iter_jsonl(Path(path)):
                yield f"{record.get('title') or ''} {record.get('text') or ''}".strip()
        except CollectionError as err:
            raise ScaleCollectionError(f"--seed-corpus {err}") from None


def generate_block(model: SeedModel, seed: int, block: int, count: int, alpha: float) -> list[np.ndarray]:
    """The word ids of passages ``block * BLOCK`` .. ``+ count``: a pure function of its arguments.

    >>> model = fit_seed_model(["alpha beta gamma delta", "beta beta epsilon"])
    >>> a = generate_block(model, seed=0, block=0, count=3, alpha=0.5)
    >>> b = generate_block(model, seed=0, block=0, count=3, alpha=0.5)
    >>> len(a), all((x == y).all() for x, y in zip(a, b)), sorted({len(x) for x in a}) <= [3, 4]
    (3, True, True)
    """
    rng = np.random.default_rng([seed, 0, block])
    lengths_all = model.lengths
    source = rng.integers(len(lengths_all), size=count)
    lengths = lengths_all[source]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    total = int(lengths.sum())
    offset_in_seed = (rng.random(count) * lengths).astype(np.int64)  # where each passage starts reading its seed
    is_seed = rng.random(total) < alpha
    unigram = np.minimum(np.searchsorted(model.cdf, rng.random(total), side="right"), len(model.vocab) - 1)
    passage_of = np.repeat(np.arange(count), lengths)
    # k-th seed word of a passage = the seed's word at (offset + k) mod length: an exclusive running count per passage
    running = np.cumsum(is_seed) - is_seed
    k = running - running[starts][passage_of]
    seed_pos = model.offsets[source][passage_of] + (offset_in_seed[passage_of] + k) % lengths[passage_of]
    ids = np.where(is_seed, model.tokens[seed_pos], unigram).astype(np.int32)
    return np.split(ids, starts[1:])


def iter_passages(model: SeedModel, seed: int, passages: int, alpha: float) -> Iterator[np.ndarray]:
    """Every passage's word ids in order, one block in memory at a time."""
    for block in range(math.ceil(passages / BLOCK)):
        yield from generate_block(model, seed, block, min(BLOCK, passages - block * BLOCK), alpha)


def render(model: SeedModel, ids: np.ndarray) -> str:
    """The text of word ids.

    >>> render(fit_seed_model(["a b b"]), np.array([1, 0, 1]))
    'a b a'
    """
    return " ".join(model.vocab[ids])


def query_words(model: SeedModel, ids: np.ndarray, seed: int, query: int) -> np.ndarray:
    """Query ``query``'s word ids, made from its source passage's ``ids``: 2–4 distinct content words weighted by
    -log p, then 0–2 unigram noise words, shuffled. A pure function of its arguments.

    >>> model = fit_seed_model(["x y z w v"] + ["the"] * 200)
    >>> q = query_words(model, np.array([1, 2, 3, 4, 5]), seed=0, query=7)
    >>> bool((q == query_words(model, np.array([1, 2, 3, 4, 5]), seed=0, query=7)).all()), 2 <= len(q) <= 6
    (True, True)
    """
    rng = np.random.default_rng([seed, _QUERY_STREAM, query])
    distinct = np.unique(ids)
    content = distinct[distinct >= STOP_RANKS]
    if len(content) == 0:  # a passage of function words only: its rarest words stand in
        content = distinct
    weight = -model.log_p[content]
    take = min(len(content), int(rng.integers(2, 5)))
    chosen = rng.choice(content, size=take, replace=False, p=weight / weight.sum())
    noise = np.searchsorted(model.cdf, rng.random(int(rng.integers(0, 3))), side="right")
    words = np.concatenate([chosen, np.minimum(noise, len(model.vocab) - 1)]).astype(np.int32)
    rng.shuffle(words)
    return words


def choose_sources(seed: int, passages: int, queries: int) -> np.ndarray:
    """The source passage of each query: distinct passages, a seeded draw (memory O(queries)).

    >>> choose_sources(0, 10, 3).tolist() == choose_sources(0, 10, 3).tolist(), len(set(choose_sources(0, 10, 10)))
    (True, 10)
    """
    return np.random.default_rng([seed, _SOURCE_STREAM]).choice(passages, size=queries, replace=False)


def check_arguments(passages: int, queries: int, test_queries: int, alpha: float) -> None:
    """Bad sizes are refused with the option that is wrong.

    >>> try:
    ...     check_arguments(10, 5, 6, 0.5)
    ... except ScaleCollectionError as err:
    ...     print(err)
    --queries 5 + --test-queries 6: more queries than --passages 10 (each query has its own source passage)
    """
    if passages < 1:
        raise ScaleCollectionError(f"--passages {passages}: must be at least 1")
    if queries < 0 or test_queries < 0:
        raise ScaleCollectionError(f"--queries {queries} / --test-queries {test_queries}: must not be negative")
    if queries + test_queries > passages:
        raise ScaleCollectionError(
            f"--queries {queries} + --test-queries {test_queries}: more queries than --passages {passages} "
            "(each query has its own source passage)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ScaleCollectionError(f"--alpha {alpha}: must be within [0, 1]")


def split_of(query: int, test_queries: int) -> str:
    """The first ``test_queries`` queries are the test split.

    >>> split_of(0, 1000), split_of(1000, 1000)
    ('test', 'train')
    """
    return "test" if query < test_queries else "train"


def query_id(query: int) -> str:
    return f"q{query}"


def doc_id(passage: int) -> str:
    return str(passage)


def write_collection(
    out: Path,
    passages: int,
    queries: int,
    seed: int,
    seed_corpus: Sequence[Path] = (DEFAULT_SEED_CORPUS,),
    test_queries: int = 1000,
    alpha: float = 0.5,
) -> dict:
    """Write the BEIR folder ``out`` (which must not exist) and return its manifest (also ``collection.json``)."""
    check_arguments(passages, queries, test_queries, alpha)
    out = Path(out)
    if out.exists():
        raise ScaleCollectionError(f"--out {out}: already exists (remove it, or choose another folder)")
    model = fit_seed_model(read_seed_texts(seed_corpus))
    total_queries = queries + test_queries
    sources = choose_sources(seed, passages, total_queries)
    query_of = {int(p): q for q, p in enumerate(sources)}
    texts: dict[int, str] = {}
    words = 0
    with atomic_folder(out) as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as corpus:
            for passage, ids in enumerate(iter_passages(model, seed, passages, alpha)):
                words += len(ids)
                record = {"_id": doc_id(passage), "title": "", "text": render(model, ids)}
                corpus.write(json.dumps(record, ensure_ascii=False) + "\n")
                query = query_of.get(passage)
                if query is not None:
                    texts[query] = render(model, query_words(model, ids, seed, query))
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as handle:
            for query in range(total_queries):
                handle.write(json.dumps({"_id": query_id(query), "text": texts[query]}, ensure_ascii=False) + "\n")
        (tmp / "qrels").mkdir()
        for split in ("test", "train"):
            with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as handle:
                handle.write("query-id\tcorpus-id\tscore\n")
                for query in range(total_queries):
                    if split_of(query, test_queries) == split:
                        handle.write(f"{query_id(query)}\t{doc_id(int(sources[query]))}\t1\n")
        manifest = {
            "source": "synthetic-scale",
            "version": VERSION,
            "passages": passages,
            "train_queries": queries,
            "test_queries": test_queries,
            "seed": seed,
            "alpha": alpha,
            "seed_corpus": [str(Path(p).resolve()) for p in seed_corpus],
            "seed_passages": len(model.lengths),
            "vocabulary": len(model.vocab),
            "mean_words": round(words / passages, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def subset_queries(folder: Path, out: Path, train_queries: int) -> dict:
    """A collection over the same corpus (a symlink, not a copy) with the test split and the first
    ``train_queries`` train queries of ``folder`` (and their qrels)."""
    folder, out = Path(folder), Path(out)
    manifest = json.loads((folder / MANIFEST).read_text())
    if not 0 <= train_queries <= manifest["train_queries"]:
        raise ScaleCollectionError(
            f"train_queries {train_queries}: {folder} has {manifest['train_queries']} train queries"
        )
    if out.exists():
        raise ScaleCollectionError(f"{out}: already exists")
    keep = manifest["test_queries"] + train_queries  # queries are in order: test first, then train
    with atomic_folder(out) as tmp:
        os.symlink((folder / "corpus.jsonl").resolve(), tmp / "corpus.jsonl")
        with open(folder / "queries.jsonl", encoding="utf-8") as src, open(tmp / "queries.jsonl", "w") as dst:
            for line_no, line in enumerate(src):
                if line_no >= keep:
                    break
                dst.write(line)
        kept = {query_id(q) for q in range(keep)}
        (tmp / "qrels").mkdir()
        for split in ("test", "train"):
            with open(folder / "qrels" / f"{split}.tsv") as src, open(tmp / "qrels" / f"{split}.tsv", "w") as dst:
                for line_no, line in enumerate(src):
                    if line_no == 0 or line.split("\t", 1)[0] in kept:
                        dst.write(line)
        subset = {**manifest, "train_queries": train_queries, "subset_of": str(folder.resolve())}
        (tmp / MANIFEST).write_text(json.dumps(subset, indent=2) + "\n")
    return subset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, required=True, help="corpus size")
    parser.add_argument("--queries", type=int, required=True, help="train queries (each with its source passage)")
    parser.add_argument("--test-queries", type=int, default=1000, help="test queries (the first ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="share of words read on from the seed passage")
    parser.add_argument(
        "--seed-corpus", type=Path, action="append", help=f"BEIR corpus.jsonl to fit on (default {DEFAULT_SEED_CORPUS})"
    )
    parser.add_argument("--out", type=Path, required=True, help="the collection folder to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        manifest = write_collection(
            args.out,
            args.passages,
            args.queries,
            args.seed,
            seed_corpus=args.seed_corpus or [DEFAULT_SEED_CORPUS],
            test_queries=args.test_queries,
            alpha=args.alpha,
        )
    except ScaleCollectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
