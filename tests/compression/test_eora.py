"""EoRA against a brute-force optimum and plain SVD; factor quantization; pruning masks."""

import pytest
import torch

from compression.eora import eora_compensation, input_covariance, output_error, quantize_factors, svd_compensation
from compression.prune import magnitude_mask, prune_linears, two_four_mask


def _case(out_f=12, in_f=20, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ torch.randn(
        in_f, in_f, generator=g, dtype=torch.float64
    )
    x = x * torch.logspace(-1, 1, in_f, dtype=torch.float64)  # anisotropic inputs: where EoRA and SVD differ
    delta = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.1
    return delta.float(), x.float()


def _brute_force_error(delta, cov, rank, seed, steps=3000):
    """Minimize tr((ΔW - BA) C (ΔW - BA)ᵀ) over B, A by gradient descent from a random start."""
    g = torch.Generator().manual_seed(seed)
    d, c = delta.double(), cov.double()
    b = (torch.randn(delta.shape[0], rank, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    a = (torch.randn(rank, delta.shape[1], generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    opt = torch.optim.Adam([b, a], lr=0.01)
    for _ in range(steps):
        m = d - b @ a
        loss = ((m @ c) * m).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = (d - b @ a).detach()
    return float(((m @ c) * m).sum())


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_eora_reaches_the_optimum_of_the_layer_output_error(rank):
    delta, x = _case(seed=rank)
    cov = input_covariance(x)
    b, a = eora_compensation(delta, cov, rank)
    assert b.shape == (12, rank) and a.shape == (rank, 20)
    err = output_error(delta, cov, b, a)
    # independent closed form: with C = LLᵀ, the optimum is SVD_r(ΔW L) L⁻¹
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd(delta.double() @ chol)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(chol)
    m = delta.double() - best
    assert err == pytest.approx(float(((m @ cov) * m).sum()), rel=1e-6, abs=1e-9)
    # and no local search from random starts finds anything better
    for seed in range(3):
        assert err <= _brute_force_error(delta, cov, rank, seed) * (1 + 1e-6) + 1e-9


def test_the_singular_values_are_split_evenly_between_the_factors():
    """The release's √Σ split: B = U√Σ has column norms √σ, A's rows (projected back) the same, so a
    16-bit or INT factor does not hold the whole dynamic range."""
    delta, x = _case(seed=4)
    cov = input_covariance(x)
    b, a = eora_compensation(delta, cov, 4)
    lam, q = torch.linalg.eigh(cov)
    sigma = torch.linalg.svdvals(delta.double() @ q * lam.sqrt())[:4]  # the singular values of ΔW Q√Λ
    torch.testing.assert_close(b.double().norm(dim=0), sigma.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((a.double() @ q * lam.sqrt()).norm(dim=1), sigma.sqrt(), rtol=1e-5, atol=1e-7)
    bs, as_ = svd_compensation(delta, 4)
    s = torch.linalg.svdvals(delta.double())[:4]
    torch.testing.assert_close(bs.double().norm(dim=0), s.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(as_.double().norm(dim=1), s.sqrt(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_eora_never_loses_to_plain_svd_on_the_output_error(seed):
    delta, x = _case(seed=10 + seed)
    cov = input_covariance(x)
    for rank in (1, 2, 5, 10):
        e_eora = output_error(delta, cov, *eora_compensation(delta, cov, rank))
        e_svd = output_error(delta, cov, *svd_compensation(delta, rank))
        assert e_eora <= e_svd * (1 + 1e-9)
    assert output_error(delta, cov, *eora_compensation(delta, cov, 5)) < 0.9 * output_error(
        delta, cov, *svd_compensation(delta, 5)
    )  # on anisotropic inputs the gain is real


def test_full_rank_eora_reconstructs_delta_and_the_floor_guards_rank_deficient_inputs():
    delta, x = _case()
    cov = input_covariance(x)
    b, a = eora_compensation(delta, cov, 12)
    assert output_error(delta, cov, b, a) < 1e-8 * output_error(delta, cov)
    x_low = x[:, :5] @ torch.randn(5, 20)  # rank-5 inputs: 15 eigenvalues are ~0
    cov_low = input_covariance(x_low)
    b, a = eora_compensation(delta, cov_low, 4)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    assert output_error(delta, cov_low, b, a) <= output_error(delta, cov_low, *svd_compensation(delta, 4)) + 1e-9


def test_rank_and_shape_errors_are_named():
    delta, x = _case()
    with pytest.raises(ValueError, match="rank must be in 1..12"):
        eora_compensation(delta, input_covariance(x), 13)
    with pytest.raises(ValueError, match=r"cov must be \[in, in\]"):
        eora_compensation(delta, torch.eye(3), 2)


def test_factor_quantization_keeps_shapes_and_levels():
    delta, x = _case()
    b, a = eora_compensation(delta, input_covariance(x), 4)
    bq, aq = quantize_factors(b, a, 4)
    assert bq.shape == b.shape and aq.shape == a.shape
    assert all(len(torch.unique(row)) <= 15 for row in aq)
    assert (bq - b).abs().max() <= b.abs().max() / 7 / 2 * 1.0001


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    assert two_four_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]
    w = torch.randn(16, 64)
    m = two_four_mask(w)
    assert torch.all(m.reshape(16, 16, 4).sum(-1) == 2)
    dropped_max = (w.abs() * ~m).reshape(16, 16, 4).max(-1).values
    kept_min = w.abs().masked_fill(~m, float("inf")).reshape(16, 16, 4).min(-1).values
    assert torch.all(kept_min >= dropped_max)
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_mask(torch.randn(2, 6))


def test_magnitude_mask_per_row_and_prune_linears():
    w = torch.randn(8, 10)
    m = magnitude_mask(w, 0.5)
    assert torch.all(m.sum(1) == 5)
    for r in range(8):
        assert w[r].abs()[m[r]].min() >= w[r].abs()[~m[r]].max()
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    got = prune_linears(lin, ["0"], "2:4")
    assert got == {"0": 0.5} and float((lin[0].weight == 0).float().mean()) == 0.5
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_mask(w, 1.0)


def test_activation_aware_delta_is_the_least_squares_correction():
    from compression.eora import activation_aware_delta, regression_error
    from compression.fp4.formats import fake_quant

    delta, x = _case(seed=30)
    w = torch.randn(12, 20) * 0.2
    w_c = w - delta
    assert torch.allclose(activation_aware_delta(w, w_c, x, x, eig_floor=1e-12), delta, atol=1e-4)  # exact inputs: ΔW
    x_q = fake_quant(x, 2, 1, 0.5)  # 4-bit activations
    d_eff = activation_aware_delta(w, w_c, x, x_q, eig_floor=1e-12)
    target = x.double() @ w.double().T - x_q.double() @ w_c.double().T  # [n, out]
    sol = torch.linalg.lstsq(x.double(), target).solution.T  # [out, in]
    torch.testing.assert_close(d_eff.double(), sol, rtol=1e-4, atol=1e-5)
    cov = input_covariance(x)
    for rank in (2, 6):
        aware = regression_error(w, w_c, x, x_q, *eora_compensation(d_eff, cov, rank))
        plain = regression_error(w, w_c, x, x_q, *eora_compensation(delta, cov, rank))
        assert aware <= plain * (1 + 1e-9)
