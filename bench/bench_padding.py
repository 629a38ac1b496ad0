"""The learner's padding on the demo's real completion lengths: step-wide padding against length-sorted,
trimmed micro-batches (``gdpo.learner.micro_batches``), side by side in one process.

    .venv/bin/python bench/bench_padding.py [--policy builtin:tiny-chain-arith] [--policy runs/x/final]
        [--steps 3] [--repeats 3]

For each policy: ``--steps`` rollout batches of the default config (16 prompts x 8 samples, temperature
1.0, vLLM as the trainer builds it), then per batch one update (``train_step``, reference pass for the
default KL, AdamW over the DoRA adapters on a plain engine) in each layout, interleaved ``--repeats``
times (median). The fixed-length throughput benchmark cannot see this: its completions all have the
same length. The SFT policy's lengths are the start of a run, a trained policy's its end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import cpu_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", action="append", help="model paths (any form model.path takes); default the SFT one")
    ap.add_argument("--steps", type=int, default=3, help="rollout batches per policy")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from gdpo import learner, rollout
    from gdpo.config import load_config
    from gdpo.data import load_prompts
    from gdpo.policy import resolve_model_path
    from gdpo.records import TrainBatch

    cfg = load_config()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    torch.set_num_threads(os.cpu_count())
    prompts = load_prompts(cfg.data, "train", seed=0).prompts
    n = cfg.trainer.prompts_per_step
    cpu = cpu_info()
    print(
        f"CPU: {cpu['model']}, {cpu['cores']} cores, AVX-512 {cpu['avx512']}, AMX {cpu['amx']}; micro-batch {cfg.learner.micro_batch_per_worker}, {n} prompts x "
        f"{cfg.rollout.samples_per_prompt} samples, KL {cfg.algorithm.kl_coef}"
    )
    print(
        "| policy | step | completion tokens mean / max | padded positions: step-wide -> by length | "
        "update s: step-wide -> by length |"
    )
    print("|---|---|---|---|---|")
    for spec in args.policy or [cfg.model.path]:
        path = resolve_model_path(spec, cfg.sft, log=lambda m: None)
        llm = rollout.make_engine(path, cfg)
        batches = [
            rollout.generate(
                llm,
                prompts[k * n : (k + 1) * n],
                cfg.rollout.samples_per_prompt,
                max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature,
                seed=k,
            )
            for k in range(args.steps)
        ]
        rollout.close_engine(llm)
        model, tok = learner.build_policy(path, cfg)
        for k, rb in enumerate(batches):
            batch = TrainBatch.from_rollouts(
                rb, torch.randn(len(rb), generator=torch.Generator().manual_seed(k)), tok.pad_token_id
            )
            batch = learner.attach_logprobs(model, batch, cfg)
            mask = batch.loss_mask[:, 1:]
            denominators = dict(global_tokens=float(mask.sum()), global_seqs=float(len(rb)), world_size=1)
            times, padded = {True: [], False: []}, {}
            for _ in range(args.repeats):
                for by_length in (False, True):
                    engine = learner.PlainEngine(copy.deepcopy(model), cfg)
                    t0 = time.perf_counter()
                    sums = learner.train_step(engine, batch, cfg, by_length=by_length, **denominators)
                    times[by_length].append(time.perf_counter() - t0)
                    padded[by_length] = sums.padded_tokens
            counts = rb.completion_token_counts
            real = sums.forward_tokens
            old, new = statistics.median(times[False]), statistics.median(times[True])
            print(
                f"| {spec} | {k} | {statistics.fmean(counts):.1f} / {max(counts)} | "
                f"{padded[False]:.0f} -> {padded[True]:.0f} (real {real:.0f}: padding "
                f"{1 - real / padded[False]:.0%} -> {1 - real / padded[True]:.0%}) | {old:.2f} -> {new:.2f} "
                f"({old / new:.2f}x) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
