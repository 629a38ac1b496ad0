"""Bounded staleness on the tiny task: held-out accuracy, tokens and step time at trainer.max_staleness
k = 0, 1, 2, with and without the rollout correction, over several seeds, side by side in one invocation.

    .venv/bin/python bench/bench_staleness.py [--seeds 0,1,2] [--arms k0,k1-tis,k2-tis,k2-none]
        [--out /tmp/bench_staleness] [overrides ...]

Each (arm, seed) is one ``gdpo train`` of the embedded default config (the demo: 150 GDPO steps of the
tiny policy) in a process of its own, ``trainer.seed`` = the seed (prompt order, sampling seeds, the
adapters' initialization); the SFT policy is the same cached build for all. Reported per arm: the final
held-out greedy accuracy and mean tokens (mean over seeds, and their spread min..max), the median
step time after the first 5 steps, and the mean of the per-step mismatch KL, correction weights and
staleness. The arms run one after another on the same machine (the CPU is printed): rollout and
learner share its cores, so the step time shows what the overlap costs or buys here, not on GPUs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "k0": ["trainer.max_staleness=0"],
    "k1-tis": ["trainer.max_staleness=1", "algorithm.rollout_correction=tis"],
    "k2-tis": ["trainer.max_staleness=2", "algorithm.rollout_correction=tis"],
    "k2-none": ["trainer.max_staleness=2", "algorithm.rollout_correction=none"],
    "k2-mis": ["trainer.max_staleness=2", "algorithm.rollout_correction=mis"],
}
# the same arms with the cores split between the engine and the learner (one thread each on two cores):
# overlapped, each would otherwise run as many threads as there are cores, and they contend
SPLIT = ["rollout.cpu_threads=1", "learner.cpu_threads=1"]
ARMS.update({f"{name}-split": [*arm, *SPLIT] for name, arm in list(ARMS.items()) if name != "k0"})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(out: Path, arm: str, seed: int, overrides: list[str]) -> dict:
    run_dir = out / f"{arm}-s{seed}"
    cmd = [sys.executable, "-m", "gdpo.cli", "train", f"trainer.output_dir={run_dir}", f"trainer.seed={seed}"]
    cmd += ARMS[arm] + overrides
    t0 = time.time()
    log = out / f"{arm}-s{seed}.log"
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {rc}); see {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[5:] or rows
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in rows)  # noqa: E731
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": time.time() - t0,
        "baseline_accuracy": summary["baseline"]["accuracy"],
        "baseline_tokens": summary["baseline"]["mean_tokens"],
        "accuracy": summary["final"]["accuracy"],
        "mean_tokens": summary["final"]["mean_tokens"],
        "step_s_median": statistics.median(r["time/step"] for r in timed),
        "mismatch_kl_mean": mean("mismatch_kl"),
        "is_weight_mean": mean("is_weight_mean"),
        "is_weight_max": max(r.get("is_weight_max", 0.0) for r in rows),
        "is_capped_frac_mean": mean("is_capped_frac"),
        "staleness_mean": mean("staleness"),
    }


def table(results: list[dict], arms: list[str]) -> str:
    lines = [
        "| arm | seeds | final accuracy: mean (min..max) | final mean tokens: mean (min..max) | step s (median) "
        "| mismatch KL | weight mean / max | capped | staleness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        tok = [r["mean_tokens"] for r in rs]
        lines.append(
            f"| {arm} | {len(rs)} | {statistics.fmean(acc):.1%} ({min(acc):.1%}..{max(acc):.1%}) "
            f"| {statistics.fmean(tok):.1f} ({min(tok):.1f}..{max(tok):.1f}) "
            f"| {statistics.median(r['step_s_median'] for r in rs):.2f} "
            f"| {statistics.fmean(r['mismatch_kl_mean'] for r in rs):.2e} "
            f"| {statistics.fmean(r['is_weight_mean'] for r in rs):.3f} / {max(r['is_weight_max'] for r in rs):.2f} "
            f"| {statistics.fmean(r['is_capped_frac_mean'] for r in rs):.2%} "
            f"| {statistics.fmean(r['staleness_mean'] for r in rs):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="k0,k1-tis,k2-tis,k2-none")
    ap.add_argument("--out", default="/tmp/bench_staleness")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown} (known: {', '.join(ARMS)})")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}; arms {arms}; seeds {seeds}", flush=True)
    results = []
    for seed in seeds:  # seed-major: a cut-short invocation still has every arm at the first seeds
        for arm in arms:
            r = run_one(out, arm, seed, args.overrides)
            results.append(r)
            print(json.dumps(r), flush=True)
            (out / "results.json").write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2))
    print(table(results, arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
