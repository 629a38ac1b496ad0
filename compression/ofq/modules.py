"""Quantized ViT modules and the swap into transformers' ViT / DeiT (OFQ §4, LSQ baseline).

- ``QLinear``: a linear layer whose weight goes through StatsQ (OFQ) or LSQ (baseline) and whose input
  goes through LSQ (signed; unsigned for fc2's input, which follows GELU... see ``quantize_vit``).
- ``QKRAttention`` (OFQ's query-key reparameterization, §4.2): per head the bilinear form
  ``M_h = W'_qᵀ W'_k`` [(C+1), (C+1)] is quantized as one matrix (StatsQ, per row), with the q/k biases
  kept as an extra input column ``x' = [Q(x), 1]`` (the release drops them; this keeps the swapped
  model's function at the start of QAT). Logits ``x'_n M_h x'_mᵀ`` are computed as ``t = x' M_h`` (its
  own LSQ) then ``t · x'ᵀ``; softmax probabilities get an unsigned LSQ; v and o are QLinear.
  ``merge_qk()`` turns the product into a parameter of its own, so CGA can freeze entries of
  ``Wq·Wk`` themselves (the release's mask never reaches them).
- ``LSQAttention``: the baseline: q, k, v, o as LSQ QLinear, and LSQ on q, k and the probabilities.

Patch embedding, LayerNorms, the classifier and the softmax arithmetic stay in full precision.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compression.ofq.quantizers import LSQ, StatsQ

__all__ = ["QLinear", "QKRAttention", "LSQAttention", "quantize_vit", "weight_quantizers"]


class QLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, method: str, signed_input: bool = True):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.wq = StatsQ(w_bits) if method == "ofq" else LSQ(w_bits, signed=True, channels=linear.out_features, dim=0)
        self.aq = LSQ(a_bits, signed=signed_input)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.aq(x), self.wq(self.weight), self.bias)


class QKRAttention(nn.Module):
    def __init__(self, attn: nn.Module, heads: int, w_bits: int, a_bits: int):
        super().__init__()
        self.heads = heads
        self.head_dim = attn.q_proj.out_features // heads
        self.scaling = self.head_dim**-0.5

        def augmented(lin: nn.Linear) -> Tensor:  # [H, D, C+1]: weight with its bias as the last column
            b = (
                lin.bias
                if lin.bias is not None
                else torch.zeros(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype)
            )
            return torch.cat([lin.weight.detach(), b.detach()[:, None]], dim=1).view(heads, self.head_dim, -1).clone()

        self.wq = nn.Parameter(augmented(attn.q_proj))
        self.wk = nn.Parameter(augmented(attn.k_proj))
        self.qk = None  # [H, C+1, C+1] once merge_qk() ran
        self.mq = StatsQ(w_bits)
        self.xq = LSQ(a_bits, signed=True)
        self.tq = LSQ(a_bits, signed=True)
        self.pq = LSQ(a_bits, signed=False)
        self.v_proj = QLinear(attn.v_proj, w_bits, a_bits, "ofq")
        self.o_proj = QLinear(attn.o_proj, w_bits, a_bits, "ofq")

    def qk_product(self) -> Tensor:
        """``M_h = W'_qᵀ W'_k`` per head: [H, C+1, C+1] (flattened to rows for the per-row StatsQ scale)."""
        return self.qk if self.qk is not None else self.wq.transpose(1, 2) @ self.wk

    @torch.no_grad()
    def merge_qk(self) -> None:
        """Make the product a parameter (QKR's matrix is then trained, and frozen, entry by entry)."""
        if self.qk is None:
            self.qk = nn.Parameter(self.qk_product().detach().clone())
            self.wq.requires_grad_(False)
            self.wk.requires_grad_(False)

    def quantized_qk(self) -> Tensor:
        m = self.qk_product()  # [H, C1, C1]
        h, c1, _ = m.shape
        return self.mq(m.reshape(h * c1, c1)).view(h, c1, c1)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        b, n, _ = hidden_states.shape
        x = self.xq(hidden_states)  # [B, N, C]
        x1 = torch.cat([x, x.new_ones(b, n, 1)], dim=-1)  # [B, N, C+1]
        t = self.tq(torch.einsum("bnc,hcd->bhnd", x1, self.quantized_qk()))  # [B, H, N, C+1]
        logits = torch.einsum("bhnd,bmd->bhnm", t, x1) * self.scaling  # [B, H, N, N]
        if attention_mask is not None:
            logits = logits + attention_mask
        probs = self.pq(logits.softmax(dim=-1))
        v = self.v_proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out), probs


class LSQAttention(nn.Module):
    def __init__(self, attn: nn.Module, heads: int, w_bits: int, a_bits: int):
        super().__init__()
        self.heads = heads
        self.head_dim = attn.q_proj.out_features // heads
        self.scaling = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            QLinear(getattr(attn, n), w_bits, a_bits, "lsq") for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        self.qq, self.kq = LSQ(a_bits, signed=True), LSQ(a_bits, signed=True)
        self.pq = LSQ(a_bits, signed=False)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        b, n, _ = hidden_states.shape

        def heads(t):
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q = self.qq(heads(self.q_proj(hidden_states)))
        k = self.kq(heads(self.k_proj(hidden_states)))
        v = heads(self.v_proj(hidden_states))
        logits = q @ k.transpose(-1, -2) * self.scaling
        if attention_mask is not None:
            logits = logits + attention_mask
        probs = self.pq(logits.softmax(dim=-1))
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, n, -1)), probs


def _layers(model: nn.Module) -> list[nn.Module]:
    out = [m for m in model.modules() if hasattr(m, "attention") and hasattr(m, "mlp")]
    if not out:
        raise ValueError(
            f"{type(model).__name__}: no transformer layers with .attention and .mlp "
            f"(ViTForImageClassification / DeiTForImageClassification expected)"
        )
    return out


def quantize_vit(model: nn.Module, bits: int, method: str) -> nn.Module:
    """Swap quantized modules into a ViT / DeiT classifier in place (weights and activations at ``bits``).
    ``method``: "ofq" (StatsQ + QKR) or "lsq" (the baseline)."""
    if method not in ("ofq", "lsq"):
        raise ValueError(f"QAT method {method!r}: expected 'ofq' or 'lsq'")
    layers = _layers(model)
    heads = model.config.num_attention_heads
    for layer in layers:
        attn = layer.attention
        layer.attention = (
            QKRAttention(attn, heads, bits, bits) if method == "ofq" else LSQAttention(attn, heads, bits, bits)
        )
        layer.mlp.fc1 = QLinear(layer.mlp.fc1, bits, bits, method)
        layer.mlp.fc2 = QLinear(layer.mlp.fc2, bits, bits, method, signed_input=True)  # GELU output dips below 0
    return model


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter, callable]]:
    """(name, quantizer, latent parameter, getter of the tensor the quantizer reads) for every quantized weight."""
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            yield f"{name}.weight", mod.wq, mod.weight, (lambda m=mod: m.weight)
        elif isinstance(mod, QKRAttention):
            if mod.qk is not None:
                h, c1, _ = mod.qk.shape
                yield f"{name}.qk", mod.mq, mod.qk, (lambda m=mod, h=h, c1=c1: m.qk.reshape(h * c1, c1))
            else:
                yield f"{name}.qk", mod.mq, None, (lambda m=mod: m.qk_product().reshape(-1, m.qk_product().shape[-1]))
