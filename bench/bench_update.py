"""Where one learner update goes at the throughput benchmark's shape, against its matmul floor.

    .venv/bin/python bench/bench_update.py [--out /tmp/bench_update] [--repeats 3] [--kl 0.05]

One ``gdpo.learner.train_step`` on the step of ``bench_throughput.py`` (its 24M-parameter policy, DoRA
rank 8 on every projection, 8 x 8 sequences of the benchmark's prompts plus exactly 256 completion
tokens, micro-batches of 32), in this process: no Ray, no vLLM, nothing else running beside it. The
engine is ``learner.PlainEngine`` (the same forward, loss, backward and AdamW step as DeepSpeed's
engine; DeepSpeed ZeRO-2 with one rank measured 19.8 s against its 20.2 s on the AVX2 EPYC, i.e. equal
within noise), so the figure is the update's own cost, the part of a gdpo step that Ray and the
other processes of a run can only make slower.

Reported: the update's median seconds over ``--repeats`` after a warm-up, beside its floor (forward 2N
+ activation backward 2N per token at the best fp32 matmul rate measured here, as
``bench_throughput.py`` counts it); with ``--kl`` > 0 also the reference pass (adapters off, forward
only, floor 2N per token). Then torch's profiler over one more update splits its CPU time into matrix
multiplies (``mm``/``addmm``/``bmm``: the projections, the adapters' rank-r products, the vocabulary
head), attention (the ``scaled_dot_product`` kernels, forward and backward: work the floor does not
count) and everything else (elementwise ops, norms, reductions, copies: memory-bound, also outside the
floor). The CPU is printed: shares differ between an AVX2 EPYC and an AMX Xeon.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def make_batch(cfg, tokens: int, prompts: int, samples: int, seed: int = 0):
    """The benchmark's step as the trainer hands it to a learner: each prompt ``samples`` times, followed by
    ``tokens`` random completion tokens, through ``TrainBatch.from_rollouts``."""
    import torch
    from transformers import AutoTokenizer

    from gdpo.data import load_prompts
    from gdpo.records import RolloutBatch, TrainBatch

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    texts = load_prompts(cfg.data, "train", seed=0).prompts[:prompts]
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = [tok(text)["input_ids"] for text in texts for _ in range(samples)]
    completion_ids = [torch.randint(3, len(tok), (tokens,), generator=gen).tolist() for _ in prompt_ids]
    rollouts = RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        completions=[""] * len(prompt_ids),
        finish_reasons=["length"] * len(prompt_ids),
        sampling_logprobs=[[0.0] * tokens for _ in prompt_ids],
        group_ids=[i // samples for i in range(len(prompt_ids))],
        policy_version=0,
    )
    return TrainBatch.from_rollouts(rollouts, torch.randn(len(prompt_ids), generator=gen), tok.pad_token_id)


def profile_split(fn) -> dict:
    """CPU seconds of one call of ``fn`` by kind: matmul, attention, other (torch profiler, self time), and
    the largest ops of 'other'."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split, others = {"matmul": 0.0, "attention": 0.0, "other": 0.0}, {}
    for ev in prof.key_averages():
        kind = "matmul" if ev.key in MATMUL_OPS else "attention" if "scaled_dot_product" in ev.key else "other"
        split[kind] += ev.self_cpu_time_total / 1e6
        if kind == "other":
            others[ev.key] = ev.self_cpu_time_total / 1e6
    split["largest_other"] = dict(sorted(others.items(), key=lambda kv: -kv[1])[:8])
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_update"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kl", type=float, default=0.0, help="> 0: also time the reference pass")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=32)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    import bench_throughput as bt
    from gdpo import learner

    shared = SimpleNamespace(
        out=args.out, tokens=args.tokens, samples=args.samples, prompts=args.prompts, steps=1, lr=1e-3,
        micro=args.micro, heldout=1, vllm_reserved_cores="null", vllm_in_process="null",
    )  # fmt: skip
    bt.build_policy(args.out / "policy")
    cfg = bt.load_cfg(shared, f"algorithm.kl_coef={args.kl}")
    learner.set_cpu_threads(cfg)
    cpu = bt.cpu_info()
    work = bt.learner_work(shared)
    matmul_shape = (args.micro * args.tokens, work["hidden"], work["intermediate"])
    gflops_before = bt.matmul_gflops(*matmul_shape)
    batch = make_batch(cfg, args.tokens, args.prompts, args.samples)
    tokens = float(batch.attention_mask.sum())
    model, _ = learner.build_policy(str(cfg.model.path), cfg)
    engine = learner.PlainEngine(model, cfg)
    denominators = dict(global_tokens=float(batch.loss_mask[:, 1:].sum()), global_seqs=float(len(batch)), world_size=1)

    def update():
        learner.train_step(engine, batch, cfg, **denominators)

    def reference():
        learner.sequence_logprobs(model, batch, args.micro, adapters=False)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    matmul_params = work["matmul_params"]
    result = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "sequences": len(batch),
    }
    rows = [("update (train_step)", update, 4)] + ([("reference pass", reference, 2)] if args.kl > 0 else [])
    for name, fn, _ in rows:
        times = timed(fn)
        result[name] = {"seconds": statistics.median(times), "all": times, "split": profile_split(fn)}
    # the floor's rate: the faster of before and after the passes, as bench_throughput.py takes it
    result["matmul_GFLOP_s"] = max(gflops_before, bt.matmul_gflops(*matmul_shape))
    for name, _, passes in rows:
        result[name]["floor_s"] = passes * matmul_params * tokens / (result["matmul_GFLOP_s"] * 1e9)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))

    print(
        f"CPU: {cpu['model']}, {cpu['cores']} cores, AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512']}, AMX {cpu['amx']}; "
        f"{result['threads']} threads; fp32 matmul {result['matmul_GFLOP_s']:.0f} GFLOP/s (best)\n"
        f"{len(batch)} sequences, {tokens:.0f} tokens, micro-batch {args.micro}, median of {args.repeats}\n"
    )
    print("| pass | s | floor s | x floor | profiled: matmul s | attention s | other s |")
    print("|---|---|---|---|---|---|---|")
    for name, *_ in rows:
        r = result[name]
        sp = r["split"]
        print(
            f"| {name} | {r['seconds']:.2f} | {r['floor_s']:.2f} | {r['seconds'] / r['floor_s']:.2f} | "
            f"{sp['matmul']:.2f} | {sp['attention']:.2f} | {sp['other']:.2f} |"
        )
    for name, *_ in rows:
        top = ", ".join(f"{k} {v:.2f}" for k, v in result[name]["split"]["largest_other"].items())
        print(f"{name}, largest of 'other' (s): {top}")


if __name__ == "__main__":
    main()
