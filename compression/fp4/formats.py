"""Floating-point ExMy formats with a real-valued exponent bias (LLM-FP4, Liu et al. 2023, §3.1).

A value with sign s, exponent field p and mantissa field m is ``(-1)^s · 2^(p-b) · (1 + m/2^M)`` for
p >= 1 and the subnormal ``(-1)^s · 2^(1-b) · (m/2^M)`` for p = 0. The bias b may be any real number
(one per tensor, or a tensor broadcastable to x, e.g. one per output channel), which sets the largest
magnitude ``Qmax = (2 - 2^-M) · 2^(2^E - 1 - b)`` (Eq. 3). No code is spent on inf/NaN: with E2M1
and b = 1 the magnitudes are exactly {0, 0.5, 1, 1.5, 2, 3, 4, 6} (the OCP FP4 set).

Quantization clips to ±Qmax, finds the binade ``p = max(1, floor(log2|x| + b))`` and rounds x to the
nearest multiple of ``2^(p - M - b)`` (ties to even). A code is ``sign << (E+M) | p << M | m``, one per
uint8; kernels/fp4_pack.py packs two 4-bit codes per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

Bias = Union[float, Tensor]

__all__ = [
    "FPFormat",
    "SUPPORTED_BITS",
    "formats_for_bits",
    "parse_format",
    "max_value",
    "bias_for_max",
    "fake_quant",
    "encode",
    "decode",
    "representable_values",
]


@dataclass(frozen=True)
class FPFormat:
    e_bits: int  # exponent bits (>= 1)
    m_bits: int  # mantissa bits (>= 0); one sign bit on top

    def __post_init__(self):
        if self.e_bits < 1 or self.m_bits < 0 or self.bits > 8:
            raise ValueError(
                f"unsupported floating-point format E{self.e_bits}M{self.m_bits}: need E >= 1, "
                f"M >= 0 and 1 + E + M <= 8 bits"
            )

    @property
    def bits(self) -> int:
        return 1 + self.e_bits + self.m_bits

    @property
    def name(self) -> str:
        return f"E{self.e_bits}M{self.m_bits}"

    def __str__(self) -> str:
        return self.name


# The E/M splits searched per bit width (sign bit included). E0 would be plain INT; E >= 6 at 8 bits
# wastes range on a tiny mantissa.
_FORMATS = {
    4: (FPFormat(3, 0), FPFormat(2, 1), FPFormat(1, 2)),
    8: (FPFormat(5, 2), FPFormat(4, 3), FPFormat(3, 4), FPFormat(2, 5)),
}
SUPPORTED_BITS = tuple(sorted(_FORMATS))


def formats_for_bits(bits: int) -> tuple[FPFormat, ...]:
    if bits not in _FORMATS:
        raise ValueError(f"floating-point quantization supports {', '.join(map(str, SUPPORTED_BITS))} bits, got {bits}")
    return _FORMATS[bits]


def parse_format(name: str) -> FPFormat:
    """'E2M1' -> FPFormat(2, 1)."""
    s = name.strip().upper()
    if not (s.startswith("E") and "M" in s):
        raise ValueError(f"format {name!r}: expected ExMy, e.g. E2M1")
    e, m = s[1:].split("M", 1)
    return FPFormat(int(e), int(m))


def _unit(bias: Bias, device=None) -> Tensor:
    """2^-b. Every value of the format is (a small integer) · 2^k · 2^-b with k an integer, so
    computing 2^-b once and scaling it by exact powers of two makes quantize, encode and decode agree
    to the bit. Computed in float64 and rounded to float32: float32 ``exp2`` on a CPU differs in the
    last bit between its vectorized and scalar paths, which depend on the tensor's size (the rows of
    a layer and of the same rows split off it got different units on an AVX2-only EPYC)."""
    return torch.exp2(-torch.as_tensor(bias, dtype=torch.float32, device=device).double()).float()


def max_value(fmt: FPFormat, bias: Bias) -> Tensor:
    """Qmax = (2 - 2^-M) · 2^(2^E - 1 - b)  (LLM-FP4 Eq. 3)."""
    return ((2.0 - 2.0**-fmt.m_bits) * 2.0 ** (2**fmt.e_bits - 1)) * _unit(bias)


def bias_for_max(fmt: FPFormat, maxval: Union[float, Tensor]) -> Tensor:
    """The real-valued bias whose Qmax equals ``maxval`` (Eq. 3 solved for b); maxval must be > 0."""
    mx = torch.as_tensor(maxval, dtype=torch.float32)
    return 2.0**fmt.e_bits - 1.0 - torch.log2(mx) + math.log2(2.0 - 2.0**-fmt.m_bits)


def _clip_binade(x: Tensor, fmt: FPFormat, bias: Bias) -> tuple[Tensor, Tensor, Tensor]:
    """(clipped x, p, scale) in float32: p = max(1, floor(log2|x| + b)), scale = 2^(p-M) · 2^-b."""
    xf = x.float()
    b = torch.as_tensor(bias, dtype=torch.float32, device=x.device)
    unit = _unit(b)
    qmax = ((2.0 - 2.0**-fmt.m_bits) * 2.0 ** (2**fmt.e_bits - 1)) * unit
    xc = torch.maximum(torch.minimum(xf, qmax), -qmax)
    p = torch.clamp(torch.floor(torch.log2(xc.abs()) + b), min=1.0)  # log2(0) = -inf -> p = 1
    return xc, p, torch.exp2(p - fmt.m_bits) * unit


def fake_quant(x: Tensor, e_bits: int, m_bits: int, bias: Bias) -> Tensor:
    """Quantize-dequantize ``x`` to ExMy with exponent bias ``bias``; returns x's dtype and shape.

    The arithmetic runs in float32 (a bf16 input is upcast), so results do not depend on the input
    dtype beyond the input's own rounding.
    """
    xc, _, scale = _clip_binade(x, FPFormat(e_bits, m_bits), bias)
    return (torch.round(xc / scale) * scale).to(x.dtype)


def encode(x: Tensor, fmt: FPFormat, bias: Bias) -> Tensor:
    """Codes (uint8, ``sign << (E+M) | exponent << M | mantissa``) of the quantized ``x``."""
    xc, p, scale = _clip_binade(x, fmt, bias)
    n = torch.round(xc.abs() / scale)  # in [0, 2^(M+1)]: 2^(M+1) means it rounded up into the next binade
    top = n >= 2 ** (fmt.m_bits + 1)
    p = torch.where(top, p + 1, p)
    n = torch.where(top, torch.full_like(n, 2**fmt.m_bits), n)
    subnormal = n < 2**fmt.m_bits  # only possible in the first binade
    exp_field = torch.where(subnormal, torch.zeros_like(p), p)
    mant = torch.where(subnormal, n, n - 2**fmt.m_bits)
    sign = (xc < 0) & (n > 0)  # no negative zero: -0 and +0 share code 0
    code = (
        (sign.to(torch.int32) << (fmt.e_bits + fmt.m_bits))
        | (exp_field.to(torch.int32) << fmt.m_bits)
        | mant.to(torch.int32)
    )
    return code.to(torch.uint8)


def decode(codes: Tensor, fmt: FPFormat, bias: Bias, dtype: torch.dtype = torch.float32) -> Tensor:
    """Values of ``codes`` under ``bias`` (inverse of :func:`encode` on quantized values)."""
    c = codes.to(torch.int32)
    mant = (c & (2**fmt.m_bits - 1)).float()
    exp_field = ((c >> fmt.m_bits) & (2**fmt.e_bits - 1)).float()
    sign = 1.0 - 2.0 * ((c >> (fmt.e_bits + fmt.m_bits)) & 1).float()
    unit = _unit(bias, codes.device)
    normal = exp_field > 0
    mag = (
        torch.where(normal, (2**fmt.m_bits + mant) * torch.exp2(exp_field - fmt.m_bits), mant * 2.0 ** (1 - fmt.m_bits))
        * unit
    )
    return (sign * mag).to(dtype)


def representable_values(fmt: FPFormat, bias: float) -> Tensor:
    """All non-negative magnitudes of the format, sorted (for tests and docs)."""
    codes = torch.arange(2 ** (fmt.e_bits + fmt.m_bits), dtype=torch.uint8)
    return torch.unique(decode(codes, fmt, bias))
