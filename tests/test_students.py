"""Students: every kind scores with a tiny random model, keeps the caller's order, and survives save → load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_cross_encoder
from pipeline.students.base import STUDENT_FILE, StudentLoadError, load_student
from pipeline.students.models import PROMPT, RankingStudent, build_student

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


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_student(request, tmp_path_factory) -> RankingStudent:
    kind = request.param
    folder = BUILDERS[kind](tmp_path_factory.mktemp(kind))
    return build_student(kind, str(folder), max_length=24, device="cpu")


def test_scores_are_finite_and_in_the_callers_order(tiny_student: RankingStudent) -> None:
    queries = [QUERIES[i % 4] for i in range(8)]
    passages = [PASSAGES[(i * 3) % 4] for i in range(8)]
    together = tiny_student.score_pairs(queries, passages, batch_size=3)
    one_by_one = np.array([tiny_student.score_pairs([q], [p])[0] for q, p in zip(queries, passages, strict=True)])
    assert together.shape == (8,) and np.isfinite(together).all()
    # length-sorted batching with padding must give each pair its own score, whatever its batch neighbours
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(together, 5))) > 1  # the pairs differ, so do the scores
    np.testing.assert_allclose(
        tiny_student.score(QUERIES[0], PASSAGES), tiny_student.score_pairs([QUERIES[0]] * 4, PASSAGES)
    )


def test_truncation_keeps_the_prompt_suffix(tiny_student: RankingStudent) -> None:
    long = " ".join(["protein"] * 200)
    features = tiny_student.tokenize([QUERIES[0]], [long])
    ids = features[0]["input_ids"]
    assert len(ids) <= tiny_student.max_length
    if tiny_student.kind != "cross-encoder":
        suffix = tiny_student.tokenizer(" Relevant:", add_special_tokens=False)["input_ids"]
        tail = ids[-len(suffix) - len(tiny_student._tail) :][: len(suffix)]
        assert tail == suffix


def test_save_and_load_give_identical_scores(tiny_student: RankingStudent, tmp_path: Path) -> None:
    before = tiny_student.score_pairs(QUERIES, PASSAGES)
    tiny_student.save(tmp_path / "student", card="# card\n", teacher={"model": "t"}, loss="ranknet")
    info = json.loads((tmp_path / "student" / STUDENT_FILE).read_text())
    assert info["kind"] == tiny_student.kind and info["loss"] == "ranknet" and info["max_length"] == 24
    if tiny_student.kind != "cross-encoder":
        assert info["prompt"] == PROMPT and info["true_token_id"] != info["false_token_id"]
    loaded = load_student(tmp_path / "student", device="cpu")
    assert loaded.kind == tiny_student.kind
    np.testing.assert_allclose(loaded.score_pairs(QUERIES, PASSAGES), before, rtol=1e-5, atol=1e-6)


def test_lm_scores_are_true_minus_false_logits(tmp_path: Path) -> None:
    """The causal score is the next-token logit difference after the full prompt, computed independently here."""
    from transformers import AutoModelForCausalLM

    folder = tiny_llama(tmp_path / "llama")
    student = build_student("twolar-causal", str(folder), max_length=64, device="cpu")
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


def test_cross_encoder_folder_loads_in_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    student = build_student("cross-encoder", str(tiny_cross_encoder(tmp_path / "ce")), max_length=64, device="cpu")
    student.save(tmp_path / "student")
    ours = student.score_pairs(QUERIES, PASSAGES)
    theirs = CrossEncoder(str(tmp_path / "student"), device="cpu").predict(list(zip(QUERIES, PASSAGES, strict=True)))
    np.testing.assert_allclose(np.asarray(theirs), ours, rtol=1e-4, atol=1e-5)


def test_minilm_backbone_resolves_offline() -> None:
    student = build_student("cross-encoder", "all-MiniLM-L6-v2", max_length=32, device="cpu")
    assert student.model.config.num_labels == 1
    assert np.isfinite(student.score(QUERIES[0], PASSAGES)).all()


def test_not_a_student_folder(tmp_path: Path) -> None:
    with pytest.raises(StudentLoadError, match=STUDENT_FILE):
        load_student(tmp_path)
