"""Round-to-nearest integer quantizers: the MinMax INT baselines and the optional quantization of
EoRA's low-rank factors. Pure torch.

- ``int_fake_quant_symmetric``: levels ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` times a scale (per tensor or
  broadcast, e.g. one per output channel); ``minmax_symmetric_scale`` maps max|x| to the top level.
- ``int_fake_quant_asymmetric``: ``(clamp(round(x/s) + z, 0, 2^b - 1) - z) · s`` with a zero point;
  ``minmax_asymmetric`` maps [min, max] (widened to contain 0) onto the 2^b levels.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Scale = Union[float, Tensor]

__all__ = ["int_fake_quant_symmetric", "minmax_symmetric_scale", "int_fake_quant_asymmetric", "minmax_asymmetric"]

_TINY = 1e-12


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 16:
        raise ValueError(f"integer quantization needs 2..16 bits, got {bits}")


def minmax_symmetric_scale(x: Tensor, bits: int, dim: int | None = None) -> Tensor:
    """Scale mapping max|x| (over ``dim``, kept; over everything when None) to level 2^(b-1) - 1."""
    _check_bits(bits)
    mx = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return mx.float().clamp_min(_TINY) / (2 ** (bits - 1) - 1)


def int_fake_quant_symmetric(x: Tensor, bits: int, scale: Scale) -> Tensor:
    _check_bits(bits)
    top = 2 ** (bits - 1) - 1
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (torch.clamp(torch.round(x.float() / s), -top, top) * s).to(x.dtype)


def minmax_asymmetric(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(scale, zero point) mapping [min(x, 0), max(x, 0)] onto 0 .. 2^b - 1 (per tensor)."""
    _check_bits(bits)
    lo = torch.clamp(x.min().float(), max=0.0)
    hi = torch.clamp(x.max().float(), min=0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(_TINY)
    return scale, torch.round(-lo / scale)


def int_fake_quant_asymmetric(x: Tensor, bits: int, scale: Scale, zero: Scale) -> Tensor:
    _check_bits(bits)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    z = torch.as_tensor(zero, dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(x.float() / s) + z, 0, 2**bits - 1)
    return ((q - z) * s).to(x.dtype)
