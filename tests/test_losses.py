"""Ranking losses: values computed by hand on a 3-candidate group, padding that changes nothing, and gradients that
push the scores towards the teacher's order."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.students.losses import LOSSES, get_loss, lambdaloss, listnet, margin_mse, ranknet
from pipeline.students.losses import bce as bce_loss

# teacher ranks 1, 2, 3 → TWOLAR targets 1/2, 1/3, 1/4; the student puts the second candidate first
S = [1.0, 2.0, 0.0]
T = [0.5, 1 / 3, 0.25]


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def tensors(scores=S, targets=T, mask=None):
    mask = mask if mask is not None else [True] * len(scores)
    return torch.tensor([scores]), torch.tensor([targets]), torch.tensor([mask])


def test_ranknet_by_hand() -> None:
    # ordered pairs (0,1), (0,2), (1,2): log(1 + exp(-(s_i - s_j)))
    expected = (softplus(1.0) + softplus(-1.0) + softplus(-2.0)) / 3
    assert expected == pytest.approx(0.584484, abs=1e-6)
    assert ranknet(*tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_listnet_by_hand() -> None:
    z_t = sum(math.exp(t) for t in T)
    z_s = sum(math.exp(s) for s in S)
    expected = -sum(math.exp(t) / z_t * (s - math.log(z_s)) for s, t in zip(S, T, strict=True))
    assert expected == pytest.approx(1.381831, abs=1e-5)
    assert listnet(*tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_lambdaloss_by_hand() -> None:
    gains = [2**t - 1 for t in T]
    max_dcg = gains[0] / math.log2(2) + gains[1] / math.log2(3) + gains[2] / math.log2(4)
    g = [x / max_dcg for x in gains]
    # the scores' ranking: candidate 1 at position 1, candidate 0 at 2, candidate 2 at 3
    inv_d = [1 / math.log2(3), 1.0, 1 / math.log2(4)]
    w = {(i, j): abs(g[i] - g[j]) * abs(inv_d[i] - inv_d[j]) for i, j in [(0, 1), (0, 2), (1, 2)]}
    expected = sum(w[i, j] * softplus(-(S[i] - S[j])) for i, j in w)
    assert lambdaloss(*tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_margin_mse_by_hand() -> None:
    expected = ((-1 - (0.5 - 1 / 3)) ** 2 + (1 - 0.25) ** 2 + (2 - (1 / 3 - 0.25)) ** 2) / 3
    assert expected == pytest.approx(1.865741, abs=1e-6)
    assert margin_mse(*tensors()).item() == pytest.approx(expected, abs=1e-6)


def test_bce_by_hand() -> None:
    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = -sum(t * math.log(sig(s)) + (1 - t) * math.log(1 - sig(s)) for s, t in zip(S, T, strict=True)) / 3
    assert bce_loss(*tensors()).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_changes_nothing(name: str) -> None:
    loss = get_loss(name)
    plain = loss(*tensors())
    # the same group padded with junk, in a batch with a second, smaller group padded too
    scores = torch.tensor([[*S, 9.0, -7.0], [0.3, -0.2, 5.0, 5.0, 5.0]])
    targets = torch.tensor([[*T, 0.9, 0.0], [0.5, 1 / 3, 0.7, 0.1, 0.0]])
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    padded_first = loss(scores[:1], targets[:1], mask[:1])
    assert padded_first.item() == pytest.approx(plain.item(), abs=1e-6)
    second_alone = loss(scores[1:, :2], targets[1:, :2], mask[1:, :2])
    both = loss(scores, targets, mask)
    assert torch.isfinite(both)
    if name in {"listnet", "lambdaloss"}:  # averaged over groups
        assert both.item() == pytest.approx((plain.item() + second_alone.item()) / 2, abs=1e-6)
    scores.requires_grad_(True)
    loss(scores, targets, mask).backward()
    assert scores.grad is not None and torch.all(scores.grad[~mask] == 0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_gradient_step_orders_the_scores_like_the_targets(name: str) -> None:
    scores = torch.zeros(1, 3, requires_grad=True)
    targets = torch.tensor([[1 / 3, 0.5, 0.25]])
    get_loss(name)(scores, targets, torch.ones(1, 3, dtype=torch.bool)).backward()
    stepped = scores.detach() - 0.1 * scores.grad
    assert stepped[0].argsort(descending=True).tolist() == [1, 0, 2]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_pairs_gives_a_zero_loss_that_backpropagates(name: str) -> None:
    scores = torch.tensor([[0.4, 0.0]], requires_grad=True)
    loss = get_loss(name)(scores, torch.tensor([[0.5, 0.0]]), torch.tensor([[True, False]]))
    loss.backward()
    assert torch.isfinite(loss)
    if name in {"ranknet", "lambdaloss", "margin-mse", "listnet"}:
        assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
