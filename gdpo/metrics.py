"""Run observability: metrics.jsonl, TensorBoard, and a progress bar with the numbers that matter."""
from __future__ import annotations

import json
import math
from pathlib import Path

BAR_KEYS = (("reward/accuracy/mean", "acc"), ("tokens/mean", "tok"), ("tokens/p90", "p90"),
            ("clip_ratio", "clip"), ("time/rollout", "roll"), ("time/reward", "rew"), ("time/logprobs", "lp"),
            ("time/update", "upd"), ("time/sync", "sync"), ("time/idle", "idle"), ("time/overhead_frac", "ovh"),
            ("perf/rollout_tokens_per_s", "gen/s"), ("perf/learner_tokens_per_s", "learn/s"))


def token_stats(counts: list[int]) -> dict[str, float]:
    s = sorted(counts)
    if not s:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "max": math.nan}
    pick = lambda q: float(s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)])  # noqa: E731
    return {"mean": sum(s) / len(s), "p50": pick(0.5), "p90": pick(0.9), "max": float(s[-1])}


class MetricsLogger:
    def __init__(self, out: Path, total_steps: int, initial: int = 0):
        """Appends to ``metrics.jsonl``, first dropping rows past ``initial`` (steps a resume redoes)."""
        from tqdm import tqdm

        path = out / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line)["step"] <= initial]
            if len(kept) != len(rows):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; a broken install only loses the TB view
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=initial, desc="gdpo", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["step"])
        rewards = {k.split("/")[1]: v for k, v in row.items() if k.startswith("reward/") and k.endswith("/mean")}
        post = {short: f"{row[k]:.3g}" for k, short in BAR_KEYS if k in row and k != "reward/accuracy/mean"}
        post = {**{n[:8]: f"{v:.3f}" for n, v in rewards.items()}, **post}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
