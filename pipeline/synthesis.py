"""Synthesized training queries for a collection with no human-labelled queries (TWOLAR, Baldelli et al. 2024).

TWOLAR trains on two kinds of synthetic queries: *cropped* sentences (a sentence, or a span of a few words, cut
from a corpus document) and *generated* queries (docT5query in the paper; here also an LLM teacher with an
InPars-style few-shot prompt). This module holds the pure parts (sentence splitting, cleaning, cropping,
parsing a generator's answer, the dev split) and the two generators behind one small protocol; the stage
``pipeline/stages/synthesize.py`` wires them to the corpus table, the teacher cache and the output table.

Every random choice is seeded, and the choice for one document depends only on (seed, doc_id, pass): asking
for more queries keeps the ones a smaller run produced (same ids, same texts), so the teacher cache and the
candidate pools of later stages keep serving them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import ConfigError, Doc2QueryConfig, SamplingConfig
from pipeline.teacher.templates import PromptTemplate, TemplateError

if TYPE_CHECKING:
    from pipeline.teacher.client import CachedTeacher

logger = logging.getLogger(__name__)

CROPPED = "cropped"
GENERATED_LLM = "generated-llm"
GENERATED_DOC2QUERY = "generated-doc2query"

# A document gives at most one cropped query per pass over the shuffled corpus; more passes let a small corpus
# give more queries than it has documents (each pass draws another sentence/span from a document).
MAX_CROP_PASSES = 3
# A generated query's length range in words (SynthesizeTarget has no field for it: min_words/max_words are the
# cropped spans'); outside it the answer is a refusal, an echo of the document or a fragment.
MIN_GENERATED_WORDS = 3
MAX_GENERATED_WORDS = 40
# Documents tried per wanted generated query before giving up (a rejected answer moves on to the next document).
GENERATION_TRIES_PER_QUERY = 3
# An LLM query needs a few dozen tokens; the teacher's own max_tokens (sized for rankings) is capped to this.
GENERATION_MAX_TOKENS = 48


@dataclasses.dataclass(frozen=True)
class SyntheticQuery:
    text: str
    source_doc_id: str


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# --- sentences --------------------------------------------------------------------------------------------------

# Hand-written rather than a library's: nltk's punkt needs its trained data (not installed offline here, and nltk
# is not a dependency of the project), and untrained Punkt splits after "et al.", "e.g." and "Fig.", the very
# abbreviations of scientific text. A boundary is sentence-final punctuation (with closing quotes/brackets),
# whitespace, then something that can start a sentence; the token before it must not be an abbreviation.
_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*\s+(?=["'\u201c\u2018(\[]?[A-Z0-9])""")
_INITIALISM = re.compile(r"^(?:[a-z]\.)+[a-z]$")  # u.s, e.g, i.e (the final dot is the boundary's)
ABBREVIATIONS = _word_set(
    "al approx ca cf co dr eq eqs et etc fig figs inc jr ltd mr mrs ms no nos p pp prof ref refs resp sr st vol vs"
)


def _is_abbreviation(token: str) -> bool:
    token = token.lstrip("\"'([").lower()
    return token in ABBREVIATIONS or (len(token) == 1 and token.isalpha()) or bool(_INITIALISM.match(token))


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences at ``.``/``!``/``?`` followed by a capital or a digit, not after an
    abbreviation (``et al.``, ``e.g.``, ``Fig.``, initials).

    >>> split_sentences("Smith et al. found that IL-6 rises (p < 0.05). The U.S. data, e.g. Fig. 2, agree! Why?")
    ['Smith et al. found that IL-6 rises (p < 0.05).', 'The U.S. data, e.g. Fig. 2, agree!', 'Why?']
    >>> split_sentences("It was 3.5 mg. Then 4 mg was given.  ")
    ['It was 3.5 mg.', 'Then 4 mg was given.']
    >>> split_sentences("")
    []
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()].split()
        if text[match.start()] == "." and before and _is_abbreviation(before[-1]):
            continue
        sentence = text[start : match.end()].strip()
        if sentence:
            sentences.append(sentence)
        start = match.end()
    tail = text[start:].strip()
    return [*sentences, tail] if tail else sentences


# --- cleaning and cropping --------------------------------------------------------------------------------------

_BRACKETED = re.compile(r"\s*(?:\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\})")
_STRAY_BRACKETS = re.compile(r"[()\[\]{}]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
# Words a cut may leave dangling at either end of a span ("... the effect of", "of the ..."). A sentence does not
# end in one, so the end is trimmed always; the start only when the span starts inside the sentence.
DANGLING_END = _word_set(
    "a about after also among an and are as at be because been before being between both but by can could "
    "did do does during each for from had has have he however if in into is it its may more most not of "
    "on or over per should since so such than that the their then there these they this those through "
    "thus to under upon very via was we were when where whether which while who whose will with within "
    "without would"
)
DANGLING_START = DANGLING_END - {"a", "an", "the", "this", "these", "those", "their", "its", "most", "more", "each"}
_EDGE_PUNCT = "\"'`\u201c\u201d\u2018\u2019,;:.!?-\u2013\u2014/"


def clean_text(text: str) -> str:
    """Drop bracketed asides (citations ``[12]``, ``(Smith et al., 2010)``, statistics ``(p < 0.05)``), stray
    brackets and extra whitespace.

    >>> clean_text("Tides [1, 2] are caused (mainly (see below)) by the moon .  ")
    'Tides are caused by the moon.'
    >>> clean_text("an unbalanced ( bracket]")
    'an unbalanced bracket'
    """
    previous = None
    while previous != text:  # innermost brackets first, so nested asides go too
        previous, text = text, _BRACKETED.sub("", text)
    text = _STRAY_BRACKETS.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def trim_words(words: Sequence[str], cut_start: bool = True) -> list[str]:
    """Strip edge punctuation and the function words a cut leaves dangling at the end (and at the start when
    ``cut_start``: the span begins inside its sentence).

    >>> trim_words(["of", "the", "moon", "pulls", "the", "oceans", "where", "it"])
    ['the', 'moon', 'pulls', 'the', 'oceans']
    >>> trim_words(["In", "winter", "penguins", "breed."], cut_start=False)
    ['In', 'winter', 'penguins', 'breed']
    >>> trim_words(["Tides,", "rise.", "--"])
    ['Tides,', 'rise']
    """
    out = list(words)
    while out:
        last = out[-1].rstrip(_EDGE_PUNCT)
        if not last or last.lower() in DANGLING_END:
            out.pop()
            continue
        out[-1] = last
        break
    while out:
        first = out[0].lstrip(_EDGE_PUNCT)
        if not first or (cut_start and first.lower() in DANGLING_START):
            out.pop(0)
            continue
        out[0] = first
        break
    return out


def crop_span(sentence: str, min_words: int, max_words: int, rng: random.Random) -> str | None:
    """The cleaned sentence if it has ``min_words``..``max_words`` words, else a random span of a random length
    in that range (cut at word boundaries, trimmed); None when too little is left.

    >>> crop_span("Ocean tides are caused mainly by the moon [3].", 3, 20, random.Random(0))
    'Ocean tides are caused mainly by the moon'
    >>> span = crop_span(" ".join(f"w{i}" for i in range(50)), 5, 8, random.Random(0))
    >>> 5 <= len(span.split()) <= 8
    True
    >>> crop_span("Too short.", 5, 8, random.Random(0)) is None
    True
    """
    words = clean_text(sentence).split()
    start = 0
    if len(words) > max_words:
        length = rng.randint(min_words, max_words)
        start = rng.randint(0, len(words) - length)
        words = words[start : start + length]
    words = trim_words(words, cut_start=start > 0)
    # at least half the words must hold a letter: a span of numbers and units is no query
    wordy = sum(any(ch.isalpha() for ch in word) for word in words)
    if len(words) < min_words or wordy < math.ceil(len(words) / 2):
        return None
    return " ".join(words)


def crop_document(text: str, min_words: int, max_words: int, key: str, attempt: int = 0) -> str | None:
    """One cropped query from a document: a sentence long enough to crop, then ``crop_span``. ``key`` seeds the
    choice (the seed and the doc id); successive ``attempt``s take the document's sentences in a seeded order,
    so they give different sentences while there are any.

    >>> text = "Short. Glaciers form where snow accumulates faster than it melts. Ice flows downhill slowly."
    >>> sorted(crop_document(text, 4, 20, "0:d9", attempt) for attempt in (0, 1))
    ['Glaciers form where snow accumulates faster than it melts', 'Ice flows downhill slowly']
    """
    sentences = [s for s in split_sentences(text) if len(clean_text(s).split()) >= min_words]
    if not sentences:
        return None
    # a string seed is hashed with SHA-512 by random.Random: stable across processes (PYTHONHASHSEED-proof)
    order = random.Random(key).sample(range(len(sentences)), len(sentences))
    return crop_span(
        sentences[order[attempt % len(sentences)]], min_words, max_words, random.Random(f"{key}:{attempt}")
    )


def query_key(text: str) -> str:
    """What two queries must differ in to count as different: case, whitespace and edge punctuation do not count.

    >>> query_key("  What causes   Tides? ") == query_key("what causes tides")
    True
    """
    return " ".join(text.casefold().split()).strip(_EDGE_PUNCT + " ")


def document_order(doc_ids: Sequence[str], seed: int, salt: str = "") -> list[int]:
    """A seeded order of documents (positions in ``doc_ids``), independent of the order they are given in.

    >>> ids, shuffled = ["a", "b", "c", "d"], ["c", "a", "d", "b"]
    >>> [ids[i] for i in document_order(ids, 0)] == [shuffled[i] for i in document_order(shuffled, 0)]
    True
    >>> sorted(document_order(ids, 0)), document_order(ids, 0) == document_order(ids, 0, salt="other")
    ([0, 1, 2, 3], False)
    """
    ranked = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i])
    offset = int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16) if salt else 0
    permutation = np.random.default_rng([seed, offset]).permutation(len(ranked))
    return [ranked[i] for i in permutation]


def crop_queries(
    corpus: pd.DataFrame, n: int, min_words: int, max_words: int, seed: int, seen: set[str] | None = None
) -> tuple[list[SyntheticQuery], Counter[str]]:
    """``n`` cropped queries from ``corpus`` (doc_id, text), at most one per document per pass, deduplicated
    against each other and ``seen`` (updated in place). Fewer, with a warning, when the corpus runs out.
    The second value counts rejected candidates by reason (``short``, ``duplicate``)."""
    seen = set() if seen is None else seen
    rejected: Counter[str] = Counter()
    out: list[SyntheticQuery] = []
    doc_ids, texts = corpus.doc_id.tolist(), corpus.text.tolist()
    order = document_order(doc_ids, seed, salt="crop")
    bar = tqdm(total=n, desc="cropped queries", unit=" queries", disable=n == 0)
    for attempt in range(MAX_CROP_PASSES):
        for index in order:
            if len(out) >= n:
                break
            query = crop_document(texts[index], min_words, max_words, f"{seed}:{doc_ids[index]}", attempt)
            if query is None:
                rejected["short"] += 1
                continue
            key = query_key(query)
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            out.append(SyntheticQuery(query, doc_ids[index]))
            bar.update(1)
        if len(out) >= n:
            break
    bar.close()
    if len(out) < n:
        logger.warning(
            "only %d of %d cropped queries: the corpus (%d documents, %d passes) has no more distinct sentences of "
            "%d+ words",
            len(out),
            n,
            len(doc_ids),
            MAX_CROP_PASSES,
            min_words,
        )
    return out, rejected


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` words of ``text``, whitespace collapsed.

    >>> truncate_words("a  b c d", 3)
    'a b c'
    """
    return " ".join(text.split()[:max_words])


# --- generated queries ------------------------------------------------------------------------------------------


class QueryGenerator(Protocol):
    """Writes one query per document. ``generate`` returns the raw answers, one per document, in order (""
    when there is none); ``parse_generated_query`` decides what is usable. ``stopped`` says why a generator
    stopped early (a teacher budget), None while it can go on."""

    origin: str
    stopped: str | None

    def generate(self, documents: list[tuple[str, str]]) -> list[str]: ...


_ANSWER_PREFIX = re.compile(
    r"^(?:\d+[.)]\s+|[-*\u2022]\s+)?(?:\*\*)?(?:(?:relevant|search|generated|example|new)\s+)?"
    r"(?:query|question)\s*\d*\s*(?:\*\*)?\s*[:\-\u2013]\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019*"


def parse_generated_query(
    answer: str, min_words: int = MIN_GENERATED_WORDS, max_words: int = MAX_GENERATED_WORDS
) -> tuple[str | None, str]:
    """The query in a generator's answer and ``"ok"``, or None and why not (``empty``, ``too_short``,
    ``too_long``): the first line with text once a ``Query:`` label, list marker and quotes are stripped.

    >>> parse_generated_query('Relevant query: "what causes ocean tides"\\nThe document explains ...')
    ('what causes ocean tides', 'ok')
    >>> parse_generated_query("Query:\\n  - how do bees communicate  ")
    ('how do bees communicate', 'ok')
    >>> parse_generated_query("**Query:** vaccines and the immune system")
    ('vaccines and the immune system', 'ok')
    >>> parse_generated_query("bees"), parse_generated_query("  "), parse_generated_query("x " * 50)[1]
    ((None, 'too_short'), (None, 'empty'), 'too_long')
    """
    for line in answer.splitlines():
        line = _ANSWER_PREFIX.sub("", line.strip())
        line = _LIST_MARKER.sub("", line).strip().strip(_QUOTES).strip()
        if line:
            query = " ".join(line.split())
            words = len(query.split())
            if words < min_words:
                return None, "too_short"
            if words > max_words:
                return None, "too_long"
            return query, "ok"
    return None, "empty"


def generate_queries(
    generator: QueryGenerator,
    documents: Sequence[tuple[str, str]],
    n: int,
    seen: set[str] | None = None,
    max_tries: int | None = None,
) -> tuple[list[SyntheticQuery], Counter[str]]:
    """Up to ``n`` usable, distinct queries from ``documents`` (doc_id, text) in order, one per document.

    Each round asks for as many documents as queries are still missing, so with good answers exactly ``n``
    documents are used; a rejected answer (counted by reason) moves on to the next document, up to
    ``max_tries`` documents in all (default ``GENERATION_TRIES_PER_QUERY * n``).

    >>> class Echo:
    ...     origin, stopped = "test", None
    ...     def generate(self, documents):
    ...         return [("query about " + text) if text != "bad" else "" for _, text in documents]
    >>> queries, rejected = generate_queries(Echo(), [("d1", "bad"), ("d2", "tides"), ("d3", "tides")], 1)
    >>> [(q.text, q.source_doc_id) for q in queries], dict(rejected)
    ([('query about tides', 'd2')], {'empty': 1})
    """
    seen = set() if seen is None else seen
    max_tries = GENERATION_TRIES_PER_QUERY * n if max_tries is None else max_tries
    pending = list(documents[:max_tries])
    rejected: Counter[str] = Counter()
    out: list[SyntheticQuery] = []
    while len(out) < n and pending and generator.stopped is None:
        batch, pending = pending[: n - len(out)], pending[n - len(out) :]
        for (doc_id, _), answer in zip(batch, generator.generate(batch), strict=True):
            query, status = parse_generated_query(answer)
            if query is None:
                rejected[status] += 1
                continue
            key = query_key(query)
            if key in seen:
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            out.append(SyntheticQuery(query, doc_id))
    if len(out) < n:
        why = generator.stopped or f"{sum(rejected.values())} answers rejected in {max_tries} documents tried"
        logger.warning("only %d of %d generated queries (%s)", len(out), n, why)
    return out, rejected


def inpars_messages(template: PromptTemplate, document: str) -> list[dict[str, str]]:
    """The chat messages of an InPars-style few-shot prompt: the system part, one user/assistant exchange per
    ``example_<i>_document``/``example_<i>_query`` pair (in order), then the document.

    >>> from pipeline.teacher.templates import load_template
    >>> messages = inpars_messages(load_template("inpars-query"), "Bees dance.")
    >>> [m["role"] for m in messages]
    ['system', 'user', 'assistant', 'user', 'assistant', 'user', 'assistant', 'user']
    >>> messages[-1]["content"]
    'Document: Bees dance.\\nRelevant query:'
    """
    parts = dict(template.parts)
    if "{passage}" not in template.part("user"):
        raise TemplateError(f"template {template.name!r}: part 'user' must hold the {{passage}} placeholder")
    messages = [{"role": "system", "content": template.part("system")}]
    i = 1
    while f"example_{i}_document" in parts:
        messages.append({"role": "user", "content": template.render("user", passage=parts[f"example_{i}_document"])})
        messages.append({"role": "assistant", "content": template.part(f"example_{i}_query")})
        i += 1
    messages.append({"role": "user", "content": template.render("user", passage=document)})
    return messages


def generation_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """The teacher's sampling for a query: its temperature and seed, no log-probabilities, few tokens.

    >>> generation_sampling(SamplingConfig(temperature=0.0, max_tokens=256, seed=0, top_logprobs=5)).as_dict()
    {'temperature': 0.0, 'max_tokens': 48, 'seed': 0}
    """
    return dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, GENERATION_MAX_TOKENS), top_logprobs=None)


class LlmQueryGenerator:
    """InPars-style generation through the cached teacher client: one call per document, concurrent up to the
    endpoint's ``max_concurrency``, each answer stored in the cache as it arrives. A budget stop keeps what
    was answered (read back from the cache) and sets ``stopped``."""

    origin = GENERATED_LLM

    def __init__(self, client: CachedTeacher, template: PromptTemplate, sampling: SamplingConfig) -> None:
        self.client = client
        self.template = template
        self.sampling = sampling
        self.stopped: str | None = None

    def generate(self, documents: list[tuple[str, str]]) -> list[str]:
        from pipeline.teacher.client import BudgetExceeded

        batch = [inpars_messages(self.template, text) for _, text in documents]
        try:
            return [r.text for r in self.client.complete_many(batch, self.sampling, desc="teacher (queries)")]
        except BudgetExceeded as err:
            self.stopped = str(err)
        answers = []
        for messages in batch:
            record = self.client.cache.get(self.client.key(messages, self.sampling))
            answers.append((record.response_text or "") if record is not None else "")
        return answers


class Doc2QueryGenerator:
    """docT5query (Nogueira & Lin 2019): a seq2seq model samples a query from the document with top-k sampling.

    ``parameter`` names the params.yaml key of the model, for the error when it cannot be loaded. Each batch is
    sampled under its own seed (``seed`` + the batch's number), so a run is reproducible on one device.
    """

    origin = GENERATED_DOC2QUERY

    def __init__(
        self, cfg: Doc2QueryConfig, seed: int, parameter: str = "doc2query.model", device: str | None = None
    ) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.cfg = cfg
        self.seed = seed
        self.stopped: str | None = None
        self._batches = 0
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model).to(self.device).eval()
        except (OSError, ValueError) as err:  # not found, not downloadable offline, not a seq2seq model
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"{parameter}: cannot load the doc2query model {cfg.model!r} ({reason}). No doc2query weights are "
                f"available offline here: point it at a local folder with a seq2seq model and its tokenizer, or "
                f"set generator: llm to generate queries with the teacher"
            ) from None

    def generate(self, documents: list[tuple[str, str]]) -> list[str]:
        import torch

        answers: list[str] = []
        starts = range(0, len(documents), self.cfg.batch_size)
        for start in tqdm(starts, desc="doc2query", unit=" batches", disable=len(starts) < 2):
            texts = [text for _, text in documents[start : start + self.cfg.batch_size]]
            encoded = self.tokenizer(
                texts, truncation=True, max_length=self.cfg.max_input_tokens, padding=True, return_tensors="pt"
            )
            # only what a seq2seq encoder takes (a BERT-style tokenizer adds token_type_ids)
            inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in encoded}
            with torch.inference_mode(), torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
                torch.manual_seed(self.seed + self._batches)
                output = self.model.generate(
                    **inputs, do_sample=True, top_k=self.cfg.top_k, max_new_tokens=self.cfg.max_new_tokens
                )
            self._batches += 1
            answers.extend(self.tokenizer.batch_decode(output, skip_special_tokens=True))
        return answers


# --- the table --------------------------------------------------------------------------------------------------


def dev_split(query_ids: Sequence[str], dev_fraction: float, seed: int) -> list[str]:
    """``"train"`` or ``"dev"`` per query: the ``round(dev_fraction * n)`` queries (at least 1 when
    ``dev_fraction`` > 0 and there are 2+ queries, never all) whose seeded hash of the id is smallest. A query
    keeps its split when others are added, as long as the dev count does not change much.

    >>> dev_split([f"q{i}" for i in range(10)], 0.2, seed=0).count("dev")
    2
    >>> dev_split(["a", "b"], 0.01, seed=0).count("dev"), dev_split(["a"], 0.5, seed=0), dev_split(["a", "b"], 0, 0)
    (1, ['train'], ['train', 'train'])
    """
    n = len(query_ids)
    dev = min(n - 1, max(1, round(dev_fraction * n))) if dev_fraction > 0 and n >= 2 else 0
    rank: Callable[[str], str] = lambda q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()  # noqa: E731
    chosen = set(sorted(query_ids, key=rank)[:dev])
    return ["dev" if q in chosen else "train" for q in query_ids]


def queries_frame(
    collection: str, cropped: list[SyntheticQuery], generated: list[SyntheticQuery], generated_origin: str
) -> pd.DataFrame:
    """The synthetic queries as rows of the QUERIES schema (split left to ``dev_split``): ``syn-c-<n>`` for the
    cropped, ``syn-g-<n>`` for the generated, numbered from 1 in the order they were made."""
    rows = [(f"syn-c-{i}", q.text, CROPPED, q.source_doc_id) for i, q in enumerate(cropped, start=1)]
    rows += [(f"syn-g-{i}", q.text, generated_origin, q.source_doc_id) for i, q in enumerate(generated, start=1)]
    frame = pd.DataFrame(rows, columns=["query_id", "text", "origin", "source_doc_id"])
    return frame.assign(collection=collection)
