"""Quantized linear and embedding modules, and their packed on-disk form.

``QuantLinear`` holds the deployed (folded) weight ``Q(W · 2^-s)`` dequantized in a buffer and
computes ``Q_ρ(x · 2^s) · Q(W · 2^-s)ᵀ + bias``: one per-tensor FP x FP (or INT x INT) matmul on
fake-quantized operands; ``simulate`` computes the unfolded reference ``Q_{ρ+s}(x) · (2^s ⊙ Q(W·2^-s))ᵀ``
that the search scored. The two agree because multiplying by 2^±s is exact in floating point.

Packed tensors (``packed_state``): 4-bit weights as two codes per byte (kernels/fp4.py nibble order),
8-bit weights one code per byte; FP codes with the per-row exponent bias (float32), INT codes as two's
complement with the per-row scale. ``QuantLinear.from_packed`` decodes them back bit-exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compression.fp4.formats import FPFormat, decode, encode, parse_format
from compression.fp4.search import LayerQuant, quantize_input, quantize_weight
from kernels.fp4 import pack_nibbles, unpack_nibbles

__all__ = ["QuantLinear", "QuantEmbedding", "layer_meta", "layer_from_meta"]


def layer_meta(lq: LayerQuant) -> dict:
    """JSON-able description of a LayerQuant (tensors go to the packed state)."""
    return {
        "method": lq.method,
        "w_bits": lq.w_bits,
        "w_format": lq.w_fmt.name if lq.w_fmt else "int",
        "a_bits": lq.a_bits,
        "a_format": (lq.a_fmt.name if lq.a_fmt else "int") if lq.a_bits else None,
        "a_bias": lq.a_bias,
        "a_zero": lq.a_zero,
        "a_shift": lq.a_shift is not None,
        "mse": lq.mse,
    }


def layer_from_meta(meta: dict, w_param: Tensor, a_shift: Optional[Tensor]) -> LayerQuant:
    w_fmt = None if meta["w_format"] == "int" else parse_format(meta["w_format"])
    a_fmt = None if meta["a_format"] in (None, "int") else parse_format(meta["a_format"])
    return LayerQuant(
        meta["method"],
        meta["w_bits"],
        w_fmt,
        w_param,
        a_bits=meta["a_bits"],
        a_fmt=a_fmt,
        a_bias=meta["a_bias"],
        a_zero=meta["a_zero"],
        a_shift=a_shift,
        mse=meta.get("mse", {}),
    )


class QuantLinear(nn.Module):
    def __init__(self, lq: LayerQuant, weight_q: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self.lq = lq
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q.float(), persistent=False)  # [out, in] deployed, dequantized
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, lq: LayerQuant) -> "QuantLinear":
        return cls(lq, quantize_weight(linear.weight.detach(), lq), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        a = quantize_input(x.float(), self.lq, folded=True)
        return F.linear(a, self.weight, self.bias).to(x.dtype)

    def unfolded_weight(self) -> Tensor:
        """``2^s ⊙ Q(W·2^-s)`` [out, in]: the weight as applied to the unshifted input."""
        if self.lq.a_shift is None:
            return self.weight
        return self.weight * torch.exp2(self.lq.a_shift.float())[None, :]

    def simulate(self, x: Tensor) -> Tensor:
        """The unfolded per-channel computation the search scored (for checks)."""
        a = quantize_input(x.float(), self.lq, folded=False)
        return F.linear(a, self.unfolded_weight(), self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        lq = self.lq
        act = "a16" if not lq.a_bits else f"a{lq.a_bits} {lq.a_fmt.name if lq.a_fmt else 'int'}"
        return (
            f"in={self.in_features}, out={self.out_features}, w{lq.w_bits} "
            f"{lq.w_fmt.name if lq.w_fmt else 'int'}, {act}{', shifted' if lq.a_shift is not None else ''}"
        )

    # -- packed form --------------------------------------------------------------------------------
    def codes(self) -> Tensor:
        lq = self.lq
        if lq.w_fmt is None:
            q = torch.round(self.weight / lq.w_param[:, None]).to(torch.int8)
            return (q.view(torch.uint8) & 0xF) if lq.w_bits == 4 else q.view(torch.uint8)
        return encode(self.weight, lq.w_fmt, lq.w_param[:, None])

    def packed_state(self) -> dict[str, Tensor]:
        codes = self.codes()
        out = {
            "qweight": pack_nibbles(codes) if self.lq.w_bits == 4 else codes,
            "w_param": self.lq.w_param.float().contiguous(),
        }
        if self.lq.a_shift is not None:
            out["a_shift"] = self.lq.a_shift.to(torch.int8)
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def from_packed(cls, meta: dict, state: dict[str, Tensor], in_features: int) -> "QuantLinear":
        shift = state.get("a_shift")
        lq = layer_from_meta(meta, state["w_param"].float(), None if shift is None else shift.to(torch.int32))
        codes = unpack_nibbles(state["qweight"], in_features) if lq.w_bits == 4 else state["qweight"]
        if lq.w_fmt is None:
            q = codes.to(torch.int32)
            if lq.w_bits == 4:
                q = torch.where(q >= 8, q - 16, q)
            else:
                q = codes.view(torch.int8).to(torch.int32)
            weight = q.float() * lq.w_param[:, None]
        else:
            weight = decode(codes, lq.w_fmt, lq.w_param[:, None])
        return cls(lq, weight, state.get("bias"))


class QuantEmbedding(nn.Module):
    """An embedding table quantized row by row (weight-only): FP codes plus one bias per row."""

    def __init__(self, fmt: FPFormat, row_bias: Tensor, weight_q: Tensor, padding_idx: Optional[int] = None):
        super().__init__()
        self.fmt, self.padding_idx = fmt, padding_idx
        self.register_buffer("row_bias", row_bias.float(), persistent=False)
        self.register_buffer("weight", weight_q.float(), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def packed_state(self) -> dict[str, Tensor]:
        codes = encode(self.weight, self.fmt, self.row_bias[:, None])
        return {"qweight": pack_nibbles(codes) if self.fmt.bits == 4 else codes, "w_param": self.row_bias}

    @classmethod
    def from_packed(cls, meta: dict, state: dict[str, Tensor], dim: int) -> "QuantEmbedding":
        fmt = parse_format(meta["w_format"])
        codes = unpack_nibbles(state["qweight"], dim) if fmt.bits == 4 else state["qweight"]
        return cls(fmt, state["w_param"], decode(codes, fmt, state["w_param"][:, None]), meta.get("padding_idx"))
