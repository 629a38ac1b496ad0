"""DoRA math (Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024). Pure torch.

The merged weight (paper Eq. 5): ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_c`` with the norm taken per
output row over the input dimension. The trainer uses peft's DoRA layers for now (an in-project,
faster DoRA is a separate issue); this module holds the math that weight sync relies on.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dora_merged_weight(w0: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scale: float) -> Tensor:
    """``[out, in], [r, in], [out, r], [out] -> [out, in]``, computed in float32 (or wider)."""
    dtype = torch.promote_types(w0.dtype, torch.float32)
    w = w0.to(dtype) + scale * (lora_b.to(dtype) @ lora_a.to(dtype))  # [out, in]
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)  # [out, 1]
    return (magnitude.to(dtype).unsqueeze(1) * w / norm).to(w0.dtype)
