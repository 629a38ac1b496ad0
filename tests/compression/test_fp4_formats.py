"""ExMy formats with a real-valued exponent bias: value sets, Qmax, rounding, codes."""

import pytest
import torch

from compression.fp4 import (
    FPFormat,
    bias_for_max,
    decode,
    encode,
    fake_quant,
    formats_for_bits,
    max_value,
    parse_format,
    representable_values,
)
from compression.fp4.search import QuantSetting

ALL_FORMATS = formats_for_bits(4) + formats_for_bits(8)


def test_e2m1_with_bias_one_is_the_fp4_value_set():
    assert representable_values(FPFormat(2, 1), 1.0).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = torch.linspace(-8, 8, 1001)
    assert set(fake_quant(x, 2, 1, 1.0).abs().unique().tolist()) == {0, 0.5, 1, 1.5, 2, 3, 4, 6}


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
@pytest.mark.parametrize("bias", [-1.3, 0.0, 0.7, 2.25])
def test_qmax_is_the_largest_value_and_every_magnitude_has_a_code(fmt, bias):
    values = representable_values(fmt, bias)
    assert len(values) == 2 ** (fmt.e_bits + fmt.m_bits)  # no code is wasted on inf/NaN
    assert float(values.max()) == pytest.approx(float(max_value(fmt, bias)), rel=1e-6)
    expected = (2 - 2**-fmt.m_bits) * 2 ** (2**fmt.e_bits - 1 - bias)
    assert float(max_value(fmt, bias)) == pytest.approx(expected, rel=1e-6)
    assert float(bias_for_max(fmt, expected)) == pytest.approx(bias, abs=1e-5)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_fake_quant_rounds_to_the_nearest_representable_value_and_clips(fmt):
    bias = 0.37
    grid = representable_values(fmt, bias).double()
    grid = torch.cat([-grid.flip(0), grid])
    g = torch.Generator().manual_seed(fmt.bits * 10 + fmt.e_bits)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * float(grid.max()) * 0.7
    q = fake_quant(x.float(), fmt.e_bits, fmt.m_bits, bias).double()
    assert torch.isin(q, grid).all()
    dist = (x[:, None] - grid[None, :]).abs()  # [N, G]
    nearest = dist.min(dim=1).values
    assert torch.all((q - x).abs() <= nearest + 1e-6 * x.abs().clamp_min(1))
    big = torch.tensor([10.0, -10.0]) * float(grid.max())
    assert fake_quant(big, fmt.e_bits, fmt.m_bits, bias).tolist() == pytest.approx(
        [float(grid.max()), -float(grid.max())], rel=1e-6
    )


def test_ties_round_to_even_mantissa():
    # E2M1, bias 1: 2.5 lies between 2 and 3 (mantissa 0 and 1) -> 2; 3.5 between 3 and 4 -> 4; 0.25 -> 0
    q = fake_quant(torch.tensor([2.5, 3.5, 0.25, 0.75, 5.0]), 2, 1, 1.0)
    assert q.tolist() == [2.0, 4.0, 0.0, 1.0, 4.0]


def test_per_channel_bias_broadcasts_and_dtype_is_kept():
    x = torch.randn(6, 50) * torch.logspace(-2, 2, 6)[:, None]
    bias = bias_for_max(FPFormat(2, 1), x.abs().amax(1))[:, None]  # [6, 1]
    q = fake_quant(x, 2, 1, bias)
    for r in range(6):
        assert torch.equal(q[r], fake_quant(x[r], 2, 1, float(bias[r])))
        assert float(q[r].abs().max()) <= float(x[r].abs().max()) * (1 + 1e-6)
    xb = x.to(torch.bfloat16)
    qb = fake_quant(xb, 2, 1, bias)
    assert qb.dtype == torch.bfloat16 and torch.equal(qb, fake_quant(xb.float(), 2, 1, bias).to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_codes_decode_to_the_quantized_values_bit_exactly(fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=g) * 3
    bias = torch.randn(40, 1, generator=g)
    codes = encode(x, fmt, bias)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**fmt.bits
    assert torch.equal(decode(codes, fmt, bias), fake_quant(x, fmt.e_bits, fmt.m_bits, bias))


def test_e2m1_code_layout():
    # sign | 2 exponent bits | 1 mantissa bit; subnormal 0.5 = 0b0001, 6 = 0b0111, -1.5 = 0b1011, 0 = 0
    codes = encode(torch.tensor([0.5, 6.0, -1.5, 0.0, -0.0, 2.0]), FPFormat(2, 1), 1.0)
    assert codes.tolist() == [0b0001, 0b0111, 0b1011, 0, 0, 0b0100]


def test_format_and_setting_errors_name_the_problem():
    with pytest.raises(ValueError, match="supports 4, 8 bits, got 3"):
        formats_for_bits(3)
    with pytest.raises(ValueError, match="E0M3"):
        FPFormat(0, 3)
    assert parse_format("e4m3") == FPFormat(4, 3)
    for bad, msg in (("w3a4", "weight bits must be 4 or 8"), ("w4a5", "activation bits"), ("int4", "expected wXaY")):
        with pytest.raises(ValueError, match=msg):
            QuantSetting.parse(bad)
    assert QuantSetting.parse("w4").a_bits is None and QuantSetting.parse("W4A8") == QuantSetting(4, 8)


def test_every_4_bit_code_decodes_and_encodes_back():
    for fmt in formats_for_bits(4):
        codes = torch.arange(16, dtype=torch.uint8)
        values = decode(codes, fmt, 0.5)
        assert len(values.unique()) == 15  # +0 and -0 share a value
        back = encode(values, fmt, 0.5)
        expected = codes.clone()
        expected[8] = 0  # -0 encodes as +0
        assert torch.equal(back, expected)
