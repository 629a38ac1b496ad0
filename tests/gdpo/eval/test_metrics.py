"""pass@k, length statistics and AES against hand-computed values."""

import math
from itertools import combinations

import pytest

from gdpo.eval import metrics as em


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (5, 2, 4), (6, 0, 3), (6, 6, 1), (8, 3, 5)])
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert em.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert em.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=3, c=4, k=1"):
        em.pass_at_k(3, 4, 1)


def test_summarize_by_hand():
    # 2 prompts x 3 samples: prompt 0 -> correct, wrong, correct; prompt 1 -> all wrong
    correct = [True, False, True, False, False, False]
    tokens = [10, 40, 20, 50, 60, 100]
    truncated = [False, False, False, False, False, True]
    m = em.summarize(correct, tokens, truncated, [0, 0, 0, 1, 1, 1], ks=[2])
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["pass@3"] == pytest.approx(0.5)  # prompt 0 solved, prompt 1 not
    assert m["pass@2"] == pytest.approx((1 - 0 / 3 + 0) / 2)  # prompt 0: 1 - C(1,2)/C(3,2) = 1
    assert m["mean_tokens"] == pytest.approx(280 / 6)
    assert m["median_tokens"] == pytest.approx(45)
    assert m["p90_tokens"] == pytest.approx(80)  # numpy's linear interpolation: 60 + 0.5 * 40
    assert m["mean_tokens_correct"] == pytest.approx(15) and m["mean_tokens_incorrect"] == pytest.approx(62.5)
    assert m["truncation_rate"] == pytest.approx(1 / 6)
    assert m["accuracy_per_1k_tokens"] == pytest.approx(1000 * (2 / 6) / (280 / 6))
    assert (m["prompts"], m["samples_per_prompt"], m["samples"]) == (2, 3, 6)


def test_summarize_rejects_uneven_groups():
    with pytest.raises(ValueError, match="same number of samples"):
        em.summarize([True, False, True], [1, 2, 3], [False] * 3, [0, 0, 1])


def test_aes_rewards_shorter_and_punishes_accuracy_loss_more_than_it_rewards_gain():
    assert em.aes(0.8, 100, 0.8, 100) == 0.0
    assert em.aes(0.8, 50, 0.8, 100) == pytest.approx(0.5)  # half the tokens, same accuracy
    assert em.aes(0.88, 100, 0.8, 100) == pytest.approx(3 * 0.1)  # +10% relative accuracy, beta = 3
    assert em.aes(0.72, 100, 0.8, 100) == pytest.approx(-5 * 0.1)  # -10% relative accuracy, gamma = 5
    out = em.against_base({"accuracy": 0.75, "mean_tokens": 40.0}, {"accuracy": 0.8, "mean_tokens": 80.0})
    assert out["token_reduction_pct"] == pytest.approx(50.0)
    assert out["accuracy_change_pt"] == pytest.approx(-5.0)
    assert out["aes"] == pytest.approx(0.5 - 5 * 0.0625)
    assert out["aes_coefficients"] == {"alpha": 1.0, "beta": 3.0, "gamma": 5.0}


def test_floor_figures_and_the_shortcut_detector():
    from gdpo.eval.metrics import floor_metrics, skips_required_steps

    shortest = "3+4=7\n7-2=5\n\\boxed{5}"
    assert not skips_required_steps("we need 3+4-2\n3+4=7\ncheck: 7 is right\n7-2=5\n\\boxed{5}", shortest)
    assert skips_required_steps("3+4-2=5\n\\boxed{5}", shortest)  # one line for two steps: a shortcut
    assert skips_required_steps("7-2=5\n3+4=7\n\\boxed{5}", shortest)  # out of order
    m = floor_metrics(
        [20, 30, 10, 40],
        [20, 20, 20, 20],
        [True, True, True, False],
        [shortest, "x", "3+4-2=5\n\\boxed{5}", "y"],
        [shortest] * 4,
    )
    assert m["floor_tokens"] == 20 and m["tokens_over_floor"] == pytest.approx(25 / 20)
    assert m["below_floor_rate"] == 0.25  # the 10-token answer
    assert m["shortcut_rate"] == 0.5  # two correct answers lack a required line ("x" and the one-line answer)
