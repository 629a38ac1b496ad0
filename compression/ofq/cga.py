"""Confidence-guided annealing (OFQ §4.3): over the last epochs of QAT, weights whose latent value lies
within ``br`` quantization steps of a rounding boundary are frozen: their gradient is zeroed before
the optimizer step and their value restored after it (so neither momentum nor decoupled weight
decay moves them). StatsQ's scales are frozen at the start, so a frozen weight also keeps its
quantized value; QKR's ``Wq·Wk`` becomes a parameter of its own (``merge_qk``) so its entries are
frozen directly.

Deviations from the release: its per-weight mask in the quantizer only touches a detached tensor and
its freezing loop skips the q/k layers, so Wq·Wk never freezes (fixed here, and tested); the release
also freezes the weights *away from* boundaries and leaves near-boundary ones training, where this
follows the issue's (and the paper's text) definition: freeze the ones that oscillate. A weight, once
frozen, stays frozen (the mask only grows over the annealing epochs).
"""

from __future__ import annotations

import torch
from torch import nn

from compression.ofq.modules import QKRAttention, weight_quantizers
from compression.ofq.quantizers import StatsQ, boundary_distance

__all__ = ["CGA"]


class CGA:
    def __init__(self, model: nn.Module, br: float):
        if not 0 < br < 0.5:
            raise ValueError(f"CGA boundary range must lie in (0, 0.5) steps, got {br}")
        self.model, self.br = model, br
        for mod in model.modules():
            if isinstance(mod, QKRAttention):
                mod.merge_qk()
        self.masks: dict[str, torch.Tensor] = {}  # True = frozen, per latent parameter
        self.params: dict[str, nn.Parameter] = {}
        for name, quant, param, read in weight_quantizers(model):
            if isinstance(quant, StatsQ):
                quant.freeze_scale(read().detach())
            self.params[name] = param
            self.masks[name] = torch.zeros_like(param, dtype=torch.bool)
        self.saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update_masks(self) -> float:
        """Freeze (additionally) every weight now within ``br`` of a boundary; returns the frozen share."""
        frozen = total = 0
        for name, quant, param, read in weight_quantizers(self.model):
            near = boundary_distance(quant.latent(read().detach())) <= self.br
            self.masks[name] |= near.view_as(param)
            frozen += int(self.masks[name].sum())
            total += param.numel()
        return frozen / max(total, 1)

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero frozen weights' gradients and remember their values (call between backward and step)."""
        for name, p in self.params.items():
            m = self.masks[name]
            if p.grad is not None:
                p.grad.masked_fill_(m, 0.0)
            self.saved[name] = p.detach()[m].clone()

    @torch.no_grad()
    def after_step(self) -> None:
        """Put frozen weights back (undoing decoupled weight decay and momentum)."""
        for name, p in self.params.items():
            p.data[self.masks[name]] = self.saved[name]
