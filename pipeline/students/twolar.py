"""TWOLAR's language-model students: a relevance score read from an LM's next-token logits.

- ``twolar-seq2seq``: a T5 / Flan-T5 (``AutoModelForSeq2SeqLM``) reads ``Query: {q} Document: {d} Relevant:``; the
  score is ``logit("true") - logit("false")`` at the first decoding step (TWOLAR, monoT5).
- ``twolar-causal``: a decoder-only LM (``AutoModelForCausalLM``) reads the same prompt; the score is
  ``logit(" true") - logit(" false")`` for the next token after the prompt.

They train on the shared LM trainer (``pipeline.students.trainer``); this module supplies the scorer, the
collator (one flat batch of a few query groups, with the targets as a [groups, candidates] matrix) and the loss
(``pipeline.students.losses``, on score tensors: sentence-transformers' losses are bound to a CrossEncoder's
own forward pass).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import StudentConfig
from pipeline.students import trainer
from pipeline.students.backbones import (
    BackboneError,
    Precision,
    autocast,
    choose_max_length,
    forget_gguf_quantizer,
    model_max_positions,
    pick_device,
    resolve_backbone,
    resolve_precision,
)
from pipeline.students.base import StudentLoadError, TrainResult
from pipeline.students.groups import Group
from pipeline.students.losses import get_loss

log = logging.getLogger(__name__)

PROMPT = "Query: {query} Document: {passage} Relevant:"
KINDS = ("twolar-seq2seq", "twolar-causal")
DEFAULT_MAX_LENGTH = 256
LENGTH_SAMPLE = 2000  # pairs tokenized to choose max_length from the data


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BOS for Llama, EOS for T5), found by
    comparing an encoding with and without them (works for any tokenizer without knowing its template)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []


def first_token_id(tokenizer: Any, word: str) -> int:
    """The id of the first token of ``word`` (" true" for a byte-level BPE, "true" for SentencePiece)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BackboneError(f"the tokenizer encodes {word!r} to no token")
    return int(ids[0])


class LMScorer:
    """A TWOLAR LM scorer: ``model`` (a Hugging Face LM) + ``tokenizer``, scored as true − false logits."""

    def __init__(
        self,
        kind: str,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int,
        backbone: str = "",
        prompt: str = PROMPT,
        true_token_id: int | None = None,
        false_token_id: int | None = None,
        device: str | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown TWOLAR student kind {kind!r} (known: {KINDS})")
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backbone = backbone
        self.prompt = prompt
        self.precision = precision
        if kind == "twolar-causal":
            # Left padding puts every prompt's last token at position -1; the pad token must exist to pad at all.
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        word = "true" if kind == "twolar-seq2seq" else " true"
        self.true_token_id = true_token_id if true_token_id is not None else first_token_id(tokenizer, word)
        self.false_token_id = (
            false_token_id if false_token_id is not None else first_token_id(tokenizer, word.replace("true", "false"))
        )
        if self.true_token_id == self.false_token_id:
            raise BackboneError("'true' and 'false' encode to the same first token")
        self._head, self._tail = _special_tokens(tokenizer)
        self.device = pick_device(device)
        self.model.to(self.device)

    # -- tokenization -------------------------------------------------------------------------------------------
    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> list[dict[str, list[int]]]:
        """One unpadded feature dict per pair, truncated to ``max_length`` (the passage is cut, never the prompt's
        ``Relevant:`` suffix)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        if not queries:
            return []
        head_q, tail_q = self.prompt.split("{query}")
        mid, tail = tail_q.split("{passage}")
        tok = self.tokenizer
        # Byte-level BPEs attach the space to the following word: " doc" and " Relevant:" keep it with them.
        prefixes = tok([f"{head_q}{q}{mid.rstrip()}" for q in queries], add_special_tokens=False)["input_ids"]
        docs = tok([" " + p.strip() for p in passages], add_special_tokens=False)["input_ids"]
        suffix = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        features = []
        for prefix, doc in zip(prefixes, docs, strict=True):
            room = self.max_length - len(self._head) - len(self._tail) - len(suffix)
            prefix = prefix[: max(room // 2, room - len(doc))]  # a very long query gives way too
            ids = self._head + prefix + doc[: max(room - len(prefix), 0)] + suffix + self._tail
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return features

    def collate(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad a batch of features (left for causal LMs) into tensors on the scorer's device."""
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    # -- scoring ------------------------------------------------------------------------------------------------
    def forward_scores(self, inputs: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Differentiable scores [B] of a collated batch (training calls it with the Trainer's wrapped model)."""
        model = model if model is not None else self.model
        if self.kind == "twolar-seq2seq":
            start = model.config.decoder_start_token_id
            if start is None:
                start = model.config.pad_token_id or 0
            decoder = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long, device=self.device)
            logits = model(**inputs, decoder_input_ids=decoder).logits[:, 0, :]
        else:
            mask = inputs["attention_mask"]
            logits = model(**inputs).logits
            # the last real token, whichever side the padding is on
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * positions).argmax(dim=-1)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return (logits[:, self.true_token_id] - logits[:, self.false_token_id]).float()

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        features = self.tokenize(queries, passages)
        # Sorting by length keeps padding small; the scores go back to the caller's order.
        order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
        scores = np.empty(len(features), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        starts = range(0, len(features), batch_size)
        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in tqdm(starts, desc=f"scoring ({self.kind})", unit=" batches", disable=not progress):
                index = order[start : start + batch_size]
                batch = self.collate([features[i] for i in index])
                scores[index] = self.forward_scores(batch).float().cpu().numpy()
        self.model.train(was_training)
        return scores

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, batch_size)

    # -- saving -------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The ``distillrank_student.json`` record."""
        return {
            "kind": self.kind,
            "backbone": self.backbone,
            "max_length": self.max_length,
            "prompt": self.prompt,
            "true_token_id": self.true_token_id,
            "false_token_id": self.false_token_id,
            "precision": self.precision,
        }

    def save(self, folder: Path | str) -> dict[str, Any]:
        """Hugging Face folder (safetensors + tokenizer); returns the info record."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.model_max_length = self.max_length
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        return self.info()


def _auto_class(kind: str) -> Any:
    import transformers

    return {
        "twolar-seq2seq": transformers.AutoModelForSeq2SeqLM,
        "twolar-causal": transformers.AutoModelForCausalLM,
    }[kind]


def build_scorer(
    kind: str, backbone: str, max_length: int, device: str | None = None, precision: Precision = "fp32"
) -> LMScorer:
    """A fresh scorer from a backbone (its LM head reads true/false from the start)."""
    from transformers import AutoTokenizer

    if kind not in KINDS:
        raise BackboneError(f"kind {kind!r} is not a TWOLAR LM kind ({KINDS})")
    path, extra = resolve_backbone(backbone)
    started = time.perf_counter()
    kwargs: dict[str, Any] = dict(extra)
    if extra.get("gguf_file"):
        kwargs["dtype"] = torch.float32  # dequantized on load: train and save in fp32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = _auto_class(kind).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise BackboneError(f"backbone {backbone!r} ({path}) cannot be loaded as a {kind}: {err}") from err
    if extra.get("gguf_file"):
        forget_gguf_quantizer(model)
    log.info("loaded %s backbone %s in %.1f s", kind, backbone, time.perf_counter() - started)
    return LMScorer(kind, model, tokenizer, max_length, backbone=backbone, device=device, precision=precision)


class TwolarKind:
    """``trainer.LMKind`` for the TWOLAR scorers: groups → one flat batch of prompts with a [groups, n] target
    matrix and mask; the loss is ``students.<name>.loss`` over the groups' scores."""

    def __init__(self, scorer: LMScorer, loss: str) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.tokenizer = scorer.tokenizer
        self.device = scorer.device
        self.loss_fn = get_loss(loss)

    def collate(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        queries = [g.query for g in groups for _ in g.passages]
        passages = [p for g in groups for p in g.passages]
        width = max(len(g.targets) for g in groups)
        target = torch.zeros(len(groups), width, dtype=torch.float32)
        mask = torch.zeros(len(groups), width, dtype=torch.bool)
        for row, group in enumerate(groups):
            target[row, : len(group.targets)] = torch.tensor(group.targets)
            mask[row, : len(group.targets)] = True
        batch = self.tokenizer.pad(self.scorer.tokenize(queries, passages), padding=True, return_tensors="pt")
        return {**batch, "targets": target, "mask": mask}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v for k, v in batch.items() if k not in {"targets", "mask"}}
        flat = self.scorer.forward_scores(inputs, model)
        mask = batch["mask"]
        scores = flat.new_zeros(mask.shape)
        scores[mask] = flat  # groups are laid out one after the other, as the collator flattened them
        return self.loss_fn(scores, batch["targets"].to(scores.device), mask.to(scores.device)), {}

    def student(self) -> LMScorer:
        return self.scorer

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        return []


def train(
    name: str,
    cfg: StudentConfig,
    examples: pd.DataFrame,
    rationales: pd.DataFrame | None,
    out_dir: Path,
    checkpoint_dir: Path,
    callbacks: list[Any] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train a TWOLAR LM scorer on the shared trainer and save it to ``out_dir``."""
    precision = resolve_precision(cfg.precision, pick_device(device))
    scorer = build_scorer(cfg.kind, cfg.init_from or cfg.backbone, DEFAULT_MAX_LENGTH, device, precision)
    if cfg.max_length == "auto":
        sample = examples.drop_duplicates(["query", "passage"]).head(LENGTH_SAMPLE)
        scorer.max_length = 4 * DEFAULT_MAX_LENGTH  # measure without cutting
        lengths = [len(f["input_ids"]) for f in scorer.tokenize(sample["query"].tolist(), sample["passage"].tolist())]
        scorer.max_length = choose_max_length(lengths, cap=model_max_positions(scorer.model.config, 512))
    else:
        scorer.max_length = int(cfg.max_length)
    summary, curve, _ = trainer.train(
        name,
        cfg,
        TwolarKind(scorer, cfg.loss),
        examples,
        checkpoint_dir,
        precision,
        callbacks,
        max_length=scorer.max_length,
    )
    info = scorer.save(out_dir)
    summary["max_length"] = scorer.max_length
    return TrainResult(summary, curve, info=info)


def load(folder: Path, info: dict, device: str | None = None) -> LMScorer:
    """A trained TWOLAR folder, as ``registry.load_student`` calls it."""
    from transformers import AutoTokenizer

    kind = info["kind"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = _auto_class(kind).from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise StudentLoadError(f"{folder}: cannot load the {kind} model: {err}") from err
    device_ = pick_device(device)
    return LMScorer(
        kind,
        model,
        tokenizer,
        int(info.get("max_length", DEFAULT_MAX_LENGTH)),
        backbone=info.get("backbone", ""),
        prompt=info.get("prompt", PROMPT),
        true_token_id=info.get("true_token_id"),
        false_token_id=info.get("false_token_id"),
        device=str(device_),
        precision=resolve_precision(info.get("precision", "fp32"), device_),
    )


def untrained(cfg: StudentConfig, device: str | None = None, max_length: int | None = None) -> LMScorer:
    """The starting point: the backbone's LM read as true − false, before any training."""
    length = max_length or (DEFAULT_MAX_LENGTH if cfg.max_length == "auto" else int(cfg.max_length))
    precision = resolve_precision(cfg.precision, pick_device(device))
    return build_scorer(cfg.kind, cfg.init_from or cfg.backbone, length, device, precision)
