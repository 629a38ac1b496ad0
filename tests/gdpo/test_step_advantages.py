"""The trainer's advantage stage: conditions, the zero-variance filter, then the estimator on what is kept."""

import pytest
import torch

from gdpo.advantages import gdpo_advantages
from gdpo.config import load_config
from gdpo.trainer import compute_advantages

REWARDS = "rewards.functions=[{name: accuracy}, {name: length_budget, condition_on: accuracy}]"


def test_gdpo_batch_statistics_are_those_of_the_kept_groups():
    cfg = load_config(None, [REWARDS, "rollout.samples_per_prompt=2", "algorithm.filter_zero_variance=[accuracy]"])
    values = torch.tensor(
        [
            [1.0, 1.0],
            [0.0, 1.0],  # group 0: accuracy varies -> kept
            [1.0, 0.0],
            [1.0, 1.0],  # group 1: all correct -> filtered
            [0.0, 0.0],
            [1.0, 0.0],
        ]
    )  # group 2: kept
    step = compute_advantages(values, ["accuracy", "length_budget"], cfg)
    assert step.keep.tolist() == [True, True, False, False, True, True]
    assert step.raw[1, 1] == 0.0  # length paid only to correct answers (Eq. 8)
    kept = gdpo_advantages(step.raw[step.keep], 2, [1.0, 1.0])
    assert torch.equal(step.values[step.keep], kept) and (step.values[~step.keep] == 0).all()
    everything = gdpo_advantages(step.raw, 2, [1.0, 1.0])  # the filtered group's zeros in the batch std
    assert not torch.allclose(everything[step.keep], kept)
    assert step.values[step.keep].std() == pytest.approx(1.0, abs=1e-3)  # unit scale on the trained samples


def test_without_the_filter_every_sample_is_kept():
    cfg = load_config(None, [REWARDS, "rollout.samples_per_prompt=2", "algorithm.estimator=grpo"])
    values = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    step = compute_advantages(values, ["accuracy", "length_budget"], cfg)
    assert step.keep.all() and step.flat.tolist() == [[False, False], [True, False]]
    assert step.values[0] > 0 > step.values[1]
