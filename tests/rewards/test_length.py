import math

import pytest

from rewards import BoundReward, RewardError, score_rewards
from rewards.format import format_reward
from rewards.length import cosine_length, dapo_overlong, efficient_sigmoid, kimi_length, l1_exact, l1_max, length_budget


def test_length_budget():
    assert length_budget([], ["", "", ""], [10, 32, 33], max_tokens=32) == [1.0, 1.0, 0.0]


def test_dapo_overlong_eq13():
    # L_max 100, L_cache 20: flat to 80, linear to -1 at 100, -1 beyond
    assert dapo_overlong([], [""] * 4, [80, 90, 100, 101], max_tokens=100, cache_tokens=20) == [0.0, -0.5, -1.0, -1.0]


def test_kimi_length_hand_computed():
    rewards = {"accuracy": [1.0, 1.0, 0.0, 0.0, 1.0]}
    out = kimi_length([], [""] * 5, [10, 20, 30, 5, 7], group_ids=[0, 0, 0, 1, 1], rewards=rewards)
    # group 0: min 10, max 30 -> lambda 0.5, 0, -0.5 ; incorrect -> min(0, lambda)
    # group 1: min 5, max 7 -> lambda 0.5 (incorrect -> 0), -0.5 (correct)
    assert out == [0.5, 0.0, -0.5, 0.0, -0.5]


def test_cosine_length_is_the_papers_and_its_exceed_penalty_fires():
    acc = {"accuracy": [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]}
    out = cosine_length([], [""] * 6, [0, 99, 0, 99, 100, 100], rewards=acc, max_tokens=100)
    # Yeo et al.: r0_c = 2, rL_c = 1, r0_w = -10, rL_w = 0; reaching T (cut off there) = r_exceed = -10
    assert out[0] == pytest.approx(2.0) and out[1] == pytest.approx(1.0, abs=1e-3)
    assert out[2] == pytest.approx(-10.0) and out[3] == pytest.approx(0.0, abs=1e-2)
    assert out[4] == out[5] == -10.0
    mid = cosine_length([], [""], [50], rewards={"accuracy": [1.0]}, max_tokens=100)[0]
    assert mid == pytest.approx(1.5)
    # with the defaults, a completion truncated at the tiny config's rollout.max_new_tokens (128) is penalized
    assert cosine_length([], [""] * 2, [128, 127], rewards={"accuracy": [1.0, 1.0]})[0] == -10.0


def test_l1_exact_and_max():
    acc = {"accuracy": [1.0, 0.0, 1.0]}
    assert l1_exact([], [""] * 3, [100, 100, 200], target_tokens=100, rewards=acc, alpha=0.001) == pytest.approx(
        [1.0, 0.0, 0.9]
    )
    out = l1_max([], [""] * 3, [100, 100, 2000], target_tokens=[100, 100, 100], rewards=acc, alpha=0.001, delta=0.5)
    assert out == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(RewardError, match="target_tokens"):
        l1_max([], [""] * 2, [1, 2], target_tokens=[1], rewards={"accuracy": [1.0, 1.0]})


def test_efficient_sigmoid_hand_computed():
    acc = {"accuracy": [1.0, 1.0, 0.0]}
    out = efficient_sigmoid([], [""] * 3, [10, 20, 5], group_ids=[0, 0, 0], rewards=acc, alpha=0.2)
    # correct lengths 10, 20: mean 15, std 5 -> z = -1, +1
    assert out == pytest.approx([1 - 0.2 / (1 + math.e), 1 - 0.2 / (1 + math.exp(-1)), 0.0], abs=1e-6)


def test_correctness_dependency_errors_and_none():
    with pytest.raises(RewardError, match="needs the correctness reward 'accuracy'"):
        kimi_length([], [""], [1], group_ids=[0], rewards={})
    assert cosine_length([], [""], [3], rewards={"accuracy": [None]}) == [None]


def test_length_rewards_see_earlier_columns_through_the_matrix():
    acc = BoundReward.from_name("tests.helpers.plugins:half")
    kimi = BoundReward.from_name(
        "kimi_length", {"correctness_from": "tests.helpers.plugins:half", "correct_threshold": 0.5}
    )
    m = score_rewards([acc, kimi], ["p"] * 2, ["a", "b"], [3, 9], [0, 0], {})
    assert m.values[:, 1].tolist() == [0.5, -0.5]


def test_format_reward():
    out = format_reward(
        [], ["x\n\\boxed{3}", "\\boxed{3} and more", "\\boxed{1}\\boxed{2}", "no answer", "\\boxed{\\frac{1}{2}}  "]
    )
    assert out == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward([], ["<a>1</a>", "1"], pattern=r"<a>\d+</a>") == [1.0, 0.0]
    with pytest.raises(RewardError, match="not a valid regex"):
        format_reward([], ["x"], pattern="(")
