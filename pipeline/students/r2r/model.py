"""The R2R model (a language model with a rank head and learned loss weights), its prompt encoding, collator,
loss, scoring and reason generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.students.backbones import BackboneError, Precision, autocast, forget_gguf_quantizer, resolve_backbone
from pipeline.students.groups import Group

WEIGHT_NAMES = ("rank", "pointwise", "generation")
MAX_QUERY_TOKENS = 64  # a query longer than this is cut, so that the passage keeps most of max_length
IGNORE = -100  # label of tokens without a loss (the transformers convention)


class R2RError(ValueError):
    """A problem with an R2R student's inputs (no training groups, unknown backbone, broken folder)."""


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


def listnet_kl(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """ListNet as KL(softmax(targets / temperature) || softmax(scores / temperature)) per group, averaged over groups
    ([groups, n] padded). Over 5 passages the targets 1/(rank+1) span 0.17..0.5, so at temperature 1 the teacher's
    distribution is almost uniform (a loss near 0 whatever the order); a temperature of 0.1 makes its top passage
    about 5 times as likely as its second. The scores share the temperature, so that ListNet and the pointwise MSE
    (scores against the same targets) agree on one score scale instead of pulling it apart.

    >>> s = torch.tensor([[2.0, 1.0, 0.0]]); m = torch.ones(1, 3, dtype=torch.bool)
    >>> round(float(listnet_kl(s, s, m)), 6)
    0.0
    >>> bool(listnet_kl(torch.tensor([[0.0, 1.0, 2.0]]), s, m) > 0)
    True
    >>> t = torch.tensor([[0.5, 0.33, 0.25]]); flat = torch.zeros(1, 3)  # a student that ranks nothing
    >>> round(float(listnet_kl(flat, t, m)), 4), round(float(listnet_kl(flat, t, m, temperature=0.1)), 4)
    (0.0056, 0.4559)
    >>> round(float(listnet_kl(t, t, m, temperature=0.1)), 6)  # scores on the targets' scale: no ListNet loss
    0.0
    """
    neg = torch.finfo(scores.dtype).min
    log_student = F.log_softmax((scores / temperature).masked_fill(~mask, neg), dim=-1)
    log_teacher = F.log_softmax((targets.to(scores.dtype) / temperature).masked_fill(~mask, neg), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).masked_fill(~mask, 0.0).sum(dim=-1)
    return kl.mean()


def multi_objective_loss(
    scores: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    generation: torch.Tensor | None,
    weights: torch.Tensor,
    learned: bool,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The R2R loss over padded groups ([groups, n]) and its parts (for logging).

    Learned weights add ``-log w`` per present term (see the module docstring); fixed ones do not.

    >>> s = torch.tensor([[0.5, 0.3]]); m = torch.ones(1, 2, dtype=torch.bool)
    >>> total, parts = multi_objective_loss(s, s, m, torch.tensor(2.0), torch.tensor([1.0, 1.0, 0.5]), False)
    >>> float(total), parts["loss_generation"], parts["weight_generation"]
    (1.0, 2.0, 0.5)
    """
    rank = listnet_kl(scores, targets, mask, temperature)
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


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class R2RCollator:
    """Query groups → one padded batch of all their passages (right padding), the reason labels, and the
    targets as a [groups, n] matrix with a mask."""

    encoder: PromptEncoder
    reasons: dict[tuple[str, str], str]  # (query_id, doc_id) -> the reason target (``reasons.reason_targets``)

    def __call__(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        pad = enc.tokenizer.pad_token_id
        inputs, labels, positions = [], [], []
        for group in groups:
            for doc_id, passage in zip(group.doc_ids, group.passages, strict=True):
                query, reason = group.query, self.reasons.get((group.query_id, doc_id))
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


def group_loss(
    model: R2RModel, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The multi-objective loss of one collated batch (``temperature``: ListNet's, on the teacher's targets)."""
    scores, generation = model(
        batch["input_ids"], batch["attention_mask"], rank_positions=batch["rank_positions"], labels=batch["labels"]
    )
    mask = batch["group_mask"]
    padded = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    padded[mask] = scores  # groups are laid out group-major, as the collator flattened them
    return multi_objective_loss(
        padded.float(), batch["targets"].float(), mask, generation, model.weights(), model.learn_weights, temperature
    )


def score_prompts(
    model: R2RModel,
    encoder: PromptEncoder,
    queries: Sequence[str],
    passages: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    precision: Precision = "fp32",
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
        with torch.inference_mode(), autocast(device, precision):
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


def generate_texts(
    model: R2RModel,
    encoder: PromptEncoder,
    query: str | Sequence[str],
    passages: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    precision: Precision = "fp32",
) -> list[tuple[str, bool]]:
    """Greedy generation after each passage's prompt: (the text, whether generation stopped by itself before
    ``max_new_tokens``); ``reasons.parse_reason_text`` splits a text into its direct, comparative and answer parts.
    ``query``: one query for all passages, or one per passage (batches then mix queries, e.g. for the
    faithfulness check)."""
    queries = [query] * len(passages) if isinstance(query, str) else list(query)
    if len(queries) != len(passages):
        raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
    tok = encoder.tokenizer
    device = next(model.parameters()).device
    backbone = model.backbone
    results: list[tuple[str, bool]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
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
                finished = (generated == tok.eos_token_id).any(dim=1).tolist()
                texts = tok.batch_decode(generated, skip_special_tokens=True)
                results.extend(zip(texts, finished, strict=True))
    finally:
        model.train(was_training)
    return results
