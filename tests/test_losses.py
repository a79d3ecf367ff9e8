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


# -- agreement with sentence-transformers' own losses, on the same logits -----------------------------------------
def fixed_logits():
    """Stands in for a CrossEncoder: the logit of (query, document) is the document text read as a number, so
    that the library's loss sees exactly the scores given to ours."""
    from sentence_transformers.cross_encoder import CrossEncoder

    class FixedLogits(CrossEncoder):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # no backbone to load

        @property
        def num_labels(self) -> int:
            return 1

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        def preprocess(self, pairs, prompt=None, task=None):
            return {"value": torch.tensor([float(document) for _, document in pairs])}

        def forward(self, features):
            return {"scores": features["value"][:, None]}

    return FixedLogits()


GROUPS_S = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0, 0.2]]
GROUPS_T = [[0.5, 1 / 3, 0.25], [1 / 3, 0.5, 0.2, 0.25]]


def padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(g) for g in GROUPS_S)
    scores = torch.tensor([g + [0.0] * (width - len(g)) for g in GROUPS_S])
    targets = torch.tensor([g + [0.0] * (width - len(g)) for g in GROUPS_T])
    mask = torch.tensor([[True] * len(g) + [False] * (width - len(g)) for g in GROUPS_S])
    return scores, targets, mask


def library_listwise(loss_cls, **kwargs) -> float:
    loss = loss_cls(fixed_logits(), activation_fn=torch.nn.Identity(), **kwargs)
    inputs = [["q1", "q2"], [[str(s) for s in g] for g in GROUPS_S]]
    return float(loss(inputs, [torch.tensor(t) for t in GROUPS_T]))


def test_ranknet_agrees_with_sentence_transformers() -> None:
    """The library's RankNetLoss averages the same pair terms over the batch's pairs; its default takes the base-2
    log (ours the natural one, as Burges et al.), so the two differ by exactly ln 2."""
    from sentence_transformers.cross_encoder.losses import RankNetLoss

    ours = float(ranknet(*padded()))
    assert library_listwise(RankNetLoss, reduction_log="natural") == pytest.approx(ours, rel=1e-5)
    assert library_listwise(RankNetLoss) == pytest.approx(ours / math.log(2), rel=1e-5)


def test_listnet_agrees_with_sentence_transformers() -> None:
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    assert library_listwise(ListNetLoss) == pytest.approx(float(listnet(*padded())), rel=1e-5)


def test_lambdaloss_agrees_with_sentence_transformers_lambdarank_scheme() -> None:
    """Same LambdaRank-weighted pair terms; the library averages them over the pairs of the batch, ours sums them per
    group and averages over groups (Wang et al.'s per-query loss): on one group they differ by its pair count."""
    from sentence_transformers.cross_encoder.losses import LambdaLoss, LambdaRankScheme

    scores, targets, mask = padded()
    one = (scores[:1], targets[:1], mask[:1])
    pairs = sum(1 for i in range(3) for j in range(3) if GROUPS_T[0][i] > GROUPS_T[0][j])
    loss = LambdaLoss(
        fixed_logits(), weighting_scheme=LambdaRankScheme(), activation_fn=torch.nn.Identity(), reduction_log="natural"
    )
    theirs = float(loss([["q1"], [[str(s) for s in GROUPS_S[0]]]], [torch.tensor(GROUPS_T[0])]))
    assert theirs * pairs == pytest.approx(float(lambdaloss(*one)), rel=1e-5)


def test_margin_mse_and_bce_agree_with_sentence_transformers() -> None:
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, MarginMSELoss

    scores, targets, mask = padded()
    rows = [
        (str(g[i]), str(g[j]), t[i] - t[j])
        for g, t in zip(GROUPS_S, GROUPS_T, strict=True)
        for i in range(len(g))
        for j in range(i + 1, len(g))
    ]
    mse = MarginMSELoss(fixed_logits(), activation_fn=torch.nn.Identity())
    theirs = float(
        mse([["q"] * len(rows), [r[0] for r in rows], [r[1] for r in rows]], torch.tensor([r[2] for r in rows]))
    )
    assert theirs == pytest.approx(float(margin_mse(scores, targets, mask)), rel=1e-5)
    flat_s = [s for g in GROUPS_S for s in g]
    flat_t = [t for g in GROUPS_T for t in g]
    bce = BinaryCrossEntropyLoss(fixed_logits())
    theirs = float(bce([["q"] * len(flat_s), [str(s) for s in flat_s]], torch.tensor(flat_t)))
    assert theirs == pytest.approx(float(bce_loss(scores, targets, mask)), rel=1e-5)
