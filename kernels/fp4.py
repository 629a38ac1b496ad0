"""FP4 kernels: nibble packing of 4-bit codes and ExMy fake quantization, each as a Triton kernel with
a torch reference.

Nibble order: element ``2i`` of the last dimension goes to the low nibble of byte ``i``, element
``2i+1`` to the high nibble (the order of OCP MX and of torch's float4_e2m1fn_x2); an odd length is
padded with code 0. ``unpack_nibbles(pack_nibbles(c), n) == c``.

Fake quantization (2-D ``x`` [rows, cols], float32 arithmetic): ``Q(x · 2^shift[col])`` with exponent
bias ``bias[row]``, the same formula as compression.fp4.formats.fake_quant (clip to ±Qmax, binade
``max(1, floor(log2|x| + b))``, round half to even on ``2^(p-M) · 2^-b``). One kernel serves weights
(a bias per output row) and activations (one bias for all rows, per-column pre-shifts).

The Triton versions run on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (that is how they are
tested); the ``*_reference`` functions run anywhere, and the dispatchers pick Triton for CUDA tensors.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kernels.dora_norm import triton_available

__all__ = [
    "pack_nibbles",
    "unpack_nibbles",
    "pack_nibbles_reference",
    "unpack_nibbles_reference",
    "pack_nibbles_triton",
    "unpack_nibbles_triton",
    "fake_quant_rows",
    "fake_quant_rows_reference",
    "fake_quant_rows_triton",
]


def _check_codes(codes: Tensor) -> None:
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")


def pack_nibbles_reference(codes: Tensor) -> Tensor:
    """uint8 codes < 16, ``[..., n] -> [..., ceil(n/2)]``."""
    _check_codes(codes)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_nibbles: codes must fit in 4 bits (< 16)")
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles_reference(packed: Tensor, n: int) -> Tensor:
    """``[..., ceil(n/2)] -> [..., n]`` uint8 codes."""
    _check_codes(packed)
    if packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"unpack_nibbles: {packed.shape[-1]} bytes cannot hold {n} codes")
    out = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return out[..., :n].contiguous()


def fake_quant_rows_reference(
    x: Tensor, e_bits: int, m_bits: int, bias: Tensor, shift: Optional[Tensor] = None
) -> Tensor:
    """``[R, C]`` -> ``[R, C]`` float32: Q(x · 2^shift) with ``bias`` [R] (shift [C] int, optional)."""
    from compression.fp4.formats import fake_quant

    xf = x.float()
    if shift is not None:
        xf = xf * torch.exp2(shift.float())[None, :]
    return fake_quant(xf, e_bits, m_bits, bias.float()[:, None])


@functools.cache
def _kernels():
    # built on first use, so TRITON_INTERPRET set by then takes effect
    import triton
    import triton.language as tl

    @triton.jit
    def pack(c_ptr, out_ptr, n_rows, n_cols, n_bytes, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # byte index [BLOCK]
        jm = j < n_bytes
        lo = tl.load(c_ptr + row * n_cols + 2 * j, mask=jm & (2 * j < n_cols), other=0).to(tl.int32)
        hi = tl.load(c_ptr + row * n_cols + 2 * j + 1, mask=jm & (2 * j + 1 < n_cols), other=0).to(tl.int32)
        tl.store(out_ptr + row * n_bytes + j, ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8), mask=jm)

    @triton.jit
    def unpack(p_ptr, out_ptr, n_rows, n_cols, n_bytes, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # code index [BLOCK]
        km = k < n_cols
        byte = tl.load(p_ptr + row * n_bytes + k // 2, mask=km, other=0).to(tl.int32)
        code = tl.where(k % 2 == 0, byte & 15, (byte >> 4) & 15)
        tl.store(out_ptr + row * n_cols + k, code.to(tl.uint8), mask=km)

    @triton.jit
    def fake_quant(
        x_ptr,
        bias_ptr,
        unit_ptr,
        shift_ptr,
        out_ptr,
        n_rows,
        n_cols,
        sx0,
        sx1,
        qmax_unit,
        E_MAX: tl.constexpr,
        M: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        cm = cols < n_cols
        x = tl.load(x_ptr + row * sx0 + cols * sx1, mask=cm, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            s = tl.load(shift_ptr + cols, mask=cm, other=0).to(tl.float32)
            x = x * tl.exp2(s)
        b = tl.load(bias_ptr + row).to(tl.float32)
        unit = tl.load(unit_ptr + row)  # 2^-b from the host: one exp2 for kernel and reference alike
        qmax = qmax_unit * unit
        xc = tl.minimum(tl.maximum(x, -qmax), qmax)
        p = tl.maximum(tl.floor(tl.log2(tl.abs(xc)) + b), 1.0)
        scale = tl.exp2(p - M) * unit
        v = tl.div_rn(tl.abs(xc), scale)  # `/` compiles to approximate division on GPUs
        r = tl.floor(v)
        d = v - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)  # round half to even, as torch.round
        q = tl.where(xc < 0, -r, r) * scale
        tl.store(out_ptr + row * n_cols + cols, q, mask=cm)

    return pack, unpack, fake_quant


def _grid(rows: int, n: int, block: int):
    return (rows, (n + block - 1) // block)


def pack_nibbles_triton(codes: Tensor, block: int = 256) -> Tensor:
    _check_codes(codes)
    flat = codes.reshape(-1, codes.shape[-1]).contiguous()
    rows, n = flat.shape
    nb = (n + 1) // 2
    out = torch.empty(rows, nb, dtype=torch.uint8, device=codes.device)
    if flat.numel():
        _kernels()[0][_grid(rows, nb, block)](flat, out, rows, n, nb, BLOCK=block)
    return out.reshape(*codes.shape[:-1], nb)


def unpack_nibbles_triton(packed: Tensor, n: int, block: int = 256) -> Tensor:
    _check_codes(packed)
    if packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"unpack_nibbles: {packed.shape[-1]} bytes cannot hold {n} codes")
    flat = packed.reshape(-1, packed.shape[-1]).contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    if flat.numel():
        _kernels()[1][_grid(rows, n, block)](flat, out, rows, n, flat.shape[1], BLOCK=block)
    return out.reshape(*packed.shape[:-1], n)


def fake_quant_rows_triton(
    x: Tensor, e_bits: int, m_bits: int, bias: Tensor, shift: Optional[Tensor] = None, block: int = 256
) -> Tensor:
    """Triton version of :func:`fake_quant_rows_reference` (any strides; float32 out)."""
    if x.dim() != 2 or bias.shape != (x.shape[0],) or (shift is not None and shift.shape != (x.shape[1],)):
        raise ValueError(
            f"fake_quant_rows: x must be [R, C] with bias [R] and shift [C]; got x {tuple(x.shape)}, "
            f"bias {tuple(bias.shape)}, shift {None if shift is None else tuple(shift.shape)}"
        )
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.float32, device=x.device)
    qmax_unit = (2.0 - 2.0**-m_bits) * 2.0 ** (2**e_bits - 1)
    b = bias.float().contiguous()
    unit = torch.exp2(-b.double()).float()  # as the reference's (compression.fp4.formats._unit)
    s = shift.to(torch.int32).contiguous() if shift is not None else b  # dummy pointer when unused
    if x.numel():
        _kernels()[2][_grid(rows, cols, block)](
            x,
            b,
            unit,
            s,
            out,
            rows,
            cols,
            x.stride(0),
            x.stride(1),
            qmax_unit,
            E_MAX=2**e_bits - 1,
            M=m_bits,
            HAS_SHIFT=shift is not None,
            BLOCK=block,
        )
    return out


def pack_nibbles(codes: Tensor) -> Tensor:
    return pack_nibbles_triton(codes) if codes.is_cuda and triton_available(codes) else pack_nibbles_reference(codes)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    if packed.is_cuda and triton_available(packed):
        return unpack_nibbles_triton(packed, n)
    return unpack_nibbles_reference(packed, n)


def fake_quant_rows(x: Tensor, e_bits: int, m_bits: int, bias: Tensor, shift: Optional[Tensor] = None) -> Tensor:
    if x.is_cuda and triton_available(x):
        return fake_quant_rows_triton(x, e_bits, m_bits, bias, shift)
    return fake_quant_rows_reference(x, e_bits, m_bits, bias, shift)
