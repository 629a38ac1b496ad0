"""Torch threads of the CPU workers: the ``*.cpu_threads`` keys resolved on the machine that runs them."""

from __future__ import annotations

import os

from gdpo.config import Config


def cpu_threads_per_worker(setting: int, workers: int, share: int = 1) -> int:
    """Torch threads of one CPU worker for a ``*.cpu_threads`` key: the setting, or 0 = this machine's cores
    (``1 / share`` of them) shared among ``workers`` (at least one each)."""
    return setting or max(1, (os.cpu_count() or 1) // share // workers)


def cpu_share(cfg: Config) -> int:
    """The parts a CPU's cores are split into between engines and learners: 2 when the engines generate
    during the update on the same machines (``trainer.max_staleness`` > 0, colocated), else 1 (they take
    turns). Overlapped with every core each, the two OpenMP teams contend: on a 2-core Xeon the tiny
    task's step took 4.7 s against 1.0 s with the cores split (bench/RESULTS.md)."""
    return 2 if cfg.trainer.max_staleness > 0 and cfg.cluster.placement == "colocated" else 1
