"""Confidence-guided annealing (OFQ §4.3): over the last epochs of QAT, the weights the quantizer is
confident about are frozen and the oscillating ones keep training as the learning rate anneals. Rule
"release" (the default), as the authors' code does it (``freeze_outside_boundary_weight_idx``): before
every optimizer step, each weight whose latent value lies *beyond* ``br`` quantization steps of a rounding
boundary is frozen (the mask recomputed every step from the current weights), and the near-boundary ones
train. A frozen weight's gradient is zeroed before the step and its value restored after it (so neither
momentum nor decoupled weight decay moves it). StatsQ's scales are frozen at the start, so a frozen
weight also keeps its quantized value; QKR's ``Wq·Wk`` becomes a parameter of its own (``merge_qk``) so
its entries are frozen directly.

Rule "near" keeps the earlier reading of the paper's text: freeze (cumulatively) the weights *within*
``br`` of a boundary, the oscillating ones themselves, which makes their oscillation zero by construction.

Deviation from the release: its per-weight mask in the quantizer only touches a detached tensor and its
freezing loop skips the q/k layers, so Wq·Wk never freezes (fixed here, and tested).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from compression.ofq.modules import QKRAttention, weight_quantizers
from compression.ofq.quantizers import StatsQ, boundary_distance

__all__ = ["CGA"]


class CGA:
    def __init__(self, model: nn.Module, br: float, rule: Literal["release", "near"] = "release"):
        if not 0 < br < 0.5:
            raise ValueError(f"CGA boundary range must lie in (0, 0.5) steps, got {br}")
        if rule not in ("release", "near"):
            raise ValueError(f"CGA rule must be 'release' or 'near', got {rule!r}")
        self.model, self.br, self.rule = model, br, rule
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
        """The frozen weights from the current ones (call before every step): "release" freezes exactly those
        beyond ``br`` of a boundary, "near" adds those within it to the ones already frozen. Returns the
        frozen share."""
        frozen = total = 0
        for name, quant, param, read in weight_quantizers(self.model):
            dist = boundary_distance(quant.latent(read().detach())).view_as(param)
            if self.rule == "release":
                self.masks[name] = dist > self.br
            else:
                self.masks[name] |= dist <= self.br
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
