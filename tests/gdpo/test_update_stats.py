"""The learners' typed update statistics: ranks add up, the global grad norm is not summed, and a step's
figures are per token over all ranks and optimizer steps."""

import pytest

from gdpo.records import UpdateStats, UpdateSums


def test_ranks_add_up_and_the_step_reports_per_token_figures():
    a = UpdateSums(loss=0.5, kl_tokens=2.0, clipped_tokens=1.0, entropy_tokens=30.0, tokens=10.0,
                   forward_tokens=40.0, padded_tokens=50.0, drift_tokens=0.1, grad_norm=0.7,
                   mismatch_kl_tokens=0.02, is_weight_tokens=9.0, is_capped_tokens=1.0, is_weight_max=2.5)  # fmt: skip
    b = UpdateSums(loss=0.25, kl_tokens=1.0, clipped_tokens=2.0, entropy_tokens=15.0, tokens=5.0,
                   forward_tokens=20.0, padded_tokens=30.0, drift_tokens=0.05, grad_norm=0.7,
                   mismatch_kl_tokens=0.01, is_weight_tokens=5.0, is_weight_max=1.5)  # fmt: skip
    rank_sum = a + b
    assert rank_sum.tokens == 15.0 and rank_sum.grad_norm == 0.7  # one global norm, not 1.4
    assert rank_sum.is_weight_max == 2.5  # the largest weight over ranks, not 4.0
    later = UpdateSums(
        loss=0.25, kl_tokens=0.0, tokens=15.0, forward_tokens=60.0, padded_tokens=80.0, drift_tokens=9.0, grad_norm=0.3,
        mismatch_kl_tokens=3.0, is_weight_tokens=16.0, is_capped_tokens=2.0, is_weight_max=7.0,
    )  # fmt: skip
    stats = UpdateStats.from_sums([rank_sum, later])  # two optimizer steps (learner.updates_per_step=2)
    assert stats.loss == pytest.approx((0.75 + 0.25) / 2)
    assert stats.kl == pytest.approx(3.0 / 30.0) and stats.clip_ratio == pytest.approx(3.0 / 30.0)
    assert stats.entropy == pytest.approx(45.0 / 30.0) and stats.grad_norm == pytest.approx(0.5)
    assert stats.logprob_drift == pytest.approx(0.15 / 15.0)  # the first optimizer step only: before any update
    assert stats.mismatch_kl == pytest.approx(0.03 / 15.0)  # the first optimizer step only, like the drift
    assert stats.is_weight_mean == pytest.approx(30.0 / 30.0) and stats.is_weight_max == 7.0
    assert stats.is_capped_frac == pytest.approx(3.0 / 30.0)
    assert stats.forward_tokens == 120.0 and stats.padding_frac == pytest.approx(1 - 120.0 / 160.0)
    assert set(stats.row()) == {
        "loss", "kl", "clip_ratio", "entropy", "grad_norm", "logprob_drift", "forward_tokens", "padding_frac",
        "mismatch_kl", "is_weight_mean", "is_weight_max", "is_capped_frac",
    }  # fmt: skip
