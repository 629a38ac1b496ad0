"""Weight pruning baselines for the compression pipeline (data-free, by magnitude).

- ``magnitude_mask(w, sparsity)``: unstructured; keeps the largest |w| of each output row, dropping
  ``round(sparsity · in)`` per row (per-row rather than per-layer, so no row is emptied).
- ``two_four_mask(w)``: 2:4 semi-structured sparsity (the NVIDIA sparse tensor core pattern): in every
  group of 4 consecutive input weights of a row, the 2 largest |w| stay. Needs ``in % 4 == 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["magnitude_mask", "two_four_mask", "prune_linears"]


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Bool mask [out, in]: True where the weight stays."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    drop = int(round(sparsity * w.shape[1]))
    mask = torch.ones_like(w, dtype=torch.bool)
    if drop:
        idx = w.abs().argsort(dim=1)[:, :drop]
        mask.scatter_(1, idx, False)
    return mask


def two_four_mask(w: Tensor) -> Tensor:
    """Bool mask [out, in] keeping the 2 largest |w| in each group of 4 along the input dimension."""
    out_f, in_f = w.shape
    if in_f % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_f}")
    groups = w.abs().reshape(out_f, in_f // 4, 4)
    keep = groups.argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


@torch.no_grad()
def prune_linears(model: nn.Module, names: list[str], pattern: str, sparsity: float = 0.5) -> dict[str, float]:
    """Zero weights of the named nn.Linear modules in place (``pattern`` "2:4" or "unstructured");
    returns each layer's achieved sparsity."""
    out = {}
    for name in names:
        lin = model.get_submodule(name)
        if pattern == "2:4":
            mask = two_four_mask(lin.weight)
        elif pattern == "unstructured":
            mask = magnitude_mask(lin.weight, sparsity)
        else:
            raise ValueError(f"pruning pattern {pattern!r}: expected '2:4' or 'unstructured'")
        lin.weight.mul_(mask.to(lin.weight.dtype))
        out[name] = 1.0 - float(mask.float().mean())
    return out
