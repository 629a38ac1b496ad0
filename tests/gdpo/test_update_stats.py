"""The learners' typed update statistics: ranks add up, the global grad norm is not summed, and a step's
figures are per token over all ranks and optimizer steps."""

import pytest

from gdpo.records import UpdateStats, UpdateSums


def test_ranks_add_up_and_the_step_reports_per_token_figures():
    a = UpdateSums(loss=0.5, kl_tokens=2.0, clipped_tokens=1.0, entropy_tokens=30.0, tokens=10.0,
                   forward_tokens=40.0, padded_tokens=50.0, drift_tokens=0.1, grad_norm=0.7)  # fmt: skip
    b = UpdateSums(loss=0.25, kl_tokens=1.0, clipped_tokens=2.0, entropy_tokens=15.0, tokens=5.0,
                   forward_tokens=20.0, padded_tokens=30.0, drift_tokens=0.05, grad_norm=0.7)  # fmt: skip
    rank_sum = a + b
    assert rank_sum.tokens == 15.0 and rank_sum.grad_norm == 0.7  # one global norm, not 1.4
    later = UpdateSums(
        loss=0.25, kl_tokens=0.0, tokens=15.0, forward_tokens=60.0, padded_tokens=80.0, drift_tokens=9.0, grad_norm=0.3
    )
    stats = UpdateStats.from_sums([rank_sum, later])  # two optimizer steps (learner.updates_per_step=2)
    assert stats.loss == pytest.approx((0.75 + 0.25) / 2)
    assert stats.kl == pytest.approx(3.0 / 30.0) and stats.clip_ratio == pytest.approx(3.0 / 30.0)
    assert stats.entropy == pytest.approx(45.0 / 30.0) and stats.grad_norm == pytest.approx(0.5)
    assert stats.logprob_drift == pytest.approx(0.15 / 15.0)  # the first optimizer step only: before any update
    assert stats.forward_tokens == 120.0 and stats.padding_frac == pytest.approx(1 - 120.0 / 160.0)
    assert set(stats.row()) == {
        "loss", "kl", "clip_ratio", "entropy", "grad_norm", "logprob_drift", "forward_tokens", "padding_frac"
    }  # fmt: skip
