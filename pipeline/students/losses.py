"""Learning-to-rank losses over query groups: ``loss(scores [Q, N], targets [Q, N], mask [Q, N]) -> scalar``.

``scores`` are the student's, ``targets`` the teacher's labels (TWOLAR: ``1 / (teacher_rank + 1)``, higher is
better), ``mask`` is True for real candidates and False for padding (groups of different sizes share a batch).

Why these exist next to sentence-transformers' ``cross_encoder.losses`` (which the cross-encoder student uses):
the library's losses run the CrossEncoder themselves (``model.preprocess`` + ``model(...)["scores"]``), so they
cannot take the scores of the LM students (TWOLAR's true/false logits, R2R's rank head). Here the same losses take
score tensors. ``tests/test_losses.py`` checks them against the library's on the same logits: RankNet, ListNet,
MarginMSE and BCE agree exactly (the library's RankNet defaults to a base-2 log: ours / ln 2), LambdaLoss with the
library's ``LambdaRankScheme`` agrees up to the normalisation (ours sums a group's pairs, the library averages
over the batch's pairs).

- ``ranknet``: RankNet (Burges et al. 2005) over every ordered pair with ``target_i > target_j``:
  ``log(1 + exp(-(s_i - s_j)))``, averaged over the pairs of the batch (TWOLAR's default).
- ``listnet``: ListNet's top-one cross-entropy (Cao et al. 2007) as in allRank: ``-sum softmax(t / tau) *
  log_softmax(s)`` over a group's candidates, averaged over groups; ``tau`` = 1 (allRank's plain softmax of the
  labels). R2R uses ListNet for its ranking term.
- ``lambdaloss``: the LambdaLoss framework (Wang et al. 2018) with the LambdaRank weighting scheme, i.e. RankNet
  whose pair (i, j) is weighted by ``|ΔNDCG_ij|`` = ``|G_i - G_j| * |1/D(p_i) - 1/D(p_j)|`` with gains
  ``G = (2^t - 1) / maxDCG``, discounts ``D(p) = log2(1 + p)`` at the positions ``p`` the current scores give;
  weights are not differentiated (LambdaRank). Summed over pairs, averaged over groups. (Not NDCG-Loss2++.)
- ``margin-mse``: MarginMSE (Hofstätter et al. 2020): mean squared error between score margins ``s_i - s_j``
  and target margins ``t_i - t_j`` over every unordered pair of real candidates.
- ``bce``: pointwise binary cross-entropy of ``sigmoid(s)`` against the targets in [0, 1] as soft labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pair_masks(targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real pairs (both candidates real) and the ordered pairs with target_i > target_j, both [Q, N, N]."""
    both = mask[:, :, None] & mask[:, None, :]
    above = both & (targets[:, :, None] > targets[:, None, :])
    return both, above


def _zero(scores: torch.Tensor) -> torch.Tensor:
    """A zero loss that still depends on ``scores`` (so backward() works on a batch without any pair)."""
    return scores.sum() * 0.0


def ranknet(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RankNet: mean over ordered pairs (target_i > target_j) of ``log(1 + exp(-(s_i - s_j)))``.

    >>> s, t, m = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.5, 1 / 3, 0.25]]), torch.ones(1, 3, dtype=bool)
    >>> round(ranknet(s, t, m).item(), 4)  # pairs (0,1), (0,2), (1,2): (softplus(-1) + softplus(-2) + softplus(-1)) / 3
    0.2512
    """
    _, above = _pair_masks(targets, mask)
    if not above.any():
        return _zero(scores)
    diffs = scores[:, :, None] - scores[:, None, :]
    return F.softplus(-diffs[above]).mean()


def listnet(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ListNet top-one cross-entropy between ``softmax(targets / temperature)`` and ``softmax(scores)``.

    >>> s, t, m = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool)
    >>> round(listnet(s, t, m).item(), 4)  # uniform prediction: cross-entropy = log 2
    0.6931
    """
    neg = torch.finfo(scores.dtype).min
    target_dist = torch.softmax((targets / temperature).masked_fill(~mask, float("-inf")), dim=-1)
    log_probs = torch.log_softmax(scores.masked_fill(~mask, neg), dim=-1)
    per_query = -(target_dist * log_probs).masked_fill(~mask, 0.0).sum(dim=-1)
    real = mask.any(dim=-1)
    return per_query[real].mean() if real.any() else _zero(scores)


def lambda_weights(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``|ΔNDCG_ij|`` of swapping i and j in the ranking the scores give (LambdaRank), [Q, N, N], no gradient."""
    with torch.no_grad():
        neg = torch.finfo(scores.dtype).min
        order = scores.masked_fill(~mask, neg).argsort(dim=-1, descending=True)
        positions = torch.empty_like(order)
        ranks = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
        positions.scatter_(1, order, ranks)  # 1-based position of each candidate
        inv_discount = 1.0 / torch.log2(1.0 + positions.to(scores.dtype))
        gains = (torch.pow(2.0, targets.to(scores.dtype)) - 1.0).masked_fill(~mask, 0.0)
        ideal = torch.sort(gains, dim=-1, descending=True).values
        ideal_inv_discount = 1.0 / torch.log2(
            torch.arange(2, scores.shape[1] + 2, device=scores.device).to(scores.dtype)
        )
        max_dcg = (ideal * ideal_inv_discount).sum(dim=-1, keepdim=True).clamp(min=1e-10)
        g = gains / max_dcg
        return (g[:, :, None] - g[:, None, :]).abs() * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()


def lambdaloss(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LambdaRank-weighted RankNet (LambdaLoss framework, LambdaRank scheme): per group the sum over ordered pairs
    of ``|ΔNDCG_ij| * log(1 + exp(-(s_i - s_j)))``, averaged over groups."""
    _, above = _pair_masks(targets, mask)
    if not above.any():
        return _zero(scores)
    weights = lambda_weights(scores, targets, mask)
    diffs = scores[:, :, None] - scores[:, None, :]
    per_pair = (weights * F.softplus(-diffs)).masked_fill(~above, 0.0)
    per_query = per_pair.sum(dim=(1, 2))
    return per_query[above.any(dim=(1, 2))].mean()


def margin_mse(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unordered pairs of real candidates of ``((s_i - s_j) - (t_i - t_j))^2``.

    >>> s, t, m = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.ones(1, 2, dtype=bool)
    >>> margin_mse(s, t, m).item()  # (1 - 0.5)^2
    0.25
    """
    both, _ = _pair_masks(targets, mask)
    upper = torch.ones(scores.shape[1], scores.shape[1], dtype=torch.bool, device=scores.device).triu(diagonal=1)
    pairs = both & upper
    if not pairs.any():
        return _zero(scores)
    score_margin = scores[:, :, None] - scores[:, None, :]
    target_margin = (targets[:, :, None] - targets[:, None, :]).to(scores.dtype)
    return ((score_margin - target_margin)[pairs] ** 2).mean()


def bce(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pointwise BCE of ``sigmoid(scores)`` against soft labels ``targets`` in [0, 1], mean over real candidates.

    >>> round(bce(torch.tensor([[0.0]]), torch.tensor([[0.3]]), torch.ones(1, 1, dtype=bool)).item(), 4)  # log 2
    0.6931
    """
    if not mask.any():
        return _zero(scores)
    return F.binary_cross_entropy_with_logits(scores[mask], targets[mask].to(scores.dtype))


LOSSES: dict[str, Loss] = {
    "ranknet": ranknet,
    "listnet": listnet,
    "lambdaloss": lambdaloss,
    "margin-mse": margin_mse,
    "bce": bce,
}


def get_loss(name: str) -> Loss:
    """The loss called ``name`` (``StudentConfig.loss``).

    >>> get_loss("ranknet") is ranknet
    True
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (known: {sorted(LOSSES)})") from None
