"""Run observability: metrics.jsonl, TensorBoard, and a progress bar with the numbers that matter."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from gdpo.eval.metrics import percentile
from gdpo.fileio import atomic_write_text

BAR_KEYS = (
    ("reward/accuracy/mean", "acc"),
    ("tokens/mean", "tok"),
    ("tokens/p90", "p90"),
    ("clip_ratio", "clip"),
    ("time/rollout", "roll"),
    ("time/reward", "rew"),
    ("time/logprobs", "lp"),
    ("time/update", "upd"),
    ("time/sync", "sync"),
    ("time/idle", "idle"),
    ("time/overhead_frac", "ovh"),
    ("perf/rollout_tokens_per_s", "gen/s"),
    ("perf/learner_tokens_per_s", "learn/s"),
)


def token_stats(counts: list[int]) -> dict[str, float]:
    """A step's completion lengths; percentiles as every held-out figure computes them
    (``gdpo.eval.metrics.percentile``)."""
    if not counts:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "max": math.nan}
    return {
        "mean": sum(counts) / len(counts),
        "p50": percentile(counts, 50),
        "p90": percentile(counts, 90),
        "max": float(max(counts)),
    }


def read_rows(path: Path, log: Callable[[str], None] = print) -> list[dict]:
    """The rows of a ``metrics.jsonl``. A last line that is not whole JSON (a write cut short by a full
    disk or a lost machine) is dropped with a warning; a damaged line before it is an error that names
    the file and line, since the rows after it cannot be trusted either."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row (no integer 'step')")
        except ValueError as err:
            if all(not rest.strip() for rest in lines[n:]):
                log(f"warning: {path}:{n}: dropping a torn last row ({err})")
                break
            raise ValueError(f"{path}:{n}: damaged metrics row ({err})") from None
        rows.append(row)
    return rows


class MetricsLogger:
    def __init__(self, out: Path, total_steps: int, initial: int = 0, log: Callable[[str], None] = print, trackers=()):
        """Appends to ``metrics.jsonl``, first dropping rows past ``initial`` (steps a resume redoes) and a
        torn last row, and hands every row to the ``trackers`` already started (gdpo.trackers)."""
        from tqdm import tqdm

        path = out / "metrics.jsonl"
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            kept = [row for row in read_rows(path, log) if row["step"] <= initial]
            rewritten = "".join(json.dumps(row) + "\n" for row in kept)
            if rewritten != text:
                atomic_write_text(path, rewritten)
        self.file = path.open("a", encoding="utf-8")
        self.trackers, self.log_fn = list(trackers), log
        self.bar = tqdm(total=total_steps, initial=initial, desc="gdpo", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # a row is on disk before the step's checkpoint refers to it
        self.track(row)
        rewards = {k.split("/")[1]: v for k, v in row.items() if k.startswith("reward/") and k.endswith("/mean")}
        post = {short: f"{row[k]:.3g}" for k, short in BAR_KEYS if k in row and k != "reward/accuracy/mean"}
        post = {**{n[:8]: f"{v:.3f}" for n, v in rewards.items()}, **post}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def track(self, row: dict) -> None:
        """A row for the trackers (alone: the held-out evaluations before and after training, which
        summary.json keeps rather than metrics.jsonl). A tracker that fails mid-run (its server gone) is
        warned about and left out from then on: metrics.jsonl keeps every row, and the run goes on."""
        for tracker in list(self.trackers):
            try:
                tracker.log(row)
            except Exception as err:  # any tracker's own error types
                self.trackers.remove(tracker)
                self.log_fn(
                    f"warning: tracker {tracker.name} failed at step {row.get('step')} ({type(err).__name__}: "
                    f"{err}); it is off for the rest of this run (metrics.jsonl has every row)"
                )

    def close(self) -> None:
        self.bar.close()
        self.file.close()  # the trackers belong to whoever opened them (gdpo.trainer.train closes them)
