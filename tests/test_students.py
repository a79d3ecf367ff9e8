"""Students: every kind scores with a tiny random model, keeps the caller's order, and survives save → load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_cross_encoder
from pipeline.config import StudentConfig
from pipeline.students import bi_encoder, cross_encoder
from pipeline.students.backbones import choose_max_length, resolve_precision
from pipeline.students.base import STUDENT_FILE, StudentLoadError
from pipeline.students.outputs import write_student_info
from pipeline.students.registry import kind_module, load_student
from pipeline.students.twolar import PROMPT, build_scorer

WORDS = (  # noqa: SIM905 (a word list is easier to read as a sentence)
    "the a of and to in is for on with what how why does cause causes protein cells cell gene genes cancer "
    "risk disease study studies patients treatment effect effects blood increase increases reduce reduces "
    "vitamin mice human brain heart drug drugs level levels higher lower query document relevant true false"
).split()
QUERIES = ["what causes cancer", "vitamin reduces risk", "protein in brain cells", "does the drug work"]
PASSAGES = [
    "the study of cancer risk in patients with a higher level of the protein",
    "vitamin",
    "mice with the gene show lower blood levels and the effect increases with the dose of the drug in the brain",
    "heart disease",
]


def tiny_tokenizer(folder: Path, bos: bool = False, eos: bool = False):
    """A word-level fast tokenizer built offline (unknown words → [UNK]), with 'true'/'false' in the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]"]
    vocab = {
        token: i for i, token in enumerate([*specials, *dict.fromkeys(WORDS), ":", "Query", "Document", "Relevant"])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    single = " ".join([*(["[BOS]"] if bos else []), "$A", *(["[EOS]"] if eos else [])])
    pair = " ".join([*(["[BOS]"] if bos else []), "$A", "$B", *(["[EOS]"] if eos else [])])
    special_ids = [(t, vocab[t]) for t in ("[BOS]", "[EOS]")]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.save_pretrained(folder)
    return fast


def tiny_cross_encoder(folder: Path) -> Path:
    """A random 2-layer BERT with a one-logit head and MiniLM's tokenizer, saved as a backbone folder."""
    return save_tiny_cross_encoder(folder)


def tiny_t5(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder, eos=True)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder, bos=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


BUILDERS = {"cross-encoder": tiny_cross_encoder, "twolar-seq2seq": tiny_t5, "twolar-causal": tiny_llama}
KINDS = ["cross-encoder", "bi-encoder", "twolar-seq2seq", "twolar-causal"]


def fresh_student(kind: str, folder: Path):
    """A student of ``kind`` straight from a tiny random backbone (its untrained starting point), in fp32."""
    builder = BUILDERS.get(kind, tiny_cross_encoder)
    cfg = StudentConfig(kind=kind, backbone=str(builder(folder)), max_length=24, precision="fp32")
    return kind_module(kind).untrained(cfg, device="cpu")


@pytest.fixture(scope="module", params=KINDS)
def tiny_student(request, tmp_path_factory):
    return fresh_student(request.param, tmp_path_factory.mktemp(request.param))


def test_scores_are_finite_and_in_the_callers_order(tiny_student) -> None:
    queries = [QUERIES[i % 4] for i in range(8)]
    passages = [PASSAGES[(i * 3) % 4] for i in range(8)]
    together = tiny_student.score_pairs(queries, passages, batch_size=3)
    one_by_one = np.array([tiny_student.score_pairs([q], [p])[0] for q, p in zip(queries, passages, strict=True)])
    assert together.shape == (8,) and np.isfinite(together).all()
    # length-sorted batching with padding must give each pair its own score, whatever its batch neighbours
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(together, 5))) > 1  # the pairs differ, so do the scores
    np.testing.assert_allclose(
        tiny_student.score(QUERIES[0], PASSAGES), tiny_student.score_pairs([QUERIES[0]] * 4, PASSAGES), atol=1e-6
    )
    assert tiny_student.score_pairs([], []).shape == (0,)


@pytest.mark.parametrize("kind", ["twolar-seq2seq", "twolar-causal"])
def test_truncation_keeps_the_prompt_suffix(kind: str, tmp_path: Path) -> None:
    scorer = build_scorer(kind, str(BUILDERS[kind](tmp_path)), max_length=24, device="cpu")
    long = " ".join(["protein"] * 200)
    ids = scorer.tokenize([QUERIES[0]], [long])[0]["input_ids"]
    assert len(ids) <= scorer.max_length
    suffix = scorer.tokenizer(" Relevant:", add_special_tokens=False)["input_ids"]
    tail = ids[-len(suffix) - len(scorer._tail) :][: len(suffix)]
    assert tail == suffix


@pytest.mark.parametrize("kind", ["twolar-seq2seq", "twolar-causal"])
def test_lm_students_save_and_load_with_identical_scores(kind: str, tmp_path: Path) -> None:
    scorer = build_scorer(kind, str(BUILDERS[kind](tmp_path / "bb")), max_length=24, device="cpu")
    before = scorer.score_pairs(QUERIES, PASSAGES)
    info = scorer.save(tmp_path / "student")
    write_student_info(tmp_path / "student", {**info, "loss": "ranknet"})
    info = json.loads((tmp_path / "student" / STUDENT_FILE).read_text())
    assert info["kind"] == kind and info["max_length"] == 24
    assert info["prompt"] == PROMPT and info["true_token_id"] != info["false_token_id"]
    loaded = load_student(tmp_path / "student", device="cpu")
    assert loaded.kind == kind
    np.testing.assert_allclose(loaded.score_pairs(QUERIES, PASSAGES), before, rtol=1e-5, atol=1e-6)


def test_lm_scores_are_true_minus_false_logits(tmp_path: Path) -> None:
    """The causal score is the next-token logit difference after the full prompt, computed independently here."""
    from transformers import AutoModelForCausalLM

    folder = tiny_llama(tmp_path / "llama")
    student = build_scorer("twolar-causal", str(folder), max_length=64, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = student.tokenizer
    text = PROMPT.format(query=QUERIES[1], passage=PASSAGES[0])
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    true_id, false_id = (
        tok(" true", add_special_tokens=False)["input_ids"][0],
        tok(" false", add_special_tokens=False)["input_ids"][0],
    )
    expected = (logits[true_id] - logits[false_id]).item()
    assert student.score_pairs([QUERIES[1]], [PASSAGES[0]])[0] == pytest.approx(expected, abs=1e-4)


def test_cross_encoder_scores_are_the_libraries_raw_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_cross_encoder(tmp_path / "ce")
    student = fresh_student("cross-encoder", tmp_path / "ce2")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce2")
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(QUERIES, PASSAGES, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(student.score_pairs(QUERIES, PASSAGES), logits, rtol=1e-4, atol=1e-5)


def test_bi_encoder_scores_are_cosine_similarities(tmp_path: Path) -> None:
    student = fresh_student("bi-encoder", tmp_path)
    q = student.model.encode([QUERIES[0]], convert_to_tensor=True)
    p = student.model.encode(PASSAGES, convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(q, p).numpy()
    np.testing.assert_allclose(student.score(QUERIES[0], PASSAGES), expected, rtol=1e-4, atol=1e-5)


def test_minilm_backbone_resolves_offline() -> None:
    model = cross_encoder.build_model("all-MiniLM-L6-v2", max_length=32, device="cpu")
    assert model.model.config.num_labels == 1
    assert np.isfinite(cross_encoder.CrossEncoderStudent(model).score(QUERIES[0], PASSAGES)).all()
    untrained = bi_encoder.untrained(StudentConfig(kind="bi-encoder", precision="fp32"), device="cpu")
    scores = untrained.score("what causes cancer", ["cancer is caused by mutations", "the sky is blue"])
    assert scores[0] > scores[1]  # MiniLM as a bi-encoder already ranks, before any training


def test_precision_falls_back_to_fp32_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.students import backbones

    monkeypatch.setattr(backbones, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "fp32"  # a log line, not an error
    monkeypatch.setattr(backbones, "bf16_supported", lambda device: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_max_length_comes_from_the_data() -> None:
    assert choose_max_length([20] * 96 + [500] * 4, cap=512) == 32  # the longest 4% are cut
    assert choose_max_length(list(range(10, 200)), cap=128) == 128


def test_not_a_student_folder(tmp_path: Path) -> None:
    with pytest.raises(StudentLoadError, match=STUDENT_FILE):
        load_student(tmp_path)
    with pytest.raises(StudentLoadError, match="no such folder"):
        load_student(tmp_path / "missing")
    with pytest.raises(StudentLoadError, match="unknown student kind"):
        (tmp_path / STUDENT_FILE).write_text('{"kind": "decision-tree"}')
        load_student(tmp_path)
