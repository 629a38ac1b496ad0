"""Weight oscillation metrics (Nagel et al. 2022, as used by OFQ §3): per training step, over every
quantized weight free to move (CGA's frozen ones left out),
- oscillation rate: the share of weights whose integer level changed in the direction opposite to its
  previous change (a flip back);
- near-boundary share: the share whose latent value lies within ``br`` steps of a rounding boundary.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.ofq.modules import weight_quantizers
from compression.ofq.quantizers import boundary_distance

__all__ = ["OscillationTracker"]


class OscillationTracker:
    def __init__(self, model: nn.Module, br: float = 0.1):
        self.model, self.br = model, br
        self.prev_code: dict[str, torch.Tensor] = {}
        self.prev_dir: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, frozen: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Call after each optimizer step; returns this step's oscillation rate and near-boundary share,
        over the weights free to move (``frozen``: CGA's masks, name -> bool per latent weight)."""
        flips = near = total = 0
        for name, quant, _, read in weight_quantizers(self.model):
            w = read().detach()
            code = quant.codes(w).to(torch.int32)
            free = torch.ones_like(code, dtype=torch.bool)
            if frozen is not None and name in frozen:
                free = ~frozen[name].reshape(code.shape)
            near += int(((boundary_distance(quant.latent(w)) <= self.br) & free).sum())
            total += int(free.sum())
            if name in self.prev_code:
                change = torch.sign(code - self.prev_code[name])
                flips += int(((change != 0) & (change == -self.prev_dir[name]) & free).sum())
                self.prev_dir[name] = torch.where(change != 0, change, self.prev_dir[name])
            else:
                self.prev_dir[name] = torch.zeros_like(code)
            self.prev_code[name] = code
        return {"oscillation_rate": flips / max(total, 1), "near_boundary": near / max(total, 1)}
