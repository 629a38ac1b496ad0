"""FP4 kernels: nibble packing and fake quantization, Triton (under TRITON_INTERPRET=1) against torch."""

import pytest
import torch

from compression.fp4 import FPFormat, bias_for_max, fake_quant
from kernels import fp4
from tests.helpers.triton import interpreted


def test_nibble_order_low_first_and_odd_lengths_pad():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    packed = fp4.pack_nibbles_reference(codes)
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x07]]
    assert torch.equal(fp4.unpack_nibbles_reference(packed, 3), codes)


def test_pack_errors():
    with pytest.raises(ValueError, match="4 bits"):
        fp4.pack_nibbles_reference(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fp4.pack_nibbles_reference(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cannot hold 5 codes"):
        fp4.unpack_nibbles_reference(torch.zeros(2, dtype=torch.uint8), 5)


def test_rows_reference_is_the_format_quantizer():
    x = torch.randn(8, 20)
    bias = bias_for_max(FPFormat(2, 1), x.abs().amax(1))
    shift = torch.randint(0, 4, (20,))
    out = fp4.fake_quant_rows_reference(x, 2, 1, bias, shift)
    assert torch.equal(out, fake_quant(x * torch.exp2(shift.float()), 2, 1, bias[:, None]))


# one child interpreter per test (tests/helpers/triton.py), so cases loop inside the tests


@interpreted
def test_triton_pack_unpack_match_the_reference():
    for shape in [(5, 13), (3, 600), (1, 1), (2, 4, 9)]:
        g = torch.Generator().manual_seed(shape[-1])
        codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
        packed = fp4.pack_nibbles_triton(codes, block=64)
        assert torch.equal(packed, fp4.pack_nibbles_reference(codes)), shape
        assert torch.equal(fp4.unpack_nibbles_triton(packed, shape[-1], block=64), codes), shape


@interpreted
def test_triton_fake_quant_matches_the_reference_bit_for_bit():
    for e_bits, m_bits in [(2, 1), (3, 0), (1, 2), (4, 3), (2, 5)]:
        _check_fake_quant(e_bits, m_bits)
    x = torch.tensor([[2.5, 3.5, 0.25, 0.75, 5.0, -2.5]])  # ties round to even, as torch.round
    assert fp4.fake_quant_rows_triton(x, 2, 1, torch.tensor([1.0])).tolist() == [[2.0, 4.0, 0.0, 1.0, 4.0, -2.0]]


def _check_fake_quant(e_bits, m_bits):
    g = torch.Generator().manual_seed(e_bits * 8 + m_bits)
    x = torch.randn(37, 70, generator=g) * 3
    x[0, :4] = torch.tensor([0.0, -0.0, 1e9, -1e9])  # zeros and clipping
    bias = torch.randn(37, generator=g)
    shift = torch.randint(0, 2**e_bits, (70,), generator=g)
    for s in (None, shift):
        out = fp4.fake_quant_rows_triton(x, e_bits, m_bits, bias, s, block=32)
        assert torch.equal(out, fp4.fake_quant_rows_reference(x, e_bits, m_bits, bias, s))
    xt = torch.randn(70, 37, generator=g).T  # strided input
    assert torch.equal(
        fp4.fake_quant_rows_triton(xt, e_bits, m_bits, bias), fp4.fake_quant_rows_reference(xt, e_bits, m_bits, bias)
    )


@pytest.mark.gpu
def test_cuda_dispatch_matches_the_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(256, 512, device="cuda")
    bias = torch.randn(256, device="cuda")
    shift = torch.randint(0, 4, (512,), device="cuda")
    assert torch.equal(
        fp4.fake_quant_rows(x, 2, 1, bias, shift).cpu(),
        fp4.fake_quant_rows_reference(x.cpu(), 2, 1, bias.cpu(), shift.cpu()),
    )
    codes = torch.randint(0, 16, (256, 511), device="cuda", dtype=torch.uint8)
    assert torch.equal(fp4.unpack_nibbles(fp4.pack_nibbles(codes), 511).cpu(), codes.cpu())
