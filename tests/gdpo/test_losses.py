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
