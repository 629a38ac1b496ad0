"""LLM-FP4's per-layer search, the pre-shifted exponent bias and its fold, the MinMax baselines."""

import pytest
import torch

from compression.fp4 import FPFormat, bias_for_max, fake_quant
from compression.fp4.qlinear import QuantLinear
from compression.fp4.search import (
    LayerQuant,
    QuantSetting,
    SearchGrid,
    minmax_fp,
    minmax_int,
    output_mse,
    quantize_input,
    quantize_layer,
    quantize_weight,
    search_embedding,
    split_rows,
)
from compression.intq import int_fake_quant_symmetric, minmax_symmetric_scale

SMALL = SearchGrid(points=24, act_points=12, rounds=2)


def _layer(n_in=32, n_out=24, n=512, seed=0):
    """Weights plus inputs whose channels differ in scale by ~100x (the case pre-shifts are for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g) * torch.logspace(-1, 1, n_in)[torch.randperm(n_in, generator=g)]
    w = torch.randn(n_out, n_in, generator=g) * 0.1
    return w, x


@pytest.mark.parametrize("bits", ["w4a4", "w4a8", "w8a8", "w4"])
def test_search_never_loses_to_minmax_fp_and_beats_it_at_4_bits(bits):
    w, x = _layer()
    setting = QuantSetting.parse(bits)
    base = minmax_fp(w, x, setting)
    lq = quantize_layer(w, x, setting, "search", SMALL)
    assert lq.mse["start"] == pytest.approx(base.mse["final"])
    assert lq.mse["final"] <= base.mse["final"]
    assert lq.mse["final"] == pytest.approx(output_mse(w, x, lq))
    if setting.w_bits == 4:
        assert lq.mse["final"] < 0.8 * base.mse["final"]


def test_weight_bias_per_channel_is_the_grid_optimum_of_that_channels_output_error():
    w, x = _layer(n_in=16, n_out=6, n=256, seed=1)
    grid = SearchGrid(points=15, rounds=1)
    lq = quantize_layer(w, x, QuantSetting.parse("w4"), "search", grid)  # weight-only: activations exact
    ref = x @ w.T
    for j in range(w.shape[0]):
        errs = []
        for alpha in grid.alphas(grid.points):
            b = float(bias_for_max(lq.w_fmt, w[j].abs().max() * float(alpha)))
            q = fake_quant(w[j], lq.w_fmt.e_bits, lq.w_fmt.m_bits, b)
            errs.append((float(((x @ q - ref[:, j]) ** 2).sum()), b))
        best_err = min(errs)[0]
        chosen = fake_quant(w[j], lq.w_fmt.e_bits, lq.w_fmt.m_bits, float(lq.w_param[j]))
        assert float(((x @ chosen - ref[:, j]) ** 2).sum()) <= best_err * (1 + 1e-4) + 1e-9


def _shifted_lq(w, x, fmt=FPFormat(2, 1)):
    chan_max = x.abs().amax(0)
    rho = float(bias_for_max(fmt, chan_max.max()))
    shift = torch.clamp(torch.round(bias_for_max(fmt, chan_max)) - round(rho), 0, 2**fmt.e_bits - 1).int()
    w_t = w * torch.exp2(-shift.float())[None, :]
    lq = LayerQuant(
        "search", 4, fmt, bias_for_max(fmt, w_t.abs().amax(1)), a_bits=4, a_fmt=fmt, a_bias=rho, a_shift=shift
    )
    return lq, rho, shift


def test_pre_shift_is_the_integer_part_of_the_channel_bias_clamped_to_the_exponent_range():
    w, x = _layer()
    lq, rho, shift = _shifted_lq(w, x)
    b_c = bias_for_max(FPFormat(2, 1), x.abs().amax(0))
    for c in range(x.shape[1]):
        assert int(shift[c]) == min(max(round(float(b_c[c])) - round(rho), 0), 3)
    assert int(shift.max()) > 0  # the ~100x spread of channel scales needs shifts here
    # Q_{ρ+s}(x) = 2^-s · Q_ρ(2^s · x), bit for bit
    s = shift.float()
    assert torch.equal(fake_quant(x, 2, 1, rho + s), torch.exp2(-s) * fake_quant(x * torch.exp2(s), 2, 1, rho))


def test_folded_layer_computes_the_simulated_per_channel_layer():
    w, x = _layer(seed=2)
    bias = torch.randn(w.shape[0])
    lq, _, shift = _shifted_lq(w, x)
    layer = QuantLinear.from_linear(_linear(w, bias), lq)
    folded = layer(x)
    simulated = layer.simulate(x)
    torch.testing.assert_close(folded, simulated, rtol=1e-6, atol=1e-6)
    # and the simulated layer is the per-channel quantization the search scores
    expected = fake_quant(x, 2, 1, lq.a_bias + shift.float()) @ (quantize_weight(w, lq) * torch.exp2(shift.float())).T
    torch.testing.assert_close(simulated, expected + bias, rtol=1e-5, atol=1e-5)
    # the deployed operands are per-tensor: activations on one bias ρ, weights on one bias per row
    a = quantize_input(x, lq, folded=True)
    assert torch.equal(a, fake_quant(a, 2, 1, lq.a_bias))


def test_searched_shifted_layer_folds_too():
    w, x = _layer(seed=3)
    lq = quantize_layer(w, x, QuantSetting.parse("w4a4"), "search", SMALL)
    layer = QuantLinear.from_linear(_linear(w, None), lq)
    torch.testing.assert_close(layer(x), layer.simulate(x), rtol=1e-6, atol=1e-6)


def _linear(w, bias):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def test_minmax_int_baseline_uses_symmetric_channel_scales_and_asymmetric_activations():
    w, x = _layer()
    lq = minmax_int(w, x.relu(), QuantSetting.parse("w4a4"))
    wq = quantize_weight(w, lq)
    assert torch.equal(wq, int_fake_quant_symmetric(w, 4, minmax_symmetric_scale(w, 4, 1)))
    for j in range(w.shape[0]):
        assert len(torch.unique(wq[j])) <= 15
    a = quantize_input(x.relu(), lq)
    assert float(a.min()) >= 0 and len(torch.unique(a)) <= 16  # relu inputs keep all 16 levels for >= 0


def test_split_rows_shares_the_activation_quantizer():
    w, x = _layer(n_out=30)
    lq = quantize_layer(w, x, QuantSetting.parse("w4a4"), "search", SMALL)
    parts = split_rows(lq, [10, 20])
    assert [p.w_param.shape[0] for p in parts] == [10, 20]
    whole = quantize_weight(w, lq)
    assert torch.equal(torch.cat([quantize_weight(w[:10], parts[0]), quantize_weight(w[10:], parts[1])]), whole)
    assert all(p.a_bias == lq.a_bias and p.a_fmt == lq.a_fmt for p in parts)


def test_embedding_search_beats_minmax_rows():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(50, 16, generator=g) * torch.rand(50, 1, generator=g)
    fmt, bias = search_embedding(emb, 4, SearchGrid(points=30))
    searched = ((fake_quant(emb, fmt.e_bits, fmt.m_bits, bias[:, None]) - emb) ** 2).sum()
    mm = FPFormat(2, 1)
    minmax = ((fake_quant(emb, 2, 1, bias_for_max(mm, emb.abs().amax(1))[:, None]) - emb) ** 2).sum()
    assert searched <= minmax


def test_unknown_method_is_named():
    w, x = _layer()
    with pytest.raises(ValueError, match="'gptq'"):
        quantize_layer(w, x, QuantSetting.parse("w4a4"), "gptq")
