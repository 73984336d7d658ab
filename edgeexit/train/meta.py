"""Pieces of meta-learned sample weighting for multi-exit networks (L2W-DEN, Han et al., ECCV 2022).

- `WeightNet`: per sample, the K exits' cross-entropies in, K weights in (0, 1) out. Its output layer
  starts at zero, so every weight starts at 0.5 and ``1 + ε(w − mean w)`` starts at exactly 1: the
  method begins as plain cross-entropy.
- `exit_distribution` and `assign_exits`: which exit a cascade at a target budget would hand each
  image. The rule is MSDNet's budgeted evaluation (Huang et al., ICLR 2018), which L2W-DEN trains for:
  the share of images leaving at exit k follows a geometric law p_k ∝ q^k whose expected cost,
  Σ p_k · cost_k, equals the budget (q found by bisection); exit k then takes the ``p_k · B`` most
  confident of the images still remaining, which is a threshold at a quantile of its confidences.
  Costs are each exit's cumulative FLOPs over the full model's (every earlier head evaluated), so
  ``budget`` is a fraction of the full model, as ``calibrate --budget 50%`` takes it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from edgeexit.models.multiexit import MultiExitNet


class WeightNet(nn.Module):
    """MLP: (B, K) per-exit losses -> (B, K) weights in (0, 1); hidden width 100 (the paper's)."""

    def __init__(self, num_exits: int, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_exits, hidden)
        self.out = nn.Linear(hidden, num_exits)
        nn.init.zeros_(self.out.weight)  # every weight 0.5 at the start: the first steps are plain CE
        nn.init.zeros_(self.out.bias)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(losses))))


def centred_weights(w: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``1 + ε(w − mean w)``, the mean over the batch for each exit: each exit's total weight stays
    the batch size (as in plain CE); only how it is spread over the images changes."""
    return 1.0 + epsilon * (w - w.mean(dim=0, keepdim=True))


def exit_costs(model: MultiExitNet) -> list[float]:
    """Each exit's cumulative FLOPs (every earlier head evaluated) as a fraction of the full model's."""
    from edgeexit.models import count_unit_cost, cumulative_exit_flops

    cum = cumulative_exit_flops(count_unit_cost(model))
    return [c / cum[-1] for c in cum]


def exit_distribution(costs: list[float], budget: float) -> list[float]:
    """Geometric exit shares p_k ∝ q^k with Σ p_k · cost_k = ``budget`` (clamped to what is reachable:
    everything at the first exit, or everything at the last)."""
    k = len(costs)
    if budget <= costs[0]:
        return [1.0] + [0.0] * (k - 1)
    if budget >= costs[-1]:
        return [0.0] * (k - 1) + [1.0]

    def shares(log_q: float) -> list[float]:
        m = max(j * log_q for j in range(k))
        e = [math.exp(j * log_q - m) for j in range(k)]
        s = sum(e)
        return [v / s for v in e]

    lo, hi = -30.0, 30.0  # the expected cost rises with q
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(p * c for p, c in zip(shares(mid), costs, strict=True)) < budget:
            lo = mid
        else:
            hi = mid
    return shares(0.5 * (lo + hi))


def assign_exits(confidence: torch.Tensor, shares: list[float]) -> torch.Tensor:
    """(B,) the exit each image leaves at: exit k takes the round(B · Σ_{j≤k} p_j) − (taken so far) most
    confident of the images still remaining; the rest reach the last exit."""
    b, k = confidence.shape
    exit_of = torch.full((b,), k - 1, dtype=torch.long, device=confidence.device)
    remaining = torch.ones(b, dtype=torch.bool, device=confidence.device)
    taken, cum = 0, 0.0
    for pos in range(k - 1):
        cum += shares[pos]
        n = min(int(round(cum * b)) - taken, int(remaining.sum()))
        if n <= 0:
            continue
        score = confidence[:, pos].masked_fill(~remaining, -math.inf)
        chosen = torch.topk(score, n).indices
        exit_of[chosen] = pos
        remaining[chosen] = False
        taken += n
    return exit_of
