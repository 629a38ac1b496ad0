"""OFQ's quantizers (Liu et al., ICML 2023, "Oscillation-free Quantization for Low-bit Vision
Transformers", §4.1) and the LSQ baseline (Esser et al., ICLR 2020). Pure torch.

- StatsQ (weights): per output row a scale ``s = 2·mean|W|`` computed from the weights themselves (no
  gradient), ``W_c = clamp(W/s, -1, 1-1e-6)`` and ``Q(W) = s·(round(W_c·n - 0.5) + 0.5)/n`` with
  ``n = 2^(b-1)``: 2^b symmetric half-integer levels, no zero level. Straight-through gradient.
- LSQ: a learnable step (per tensor, or per channel of the last dimension), levels
  ``[-2^(b-1), 2^(b-1)-1]`` (signed) or ``[0, 2^b-1]`` (unsigned), step gradient scaled by
  ``1/sqrt(Qp · elements per step)``; initialized on the first batch it sees to ``2·mean|x|/sqrt(Qp)``
  (``4·`` for unsigned inputs, as the OFQ release).

Every quantizer exposes ``latent(w)``: the continuous coordinate that is rounded, so oscillation
tracking and CGA measure the distance to a rounding boundary the same way for both.

Deviations: the release's LSQ keeps one step per *token* for [B, N, C] inputs; here a step is per
tensor or per channel (token counts change with the image size). The release's learnable
pre/post-quantization biases around LSQ are left out. StatsQ's scale can be frozen (``freeze_scale``),
which CGA does so that a frozen latent weight also keeps its quantized value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["round_ste", "StatsQ", "LSQ", "boundary_distance"]


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def boundary_distance(latent: Tensor) -> Tensor:
    """Distance (in quantization steps) from each latent value to the nearest rounding boundary:
    0 at a boundary (x.5), 0.5 at a level."""
    return 0.5 - (latent - torch.round(latent)).abs()


class StatsQ(nn.Module):
    """StatsQ weight quantizer (OFQ §4.1) for a [out, ...] weight; per-row scale ``2·mean|W|``."""

    def __init__(self, bits: int):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"StatsQ needs 1..8 bits, got {bits}")
        self.bits = bits
        self.register_buffer("frozen_scale", None, persistent=False)

    @property
    def n(self) -> int:
        return 2 ** (self.bits - 1)

    def scale(self, w: Tensor) -> Tensor:
        if self.frozen_scale is not None:
            return self.frozen_scale
        return (2 * w.detach().abs().flatten(1).mean(dim=1)).clamp_min(1e-8).view(-1, *([1] * (w.dim() - 1)))

    def freeze_scale(self, w: Tensor) -> None:
        self.frozen_scale = self.scale(w).clone()

    def latent(self, w: Tensor) -> Tensor:
        """``clamp(W/s)·n - 0.5``, held inside ``[-n, n-1]``: rounding it gives the level index. The hold
        leaves every rounding unchanged but puts a clipped weight at its level's centre rather than on
        the clip edge (which is not a rounding boundary), so it never counts as oscillation-prone."""
        return torch.clamp(torch.clamp(w / self.scale(w), -1.0, 1.0 - 1e-6) * self.n - 0.5, -self.n, self.n - 1)

    def codes(self, w: Tensor) -> Tensor:
        return torch.round(self.latent(w.detach())).to(torch.int16)

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale(w)
        wq = s * (torch.round(self.latent(w.detach())) + 0.5) / self.n
        return (wq - w).detach() + w  # straight-through over the whole range, as the release


class LSQ(nn.Module):
    """Learned step size quantization. ``channels``: one step per channel of the last dim (0 = one step)."""

    def __init__(self, bits: int, signed: bool = True, channels: int = 0, dim: int = -1):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"LSQ needs 2..8 bits, got {bits}")
        self.bits, self.signed, self.dim = bits, signed, dim
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step = nn.Parameter(torch.ones(max(channels, 1)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.per_channel = channels > 0
        self._ready = False  # the buffer's value known to be True: no device read per forward after that

    def _shape(self, x: Tensor) -> tuple:
        if not self.per_channel:
            return ()
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return tuple(shape)

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        factor = 2.0 if self.signed else 4.0
        if self.per_channel:
            dims = [d for d in range(x.dim()) if d != self.dim % x.dim()]
            mean = x.abs().mean(dim=dims)
        else:
            mean = x.abs().mean().reshape(1)
        self.step.copy_((factor * mean / math.sqrt(self.qp)).clamp_min(1e-5))
        self.initialized.fill_(True)

    def latent(self, x: Tensor) -> Tensor:
        s = self.step.detach().abs().clamp_min(1e-8)
        return x / (s.view(self._shape(x)) if self.per_channel else s)

    def codes(self, x: Tensor) -> Tensor:
        return torch.clamp(torch.round(self.latent(x.detach())), -self.qn, self.qp).to(torch.int16)

    def forward(self, x: Tensor) -> Tensor:
        if not self._ready:
            if not bool(self.initialized):  # a read of the device's value, once (a loaded state may be set)
                self._init(x)
            self._ready = True
        per_step = x.numel() / self.step.numel()
        g = 1.0 / math.sqrt(self.qp * per_step)
        s = self.step.abs().clamp_min(1e-8)
        s = (s - s * g).detach() + s * g  # gradient scaled by g, value unchanged
        if self.per_channel:
            s = s.view(self._shape(x))
        return round_ste(torch.clamp(x / s, -self.qn, self.qp)) * s
