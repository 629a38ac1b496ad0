"""DoRA row norm ``‖W0 + s·BA‖`` per output row, without an out x in matrix in memory.

Two ways, one answer (float32 ``[out]``):
- :func:`dora_row_norm_reference` (torch, any device): cross terms
  ``‖W0_i‖² + 2s·(W0Aᵀ)_i·B_i + s²·B_i(AAᵀ)B_iᵀ``; reads W0 twice, costs ``r·in·out`` flops, and loses
  precision only where the adapter nearly cancels a row of W0.
- :func:`dora_row_norm_triton` (Triton): each program owns a block of rows and streams W0 in column
  tiles, adding ``s·B_rows @ A_tile`` in registers before squaring, so it reads W0 once and has no
  cancellation. Runs on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (slow; that is how it is tested).

:func:`dora_row_norm` dispatches: Triton for CUDA tensors when Triton is importable, else the reference.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def dora_row_norm_reference(w0: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``[out, in], [r, in], [out, r] -> [out]`` float32, from cross terms."""
    sq = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square()  # [out]
    a, b = lora_a.float(), lora_b.float()  # [r, in], [out, r]
    w0_at = F.linear(lora_a.to(w0.dtype), w0).float().T  # [out, r] = W0 Aᵀ
    cross = (w0_at * b).sum(1)  # [out]
    quad = ((b @ (a @ a.T)) * b).sum(1)  # [out]
    return (sq + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


@functools.cache
def _kernel():
    # built on first use, so TRITON_INTERPRET set by then takes effect
    import triton
    import triton.language as tl

    @triton.jit
    def row_norm(
        w_ptr,
        a_ptr,
        b_ptr,
        out_ptr,
        n_out,
        n_in,
        rank,
        scale,
        sw0,
        sw1,
        sa0,
        sa1,
        sb0,
        sb1,
        R: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
        rmask = rows < n_out
        rr = tl.arange(0, R)  # [R] rank padded to a power of two >= 16 (tl.dot's minimum)
        b = tl.load(
            b_ptr + rows[:, None] * sb0 + rr[None, :] * sb1, mask=rmask[:, None] & (rr[None, :] < rank), other=0.0
        ).to(tl.float32)  # [BO, R]
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for i0 in range(0, n_in, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)  # [BI]
            cmask = cols < n_in
            w = tl.load(
                w_ptr + rows[:, None] * sw0 + cols[None, :] * sw1, mask=rmask[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)  # [BO, BI]
            a = tl.load(
                a_ptr + rr[:, None] * sa0 + cols[None, :] * sa1, mask=(rr[:, None] < rank) & cmask[None, :], other=0.0
            ).to(tl.float32)  # [R, BI]
            v = w + scale * tl.dot(b, a, input_precision="ieee")  # [BO, BI]
            acc += tl.sum(v * v, axis=1)
        tl.store(out_ptr + rows, tl.sqrt(acc), mask=rmask)

    return row_norm


def triton_available(t: Tensor) -> bool:
    """Whether the Triton path can run on ``t``: CUDA with Triton, or any device with TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.no_grad()
def dora_row_norm_triton(
    w0: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, block_out: int = 32, block_in: int = 64
) -> Tensor:
    """``[out, in], [r, in], [out, r] -> [out]`` float32, one pass over W0."""
    n_out, n_in = w0.shape
    rank = lora_a.shape[0]
    if lora_a.shape[1] != n_in or lora_b.shape != (n_out, rank):
        raise ValueError(f"shapes do not fit: W0 {tuple(w0.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    out = torch.empty(n_out, dtype=torch.float32, device=w0.device)
    r_pad = max(16, 1 << (rank - 1).bit_length())
    grid = ((n_out + block_out - 1) // block_out,)
    _kernel()[grid](
        w0,
        lora_a,
        lora_b,
        out,
        n_out,
        n_in,
        rank,
        float(scale),
        w0.stride(0),
        w0.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        R=r_pad,
        BLOCK_O=block_out,
        BLOCK_I=block_in,
    )
    return out


def dora_row_norm(w0: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``‖W0 + s·BA‖`` per row, float32 ``[out]``: Triton on CUDA, the cross-term reference elsewhere."""
    if w0.is_cuda and triton_available(w0):
        return dora_row_norm_triton(w0, lora_a, lora_b, scale)
    return dora_row_norm_reference(w0, lora_a, lora_b, scale)
