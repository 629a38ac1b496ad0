"""Deployment targets: which of LLM-FP4's weight formats and per-row scales an inference engine can
store, so that the search (compression.fp4.search) only picks what the export writes unchanged.

Every 4-bit weight LLM-FP4 finds is ``code value × u``, with ``u = 2^-b`` the row's unit (b its real
exponent bias, compression.fp4.formats). The targets store it as:

==============  ==========  =============================================  ==============================
target          format      scale stored                                   constraint on u = 2^-b
==============  ==========  =============================================  ==============================
``vllm-w4a16``  E1M2        INT4 symmetric, per channel: levels -7..7      ``2^-1 u`` in the export dtype
                            times one 16-bit scale per row (E1M2's grid    (bf16: 8 significant bits)
                            *is* the INT4 grid: ``k/4 · 2u``, k = 0..7)
``nvfp4``       E2M1        FP8-E4M3 scale per group of 16 divided by one  ``2u`` with 4 significant bits
                            FP32 global scale per layer (a power of two    (E4M3's 3 mantissa bits)
                            here, so the E4M3 grid is the same at any
                            layer scale)
``mxfp4``       E2M1        E8M0 (power of two) scale per group of 32      ``u`` a power of two: b integer
``sim``         any         (the research path: no engine stores it)       none
==============  ==========  =============================================  ==============================

A row's scale is repeated over its groups (NVFP4, MXFP4): LLM-FP4 searches one bias per output row.
Activation quantization is not part of any target's stored form: on the engine W4A16 and weight-only
NVFP4 / MXFP4 read 16-bit activations, and Blackwell's NVFP4 W4A4 quantizes them per block at run time.
The search's per-channel activation pre-shifts are folded into the layer before at export
(compression.export).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from compression.fp4.formats import FPFormat

__all__ = ["Target", "TARGETS", "SIM", "get_target", "snap_unit_bias", "dtype_significant_bits"]


@dataclass(frozen=True)
class Target:
    name: str
    w_formats: Optional[tuple[FPFormat, ...]]  # None: every format of the bit width
    unit_bits: Optional[int]  # significant bits the row unit 2^-b keeps (1: a power of two); None: any
    group_size: Optional[int]  # the stored scale's group along the input (None: one per row)
    in_multiple: int  # input features must be a multiple of this (the group, or the engine kernel's tile)
    out_multiple: int  # output features likewise
    served_on_cpu: bool  # vLLM serves it on this kind of CPU
    describe: str

    def snap(self, bias: Tensor) -> Tensor:
        """The nearest bias whose unit the target stores exactly."""
        return bias if self.unit_bits is None else snap_unit_bias(bias, self.unit_bits)

    def for_dtype(self, dtype: torch.dtype) -> "Target":
        """The target with its scale stored in ``dtype`` (vllm-w4a16 keeps the export dtype's scale)."""
        if self.name != "vllm-w4a16":
            return self
        return dataclasses.replace(self, unit_bits=dtype_significant_bits(dtype))


def snap_unit_bias(bias: Tensor, bits: int) -> Tensor:
    """Round ``2^-bias`` to ``bits`` significant bits (nearest, ties to even) and return its bias."""
    unit = torch.exp2(-bias.double())
    e = torch.floor(torch.log2(unit))
    step = torch.exp2(e - (bits - 1))
    snapped = torch.round(unit / step) * step
    return (-torch.log2(snapped)).to(bias.dtype)


_E1M2, _E2M1 = FPFormat(1, 2), FPFormat(2, 1)
TARGETS = {
    "sim": Target("sim", None, None, None, 1, 1, False, "simulated (any LLM-FP4 format; no engine serves it)"),
    "vllm-w4a16": Target(
        "vllm-w4a16",
        (_E1M2,),
        None,
        None,
        32,  # vLLM's CPU W4A16 kernel (CPUWNA16) tiles inputs and outputs by 32
        32,
        True,
        "INT4 W4A16 per channel (compressed-tensors pack-quantized; vLLM: CPUWNA16 on CPUs, Marlin on GPUs)",
    ),
    "nvfp4": Target(
        "nvfp4",
        (_E2M1,),
        4,
        16,
        16,
        1,
        False,
        "NVFP4 (compressed-tensors nvfp4-pack-quantized: E2M1, E4M3 group-16 scales, FP32 global scale)",
    ),
    "mxfp4": Target(
        "mxfp4",
        (_E2M1,),
        1,
        32,
        32,
        1,
        False,
        "MXFP4 (compressed-tensors mxfp4-pack-quantized: E2M1, E8M0 group-32 scales)",
    ),
}

SIM = TARGETS["sim"]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target {name!r}: expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def dtype_significant_bits(dtype: torch.dtype) -> int:
    """Significant bits of a float dtype (bf16 8, fp16 11, fp32 24)."""
    return int(round(-math.log2(torch.finfo(dtype).eps))) + 1
