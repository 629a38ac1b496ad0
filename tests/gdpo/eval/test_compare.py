"""gdpo compare's pure parts: arms, the joint-success metric, spread-matched weights, paired differences."""

import pytest

from gdpo.eval.compare import joint_success, matched_weights, paired_differences, parse_arms
from gdpo.config import ConfigError, load_config


def test_arms_from_estimators_and_specs():
    arms = parse_arms(["grpo", "gdpo", "grpo-matched"], ["dr-grpo: algorithm.estimator=grpo algorithm.grpo_scale=none"])
    assert [a.name for a in arms] == ["grpo", "gdpo", "grpo-matched", "dr-grpo"]
    assert arms[2].overrides == ("algorithm.estimator=grpo",) and arms[2].matched_weights
    assert arms[3].overrides == ("algorithm.estimator=grpo", "algorithm.grpo_scale=none")
    with pytest.raises(ConfigError, match="unknown arm 'ppo'"):
        parse_arms(["ppo"])
    with pytest.raises(ConfigError, match="distinct names"):
        parse_arms(["gdpo"], ["gdpo: trainer.steps=3"])


def _row(i, **rewards):
    return {"prompt_index": i, "rewards": rewards}


def test_joint_success_needs_every_named_reward_at_one():
    rows = [
        _row(0, accuracy=1.0, no_restate=1.0),
        _row(0, accuracy=1.0, no_restate=0.0),
        _row(1, accuracy=0.0, no_restate=1.0),
        _row(1, accuracy=None, no_restate=1.0),
    ]
    assert joint_success(rows, ["accuracy", "no_restate"]) == 0.25
    assert joint_success(rows, ["no_restate"]) == 0.75


def test_matched_weights_equalize_each_rewards_spread_conditions_applied():
    cfg = load_config(
        None,
        [
            "rewards.functions=[{name: accuracy}, {name: chain_credit, weight: 2.0}, "
            "{name: tight_budget, condition_on: accuracy}]"
        ],
    )
    rows = [
        _row(0, accuracy=1.0, chain_credit=3.0, tight_budget=1.0),
        _row(0, accuracy=0.0, chain_credit=-3.0, tight_budget=1.0),
        _row(1, accuracy=1.0, chain_credit=1.0, tight_budget=0.0),
        _row(1, accuracy=1.0, chain_credit=1.0, tight_budget=0.0),
    ]
    w = matched_weights(rows, cfg)
    # accuracy: spreads 0.5 (prompt 0) and 0 (prompt 1) -> 0.25; credit: 3 and 0 -> 1.5, weight 2 / 1.5;
    # tight_budget paid only when correct: (1, 0) and (0, 0) -> 0.25
    assert w == pytest.approx([4.0, 2.0 / 1.5, 4.0])


def test_paired_differences_are_per_seed():
    results = {
        "grpo": [{"joint": 0.2}, {"joint": 0.3}, {"joint": 0.1}],
        "gdpo": [{"joint": 0.4}, {"joint": 0.4}, {"joint": 0.2}],
    }
    d = paired_differences(results)["grpo"]
    assert d["per_seed"] == pytest.approx([0.2, 0.1, 0.1]) and d["mean"] == pytest.approx(0.4 / 3)
    assert d["ci95"][0] < d["mean"] < d["ci95"][1] and d["seeds"] == 3
    assert paired_differences({"grpo": results["grpo"]}) == {}
