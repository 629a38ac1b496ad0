import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdpo.advantages import apply_conditions, gdpo_advantages, grpo_advantages, zero_variance_groups

EPS = 1e-4
EXAMPLES = int(os.environ.get("GDPO_HYPOTHESIS_EXAMPLES", "60"))  # raise for a deeper search


def _two_rollout_batch():
    # three prompts, two rollouts each, two binary rewards; reward totals per group: (0,1), (0,2), (1,2)
    return torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def test_grpo_collapses_distinct_reward_combinations():
    adv = grpo_advantages(_two_rollout_batch(), group_size=2)  # [6]
    assert adv.shape == (6,)
    # hand computed: a pair (x, x + d) gives -/+ (d/2) / (d/sqrt(2) + eps), about 0.7071 for any d
    for d, (lo, hi) in zip([1, 2, 1], adv.view(3, 2).tolist()):
        expected = (d / 2) / (d / math.sqrt(2) + EPS)
        assert lo == pytest.approx(-expected, abs=1e-6) and hi == pytest.approx(expected, abs=1e-6)
    groups = adv.view(3, 2)
    assert torch.allclose(groups[0], groups[1], atol=1e-3) and torch.allclose(groups[1], groups[2], atol=1e-3)


def test_gdpo_keeps_reward_combinations_apart():
    adv = gdpo_advantages(_two_rollout_batch(), group_size=2)
    one = 0.5 / (math.sqrt(0.5) + EPS)  # one binary reward that differs within a pair of two rollouts
    sums = [-one, one, -2 * one, 2 * one, -one, one]  # per-group sums of the per-reward z-scores
    mean = sum(sums) / 6
    std = math.sqrt(sum((s - mean) ** 2 for s in sums) / 5)
    expected = torch.tensor([(s - mean) / (std + EPS) for s in sums])
    assert torch.allclose(adv, expected, atol=1e-6)
    # the (0, 2) group now gets twice the advantage of the (0, 1) and (1, 2) groups
    assert adv[3] - adv[1] > 0.5


def test_grpo_weights_and_scales():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    adv = grpo_advantages(r, 2, weights=[2.0, 1.0])
    # totals 2, 1 | 3, 0 -> group 1 +/- 0.5/(0.7071+eps), group 2 +/- 1.5/(2.1213+eps)
    assert adv.tolist() == pytest.approx(
        [
            0.5 / (math.sqrt(0.5) + EPS),
            -0.5 / (math.sqrt(0.5) + EPS),
            1.5 / (math.sqrt(4.5) + EPS),
            -1.5 / (math.sqrt(4.5) + EPS),
        ],
        abs=1e-6,
    )
    centred = grpo_advantages(r, 2, weights=[2.0, 1.0], scale="none")
    assert centred.tolist() == pytest.approx([0.5, -0.5, 1.5, -1.5])
    batch = grpo_advantages(r, 2, weights=[2.0, 1.0], scale="batch")
    std = torch.tensor([0.5, -0.5, 1.5, -1.5]).std().item()
    assert batch.tolist() == pytest.approx([x / (std + EPS) for x in [0.5, -0.5, 1.5, -1.5]], abs=1e-6)


def test_nan_rewards_never_leak_and_all_nan_sample_gets_zero():
    nan = float("nan")
    r = torch.tensor([[1.0, nan], [0.0, 1.0], [nan, nan], [1.0, 0.0]])
    for adv in (gdpo_advantages(r, 2), grpo_advantages(r, 2)):
        assert torch.isfinite(adv).all()
        assert adv[2] == 0.0
    # NaN is left out of the statistics: in group 2 each reward has one scored value -> no signal
    adv = gdpo_advantages(r, 2)
    assert adv[3] == 0.0
    assert adv[0] > 0 > adv[1] and adv[0] == pytest.approx(-adv[1].item())


def test_zero_variance_group_gets_exact_zero():
    r = torch.tensor([[0.3, 1.0], [0.3, 1.0], [0.3, 1.0], [0.3, 1.0]])
    assert torch.equal(gdpo_advantages(r, 2), torch.zeros(4))
    assert torch.equal(grpo_advantages(r, 2), torch.zeros(4))
    assert zero_variance_groups(r, 2).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="groups of group_size=3"):
        gdpo_advantages(torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="K=2"):
        grpo_advantages(torch.zeros(4, 2), 2, weights=[1.0])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        gdpo_advantages(torch.zeros(4), 2)


def test_conditioned_rewards_gate_on_raw_primary():
    nan = float("nan")
    r = torch.tensor([[1.0, 0.8], [0.0, 0.9], [0.5, 0.7], [nan, 0.6]])
    out = apply_conditions(r, [None, (0, 1.0)])
    assert out[:, 0].tolist()[:3] == [1.0, 0.0, 0.5]
    assert out[:3, 1].tolist() == pytest.approx([0.8, 0.0, 0.0])
    assert math.isnan(out[3, 1])
    with pytest.raises(ValueError, match="itself"):
        apply_conditions(r, [None, (1, 1.0)])


group_shapes = st.tuples(st.integers(1, 4), st.integers(2, 5), st.integers(1, 3))


@st.composite
def reward_batches(draw):
    groups, size, k = draw(group_shapes)
    values = draw(st.lists(st.integers(0, 3), min_size=groups * size * k, max_size=groups * size * k))
    return torch.tensor(values, dtype=torch.float64).view(groups * size, k), size


@settings(max_examples=EXAMPLES, deadline=None)
@given(reward_batches(), st.floats(0.1, 100.0), st.data())
def test_gdpo_invariant_to_positive_rescaling_of_one_reward(batch, scale, data):
    r, size = batch
    k = data.draw(st.integers(0, r.shape[1] - 1))
    scaled = r.clone()
    scaled[:, k] *= scale
    # eps = 0: the property is exact there; with eps > 0 it holds up to O(eps / std), which the
    # batch normalization can amplify when a batch's summed z-scores all but cancel
    a = gdpo_advantages(r, size, eps=0.0)
    b = gdpo_advantages(scaled, size, eps=0.0)
    assert torch.allclose(a, b, atol=1e-6)


@settings(max_examples=EXAMPLES, deadline=None)
@given(reward_batches(), st.randoms(use_true_random=False))
def test_permutation_within_groups_is_equivariant(batch, rnd):
    r, size = batch
    n = r.shape[0]
    perm = []
    for g in range(n // size):
        idx = list(range(g * size, (g + 1) * size))
        rnd.shuffle(idx)
        perm += idx
    perm = torch.tensor(perm)
    for fn in (gdpo_advantages, grpo_advantages):
        assert torch.allclose(fn(r[perm], size), fn(r, size)[perm], atol=1e-9)


@settings(max_examples=EXAMPLES, deadline=None)
@given(reward_batches(), st.data())
def test_no_nan_leaves_with_random_missing_rewards(batch, data):
    r, size = batch
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=r.numel(), max_size=r.numel()))).view(r.shape)
    r = r.masked_fill(mask, float("nan"))
    for adv in (gdpo_advantages(r, size), grpo_advantages(r, size), grpo_advantages(r, size, scale="batch")):
        assert torch.isfinite(adv).all()
        assert (adv[mask.all(1)] == 0).all()
