import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdpo.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, token_logprobs


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(2, 1)
    logp = torch.full((2, 1), math.log(1.5))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    out = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, global_tokens=2)
    # A>0: min(1.5, 1.2) = 1.2 -> -1.2 ; A<0: min(-1.5, -1.2) = -1.5 -> +1.5 ; mean over 2 tokens
    assert out.loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.ratio_mean.item() == pytest.approx(1.5)


def test_asymmetric_clip_range():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(logp, old, adv, torch.ones(2, 1), eps_low=0.2, eps_high=0.28, global_tokens=2)
    # ratio 1.5, A=+1 -> clipped at 1.28 ; ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8
    assert out.loss.item() == pytest.approx((-1.28 + 0.8) / 2)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_kl_term_adds_with_coefficient():
    logp = torch.tensor([[math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    base = policy_loss(logp, logp.detach(), torch.zeros(1), mask, global_tokens=1)
    with_kl = policy_loss(logp, logp.detach(), torch.zeros(1), mask, global_tokens=1, ref_logp=ref, kl_coef=0.1)
    assert (with_kl.loss - base.loss).item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    assert with_kl.kl.item() == pytest.approx(0.5 + math.log(2) - 1)


def test_aggregation_modes_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(v, m, "token-mean", global_tokens=4).item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean-token-mean", global_seqs=2).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum-norm", global_seqs=2, max_len=8).item() == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate(v, m, "token-mean")


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # [1, 2, 2]
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.75)])
    ent = entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(2))
    assert ent.shape == (1, 2)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 6),
    st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
    st.integers(0, 10_000),
    st.data(),
)
def test_micro_batch_split_gives_same_loss_and_gradient(n, t, mode, seed, data):
    g = torch.Generator().manual_seed(seed)
    logits_param = torch.randn(n, t, generator=g).requires_grad_(True)
    old = torch.randn(n, t, generator=g) * 0.1
    ref = torch.randn(n, t, generator=g) * 0.1
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    denom = dict(global_tokens=mask.sum().item(), global_seqs=n, max_len=t)
    kw = dict(eps_low=0.2, eps_high=0.28, agg=mode, kl_coef=0.05, **denom)

    full = policy_loss(logits_param * 0.1, old, adv, mask, ref_logp=ref, **kw).loss
    (grad_full,) = torch.autograd.grad(full, logits_param)

    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=3))))
    bounds = [0, *cuts, n]
    total = torch.zeros(())
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        total = (
            total
            + policy_loss(
                logits_param[lo:hi] * 0.1, old[lo:hi], adv[lo:hi], mask[lo:hi], ref_logp=ref[lo:hi], **kw
            ).loss
        )
    (grad_split,) = torch.autograd.grad(total, logits_param)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(grad_split, grad_full, atol=1e-7)


def test_gspo_hand_computed_sequence_ratio_clip_and_gradient():
    """GSPO Eq. 5-7: s_i = exp(mean_t log(π_θ/π_old)), -min(s_i A_i, clip(s_i) A_i) per sequence,
    averaged over sequences; the clipped sequence gets no gradient, the other s_i A_i / |y_i| per token."""
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [1.1, 0.9]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(
        logp, old, adv, torch.ones(2, 2), loss_type="gspo", eps_low=0.2, eps_high=0.2,
        agg="seq-mean-token-mean", global_seqs=2,
    )  # fmt: skip
    s1, s2 = math.sqrt(1.5), math.sqrt(1.1 * 0.9)  # 1.2247 (clipped at 1.2), 0.99499
    assert out.loss.item() == pytest.approx((-min(s1, 1.2) + s2) / 2)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0])  # A>0 and s above 1+eps: clipped
    assert logp.grad[1].tolist() == pytest.approx([s2 / 2 / 2] * 2)  # -(1/G)(1/|y|) s A, A = -1
    assert out.clip_fraction.item() == pytest.approx(0.5)  # both tokens of the first sequence
    assert out.ratio_mean.item() == pytest.approx((2 * s1 + 2 * s2) / 4)


def test_cispo_hand_computed_detached_clipped_weight_keeps_every_tokens_gradient():
    """CISPO (MiniMax-M1 Eq. 4): -sg(clip(r, 1-eps_low, 1+eps_high)) A log π_θ per token; a token whose
    ratio is clipped keeps its gradient (PPO would drop it)."""
    old = torch.log(torch.tensor([[0.2, 0.5]]))
    logp = torch.log(torch.tensor([[0.3, 0.45]])).requires_grad_()  # r = 1.5, 0.9
    out = policy_loss(
        logp, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type="cispo", eps_low=0.2, eps_high=0.28,
        global_tokens=2,
    )  # fmt: skip
    assert out.loss.item() == pytest.approx(-(1.28 * math.log(0.3) + 0.9 * math.log(0.45)) / 2)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.28 / 2, -0.9 / 2])
    ppo = torch.log(torch.tensor([[0.3, 0.45]])).requires_grad_()
    policy_loss(
        ppo, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.28, global_tokens=2
    ).loss.backward()
    assert ppo.grad[0, 0].item() == 0.0  # the contrast: PPO's clipped token has none


def test_rollout_correction_hand_computed_levels_and_modes():
    from gdpo.losses import rollout_correction

    sampler = torch.zeros(1, 4)
    proximal = torch.log(torch.tensor([[3.0, 0.5, 1.0, 7.0]]))  # r = 3, 0.5, 1; the last is padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    tis = rollout_correction(proximal, sampler, mask, "tis", "token", cap=2.0)
    assert tis.weights[0].tolist() == pytest.approx([2.0, 0.5, 1.0, 0.0])
    assert tis.capped.item() == 1 and tis.weight_max.item() == pytest.approx(3.0)
    assert tis.weight_sum.item() == pytest.approx(3.5)
    k3 = (3 - 1 - math.log(3)) + (0.5 - 1 - math.log(0.5))  # Σ r - 1 - log r; padding excluded
    assert tis.mismatch_kl.item() == pytest.approx(k3)
    mis = rollout_correction(proximal, sampler, mask, "mis", "token", cap=2.0)
    assert mis.weights[0].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0])  # 3 is outside [1/2, 2]
    assert mis.capped.item() == 1
    seq = rollout_correction(proximal, sampler, mask, "tis", "sequence", cap=2.0)
    assert seq.weights[0].tolist() == pytest.approx([1.5, 1.5, 1.5, 0.0])  # 3 x 0.5 x 1
    geo = rollout_correction(proximal, sampler, mask, "mis", "geometric", cap=1.1)
    assert geo.weights[0].tolist() == pytest.approx([0.0] * 4) and geo.capped.item() == 3  # 1.5^(1/3) > 1.1
    geo = rollout_correction(proximal, sampler, mask, "tis", "geometric", cap=2.0)
    assert geo.weights[0].tolist() == pytest.approx([1.5 ** (1 / 3)] * 3 + [0.0])
    none = rollout_correction(proximal, sampler, mask, "none", "token", cap=2.0)
    assert none.weights[0].tolist() == [1.0, 1.0, 1.0, 0.0] and none.mismatch_kl.item() == pytest.approx(k3)
    long = rollout_correction(torch.full((1, 500), 0.5), torch.zeros(1, 500), torch.ones(1, 500), "tis", "sequence")
    assert torch.isfinite(long.weight_max) and long.weights.max().item() == 2.0  # e^250 bounded before exp


def test_the_weights_multiply_each_tokens_loss():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    plain = policy_loss(logp, logp, torch.tensor([2.0]), torch.ones(1, 2), global_tokens=2)
    weighted = policy_loss(logp, logp, torch.tensor([2.0]), torch.ones(1, 2), global_tokens=2,
                           weights=torch.tensor([[0.5, 0.0]]))  # fmt: skip
    assert plain.loss.item() == pytest.approx(-2.0) and weighted.loss.item() == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "mode, level, cap",
    [("tis", "token", 2.0), ("tis", "sequence", 10.0), ("mis", "sequence", 10.0), ("tis", "geometric", 2.0)],
)
def test_with_an_injected_mismatch_the_corrected_gradient_is_nearer_the_on_policy_one(mode, level, cap):
    """The sampler draws 3-token sequences at temperature 1.4, the learner's policy is at 1.0: the policy
    gradient from the sampler's tokens, corrected and not, against the exact on-policy gradient
    Σ_y π_θ(y) A(y) ∇log π_θ(y) (every one of the 6³ sequences enumerated). The sequence-level weight is
    the exact ratio of the sampled sequence's probabilities (unbiased but for the cap): its estimate is as
    good as one from as many on-policy samples, up to the variance the weights add; the token and
    geometric weights are the cheaper, biased approximations (verl's rollout_corr_math.md §3.3): nearer,
    not there."""
    from gdpo.losses import rollout_correction

    g = torch.Generator().manual_seed(0)
    v, t, n = 6, 3, 100_000
    theta = (torch.randn(t, v, generator=g) * 1.5).requires_grad_()  # independent positions
    reward = torch.randn(v, v, v, generator=g)  # A(y) for every sequence y

    def logp_of(params, ys, temperature=1.0):  # [n, t] tokens -> [n, t] log-probs
        return torch.log_softmax(params / temperature, -1).gather(-1, ys.T).T

    def sample(temperature):
        probs = torch.softmax(theta.detach() / temperature, -1)
        return torch.stack([torch.multinomial(probs[i], n, replacement=True, generator=g) for i in range(t)], 1)

    def estimate(ys, weights=None):  # Σ_t w A ∇log π(y_t) / n: the (weighted) REINFORCE estimate
        logp = logp_of(theta, ys)
        adv, mask = reward[tuple(ys.T)], torch.ones(n, t)
        out = policy_loss(logp, logp.detach(), adv, mask, agg="seq-mean-token-sum-norm", global_seqs=n,
                          max_len=1, weights=weights)  # fmt: skip
        return -torch.autograd.grad(out.loss, theta)[0]

    grid = torch.cartesian_prod(*[torch.arange(v)] * t)  # [v^t, t]
    lp = logp_of(theta, grid).sum(-1)
    exact = torch.autograd.grad((lp.exp().detach() * reward[tuple(grid.T)] * lp).sum(), theta)[0]

    ys = sample(1.4)
    corr = rollout_correction(logp_of(theta.detach(), ys), logp_of(theta.detach(), ys, 1.4), torch.ones(n, t), mode,
                              level, cap)  # fmt: skip
    assert corr.mismatch_kl.item() / (n * t) > 0.01  # the mismatch is there to correct
    err_u = (estimate(ys) - exact).norm().item()
    err_c = (estimate(ys, corr.weights) - exact).norm().item()
    err_on = (estimate(sample(1.0)) - exact).norm().item()  # the sampling noise of n on-policy samples
    assert err_c < err_u
    if level == "sequence":
        assert err_c < 3 * err_on < err_u, (err_c, err_on, err_u)
