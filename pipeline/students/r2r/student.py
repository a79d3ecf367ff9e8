"""A trained R2R student (ranks and explains), how it is saved and loaded, and its training on the LM students'
shared trainer (``pipeline.students.trainer``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import StudentConfig
from pipeline.students import trainer
from pipeline.students.backbones import Precision, pick_device, resolve_precision
from pipeline.students.base import StudentLoadError, TrainResult
from pipeline.students.groups import Group
from pipeline.students.r2r.faithfulness import measure_faithfulness
from pipeline.students.r2r.model import (
    WEIGHT_NAMES,
    PromptEncoder,
    R2RCollator,
    R2RError,
    R2RModel,
    _ensure_special_tokens,
    generate_texts,
    group_loss,
    load_backbone,
    score_prompts,
)
from pipeline.students.r2r.reasons import parse_reason_text, reason_targets

log = logging.getLogger(__name__)

KIND = "r2r"
PROMPT = "Query: {query} Document: {passage} Relevant:"
RANK_HEAD_FILE = "rank_head.safetensors"
LOSS_WEIGHT_LR = 1e-2  # the learned loss weights' own learning rate (Adam: about this much change per step)


class R2RStudent:
    """A trained R2R student: the ``Student`` protocol plus ``explain``."""

    kind = KIND

    def __init__(self, model: R2RModel, encoder: PromptEncoder, info: dict, precision: Precision = "fp32") -> None:
        self.model = model
        self.encoder = encoder
        self.info = info
        self.precision = precision
        self.max_length = encoder.max_length

    def score_pairs(
        self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        return score_prompts(
            self.model, self.encoder, list(queries), list(passages), batch_size, progress, self.precision
        )

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.score_pairs([query] * len(passages), list(passages), batch_size)

    def explain(self, query: str, passages: Sequence[str], max_new_tokens: int | None = None) -> list[dict[str, str]]:
        """Each passage's generated reasons: ``[{"direct": …, "comparative": …, "answer": …}, …]`` (greedy; "answer"
        is "" for a student not trained on answer sentences)."""
        limit = max_new_tokens or int(self.info.get("max_reason_tokens", 64)) + 8
        texts = generate_texts(self.model, self.encoder, query, list(passages), limit, precision=self.precision)
        return [parse_reason_text(text) for text, _ in texts]


def save(model: R2RModel, tokenizer: Any, folder: Path) -> None:
    """The backbone (Hugging Face format), the tokenizer and the rank head (safetensors) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head = {k: v.detach().float().cpu().contiguous() for k, v in model.rank_head.state_dict().items()}
    save_file(head, str(folder / RANK_HEAD_FILE))


def load(folder: Path, info: dict, device: str | None = None) -> R2RStudent:
    """An R2R student folder (``distillrank_student.json`` kind "r2r"), as ``registry.load_student`` calls it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(folder)
    if info.get("kind") != KIND:
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
    device_ = pick_device(device)
    model.to(device_).eval()
    encoder = PromptEncoder(tokenizer, architecture, int(info["max_length"]), int(info.get("max_reason_tokens", 64)))
    return R2RStudent(model, encoder, info, resolve_precision(info.get("precision", "fp32"), device_))


class R2RKind:
    """``trainer.LMKind`` for Reason-to-Rank: prompt + reason tokens in one pass, the multi-objective loss (its parts
    and weights go to the logs), and the learned loss weights in an optimizer group of their own."""

    def __init__(
        self,
        model: R2RModel,
        tokenizer: Any,
        encoder: PromptEncoder,
        reasons: dict,
        precision: Precision,
        rank_temperature: float = 1.0,
    ):
        self.model = model
        self.rank_temperature = rank_temperature
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = next(model.parameters()).device
        self.precision = precision
        self._collate = R2RCollator(encoder, reasons)

    def collate(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        return self._collate(groups)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return group_loss(model, batch, self.rank_temperature)

    def student(self) -> R2RStudent:
        return R2RStudent(self.model, self.encoder, {}, self.precision)

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        weights = getattr(self.model, "loss_weights", None)
        if weights is None:
            return []
        return [{"params": [weights], "weight_decay": 0.0, "lr": LOSS_WEIGHT_LR}]


def card_section(info: dict, summary: dict) -> str:
    """The R2R part of the model card: how it ranks and explains, its loss weights and reason faithfulness."""
    weights = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("final_weights", {}).items())
    faith = summary.get("faithfulness") or {}
    dev = summary.get("dev") or {}
    return f"""
## Reason-to-Rank

A {info["architecture"]} language model (backbone `{info["backbone"]}`) fine-tuned to rank passages and to explain
each ranking decision (Reason-to-Rank, arXiv 2410.05168).

- Ranking: a linear rank head (`{RANK_HEAD_FILE}`) on the hidden state of the prompt's last token, for the prompt
  `{info["prompt"]}` (at most {info["max_length"]} tokens; the passage is cut).
- Explanations: greedy generation after the prompt of `{info["reason_format"]}`.
- Loss: ListNet (teacher targets at temperature {info.get("rank_temperature", 1.0)}) + pointwise MSE on the
  teacher's targets 1/(teacher_rank+1) + reason cross-entropy,
  weights {"learned (sigmoid, with -log w regulariser)" if info.get("learn_weights") else "fixed"}; final weights:
  {weights or "n/a"}.
- Passages with reasons: {summary.get("passages_with_reasons")} of {summary.get("train_pairs")} training pairs.
- Faithfulness on {faith.get("passages", 0)} dev passages with teacher reasons (queries never trained on): ROUGE-L
  F1 against the teacher's direct reasons {faith.get("rouge_l_direct")}, comparative reasons
  {faith.get("rouge_l_comparative")}; well-formed explanations {faith.get("well_formed")}; the student's answer
  sentences found in their passage {faith.get("student_answer_support")} (of {faith.get("student_answer_sentences")}),
  the teacher's {faith.get("teacher_answer_support")} (quotes, a leading "The passage states:", case and punctuation
  ignored).
- Ranking on the dev queries, against the teacher's order: nDCG@10 {dev.get("nDCG@10")}, nDCG@5
  {dev.get("nDCG@5")}, Kendall's tau {dev.get("kendall_tau")} ({dev.get("groups")} groups).

`distillrank explain --model <folder> ...` prints a reranking with its reasons.
"""


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
    """Train an R2R student on ``examples`` (TRAINING_EXAMPLES) and ``rationales`` (RATIONALES) and save it to
    ``out_dir``."""
    from transformers import set_seed

    missing = {"query_id", "query", "doc_id", "passage", "teacher_rank", "target", "split"} - set(examples.columns)
    if missing:
        raise R2RError(f"training examples lack columns {sorted(missing)}")
    set_seed(cfg.seed)
    reasons = reason_targets(rationales, with_answer=cfg.r2r.answer_sentence)
    backbone, tokenizer, architecture = load_backbone(cfg.init_from or cfg.backbone)
    r2r = cfg.r2r
    model = R2RModel(backbone, architecture, r2r.learn_weights, r2r.initial_weight, r2r.fixed_weights)
    device_ = pick_device(device)
    model.to(device_)
    precision = resolve_precision(cfg.precision, device_)
    max_length = 256 if cfg.max_length == "auto" else int(cfg.max_length)
    encoder = PromptEncoder(tokenizer, architecture, max_length, r2r.max_reason_tokens)
    kind = R2RKind(model, tokenizer, encoder, reasons, precision, r2r.rank_temperature)
    summary, curve, _ = trainer.train(
        name, cfg, kind, examples, checkpoint_dir, precision, callbacks, rationales=len(reasons)
    )
    # the best checkpoint is loaded (load_best_model_at_end): its reasons are the ones the saved student gives
    faithfulness = measure_faithfulness(
        model, encoder, examples, rationales, r2r.max_reason_tokens, cfg.seed, r2r.faithfulness_passages, name
    )
    weights = model.weights().detach().float().cpu().tolist()
    train_keys = examples[examples["split"] == "train"][["query_id", "doc_id"]].drop_duplicates()
    info = {
        "kind": KIND,
        "backbone": cfg.backbone,
        "architecture": architecture,
        "max_length": max_length,
        "max_reason_tokens": r2r.max_reason_tokens,
        "prompt": PROMPT,
        "reason_format": "Direct: {direct} Comparative: {comparative}"
        + (" Answer: {answer sentence}" if r2r.answer_sentence else ""),
        "score": "rank_head(hidden state of the prompt's last token)",
        "learn_weights": r2r.learn_weights,
        "rank_temperature": r2r.rank_temperature,
        "loss_weights": dict(zip(WEIGHT_NAMES, weights, strict=True)),
        "precision": precision,
    }
    summary.update(
        architecture=architecture,
        max_length=max_length,
        passages_with_reasons=sum((q, d) in reasons for q, d in train_keys.itertuples(index=False)),
        final_weights=dict(zip(WEIGHT_NAMES, weights, strict=True)),
        faithfulness=faithfulness,
    )
    save(model, tokenizer, out_dir)
    return TrainResult(summary, curve, card_section(info, summary), info)


def untrained(cfg: StudentConfig, device: str | None = None, max_length: int | None = None) -> R2RStudent:
    """The starting point: the backbone with a fresh (seeded) rank head."""
    torch.manual_seed(cfg.seed)
    backbone, tokenizer, architecture = load_backbone(cfg.init_from or cfg.backbone)
    model = R2RModel(backbone, architecture, learn_weights=False)
    device_ = pick_device(device)
    model.to(device_).eval()
    length = max_length or (256 if cfg.max_length == "auto" else int(cfg.max_length))
    encoder = PromptEncoder(tokenizer, architecture, length, cfg.r2r.max_reason_tokens)
    return R2RStudent(
        model, encoder, {"max_reason_tokens": cfg.r2r.max_reason_tokens}, resolve_precision(cfg.precision, device_)
    )
