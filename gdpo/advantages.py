"""Advantage estimators for group-sampled RL: GRPO and GDPO, plus conditioned rewards. Torch only.

Rewards are a float tensor ``[N, K]``: N samples, K reward functions. The samples of one prompt are
contiguous groups of ``group_size``. NaN marks a sample a reward function could not score.

Deviations from the papers, all about missing data (the papers assume every reward scores every
sample):
- NaN rewards are left out of every mean and std. A NaN entry contributes 0 to the weighted sum
  (GRPO) or its normalized term 0 (GDPO); a sample every reward left NaN gets advantage exactly 0
  and is left out of the batch statistics.
- A group whose (non-NaN) values of a reward are all equal gets exactly 0 for that reward instead
  of ``0 / (0 + eps)`` rounding noise.
- Standard deviations are the unbiased (n - 1) estimate, as in DeepSeekMath's GRPO and TRL.

GDPO is invariant to a positive rescaling of any one reward exactly when eps = 0, and up to
O(eps / std) otherwise; in a batch whose summed z-scores all but cancel (every group's rewards
trade off exactly), the final batch normalization magnifies that O(eps) residue.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["grpo_advantages", "gdpo_advantages", "apply_conditions", "zero_variance_groups"]


def _check(rewards: Tensor, group_size: int, weights: Optional[Sequence[float] | Tensor]) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    n, k = rewards.shape
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"N={n} samples do not split into groups of group_size={group_size}")
    w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have K={k} entries, got shape {tuple(w.shape)}")
    return w


def _masked_stats(x: Tensor, valid: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of x over `dim`, counting only `valid` entries (0 where undefined)."""
    count = valid.sum(dim, keepdim=True)
    xs = torch.where(valid, x, torch.zeros_like(x))
    mean = xs.sum(dim, keepdim=True) / count.clamp(min=1)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim, keepdim=True)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean, std


def _normalize(x: Tensor, valid: Tensor, dim: int, eps: float, scale: bool = True) -> Tensor:
    """(x - mean) / (std + eps) along `dim` over valid entries; 0 where invalid or constant."""
    mean, std = _masked_stats(x, valid, dim)
    centered = x - mean
    if scale:
        centered = centered / (std + eps)
    constant = std <= 1e-12 * (1.0 + mean.abs())
    return torch.where(valid & ~constant, centered, torch.zeros_like(centered))


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    weights=None,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> Tensor:
    """GRPO (DeepSeekMath, Shao et al. 2024, Eq. 3 outcome supervision): ``A = (r - mean_g)/(std + eps)``
    on the weighted reward sum ``r = Σ_k w_k r_k``.

    ``scale``: "group" divides by the group std (GRPO), "batch" by the batch std (REINFORCE++-style),
    "none" only centres (Dr. GRPO, Liu et al. 2025). ``[N, K] -> [N]``.
    """
    w = _check(rewards, group_size, weights)
    r = rewards.to(torch.float64)  # [N, K]
    scored = ~torch.isnan(r)  # [N, K]
    any_scored = scored.any(1)  # [N]
    total = torch.where(scored, r, torch.zeros_like(r)) @ w  # [N]
    grouped = total.view(-1, group_size)  # [G, group_size]
    valid = any_scored.view(-1, group_size)
    adv = _normalize(grouped, valid, dim=1, eps=eps, scale=(scale == "group")).view(-1)  # [N]
    if scale == "batch":
        _, std = _masked_stats(adv, any_scored, dim=0)
        adv = adv / (std + eps)
    return torch.where(any_scored, adv, torch.zeros_like(adv)).to(rewards.dtype)


def gdpo_advantages(rewards: Tensor, group_size: int, weights=None, eps: float = 1e-4) -> Tensor:
    """GDPO (Group reward-Decoupled normalization, arXiv 2601.05242, Eqs. 4-6).

    Each reward is z-scored within its group, ``A_k = (r_k - mean_k)/(std_k + eps)``; the weighted
    sum ``A = Σ_k w_k A_k`` is then normalized over the whole batch, per sample:
    ``(A - mean_B)/(std_B + eps)``. ``[N, K] -> [N]``.
    """
    w = _check(rewards, group_size, weights)
    n, k = rewards.shape
    r = rewards.to(torch.float64).view(-1, group_size, k)  # [G, group_size, K]
    scored = ~torch.isnan(r)
    per_reward = _normalize(torch.nan_to_num(r), scored, dim=1, eps=eps)  # [G, group_size, K]
    summed = (per_reward @ w).view(n)  # [N]
    any_scored = scored.view(n, k).any(1)  # [N]
    adv = _normalize(summed, any_scored, dim=0, eps=eps)
    return adv.to(rewards.dtype)


def apply_conditions(rewards: Tensor, conditions: Sequence[Optional[tuple[int, float]]]) -> Tensor:
    """Conditioned rewards (GDPO paper, Eq. 8) on raw rewards, before any normalization.

    ``conditions[k] = (j, t)`` pays reward k only where reward j reaches threshold t
    (``r_j >= t``), else 0; ``None`` leaves reward k as it is. Where the conditioning reward is NaN
    the conditioned reward becomes NaN too (it cannot be decided). ``[N, K] -> [N, K]``.
    """
    if len(conditions) != rewards.shape[1]:
        raise ValueError(f"need one condition entry per reward column ({rewards.shape[1]}), got {len(conditions)}")
    out = rewards.clone()
    for k, cond in enumerate(conditions):
        if cond is None:
            continue
        j, threshold = cond
        if j == k:
            raise ValueError(f"reward {k} cannot be conditioned on itself")
        gate = rewards[:, j]
        paid = torch.where(gate >= threshold, rewards[:, k], torch.zeros_like(gate))
        out[:, k] = torch.where(torch.isnan(gate), torch.full_like(gate, float("nan")), paid)
    return out


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[N, K] -> [G, K]`` bool: True where a group's scored values of reward k are all equal."""
    r = rewards.view(-1, group_size, rewards.shape[1])
    scored = ~torch.isnan(r)
    lo = torch.where(scored, r, torch.full_like(r, float("inf"))).amin(1)
    hi = torch.where(scored, r, torch.full_like(r, float("-inf"))).amax(1)
    return ~(hi > lo)
