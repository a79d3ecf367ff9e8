"""Training is deterministic: the same seed trains bit-identical weights that give bit-identical scores, whatever
the global random states, the hash seed or the process; another seed trains another student; and training runs
on the configured number of torch threads (``students.<name>.threads``: the weights depend on the count), which
is restored afterwards.

A cross-encoder whose backbone has no head gets a random one: it is what made the figures move before its
initialisation was seeded (a fresh process drew another head)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_students import PASSAGES, QUERIES
from test_train import built, student_config
from transformers import TrainerCallback

from conftest import save_tiny_cross_encoder
from pipeline.stages import train
from pipeline.students.registry import load_student

TESTS = Path(__file__).resolve().parent
PAIRS = [(q, p) for q in QUERIES for p in PASSAGES]


@pytest.fixture(scope="module")
def headless_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer BERT without a classification head (a cross-encoder draws its head at random)."""
    return str(save_tiny_cross_encoder(tmp_path_factory.mktemp("headless"), head=False))


def trained(folder: Path) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The weights of a trained student folder and its scores of ``PAIRS``."""
    weights = load_file(str(folder / "model.safetensors"))
    student = load_student(folder, device="cpu")
    scores = student.score_pairs([q for q, _ in PAIRS], [p for _, p in PAIRS], batch_size=4)
    return weights, scores


def train_student(root: Path, backbone: str, **overrides: object) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    paths = built(root)
    train.run("s", student_config(backbone, max_steps=4, eval_every=2, **overrides), paths)
    return trained(paths.student_dir("s"))


def assert_identical(a: tuple[dict, np.ndarray], b: tuple[dict, np.ndarray]) -> None:
    (weights_a, scores_a), (weights_b, scores_b) = a, b
    assert weights_a.keys() == weights_b.keys()
    differing = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not differing, f"weights differ: {differing}"
    assert scores_a.tobytes() == scores_b.tobytes()


def disturb_global_state() -> None:
    """Other global random states and thread count than a fresh process has: a seeded run must not notice."""
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    torch.rand(7)
    torch.set_num_threads(1)


@pytest.mark.parametrize("kind", ["cross-encoder", "bi-encoder"])
def test_the_same_seed_trains_a_bit_identical_student(tmp_path: Path, headless_backbone: str, kind: str) -> None:
    threads = torch.get_num_threads()
    try:
        first = train_student(tmp_path / "a", headless_backbone, kind=kind)
        disturb_global_state()
        second = train_student(tmp_path / "b", headless_backbone, kind=kind)
    finally:
        torch.set_num_threads(threads)
    assert_identical(first, second)
    other_weights, other_scores = train_student(tmp_path / "c", headless_backbone, kind=kind, seed=1)
    assert any(not torch.equal(first[0][name], other_weights[name]) for name in other_weights)
    assert first[1].tobytes() != other_scores.tobytes()


def test_a_fresh_process_trains_the_same_student(tmp_path: Path, headless_backbone: str) -> None:
    """Another interpreter (another hash seed, one torch thread by default) trains the same cross-encoder."""
    here = train_student(tmp_path / "here", headless_backbone)
    child = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from pathlib import Path\n"
        "from test_train import built, student_config\n"
        "from pipeline.stages import train\n"
        f"paths = built(Path({str(tmp_path / 'there')!r}))\n"
        f"train.run('s', student_config({headless_backbone!r}, max_steps=4, eval_every=2), paths)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(here, trained(tmp_path / "there" / "students" / "s"))


class RecordThreads(TrainerCallback):
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.add(torch.get_num_threads())


@pytest.mark.parametrize("threads", [1, 3, None])
def test_training_runs_on_the_configured_threads(tmp_path: Path, headless_backbone: str, threads: int | None) -> None:
    before = torch.get_num_threads()
    record = RecordThreads()
    paths = built(tmp_path)
    train.run("s", student_config(headless_backbone, max_steps=2, threads=threads), paths, callbacks=[record])
    assert record.seen == {threads or before}
    assert torch.get_num_threads() == before
