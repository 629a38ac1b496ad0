"""Training throughput, side by side in one invocation: gdpo's trainer against TRL's GRPOTrainer.

    .venv/bin/python bench/bench_throughput.py [--steps 6] [--warmup 2] [--out /tmp/bench_throughput]
        [--runs vllm,gdpo,gdpo-ahead,trl,trl-lora] [--kl 0,0.05] [--vllm-reserved-cores 0]

TRL is a benchmark-only extra: ``pip install -e '.[bench]'``.

Every run trains the same policy on the same prompts with the same two rewards (``accuracy`` and
``length_budget`` paid only to correct answers), prompts per step, samples per prompt, completion
length, learning rate, DoRA adapters (rank 8, alpha 16, every projection) and number of steps:

- ``vllm``: vLLM alone, built exactly as the trainer's rollout workers build it, generating one step's
  batch (the rollout ceiling);
- ``gdpo`` / ``gdpo-ahead``: ``gdpo.trainer.train`` with ``trainer.max_staleness`` 0 / 1 (Ray, vLLM,
  DeepSpeed; checkpoints and periodic evaluations off inside the timed steps);
- ``trl``: ``trl.GRPOTrainer`` with ``multi_objective_aggregation="normalize_then_sum"`` (GDPO's
  per-reward normalization), loss ``dapo`` (token mean, as gdpo's ``token-mean``), the same clip range,
  generation by transformers, peft's DoRA; ``trl-lora``: the same with plain LoRA adapters (peft's
  DoRA recomputes every weight norm at each decoding step, so this is TRL's faster setting).

``--kl``: each value is one row of every training arm, the KL penalty to the base policy the same in
all of them (gdpo ``algorithm.kl_coef``, k3 estimator, adapters off for the reference; TRL ``beta``, whose
reference under peft is also the model with its adapters off). 0 is both off.

The **floor** of a step is what its work costs at this machine's speed, both measured in the same
invocation: the step's completion tokens at vLLM-alone's tokens/s (``vllm`` run), plus the learner's
matrix-multiply FLOPs (forward 2N and backward 2N per token over prompt + completion, N the policy's
matmul parameters; + 2N per token for the reference pass when KL is on; no weight gradients for the
frozen base) at the fp32 matmul rate measured at the learner's shape (the best of 7 repeats, before
and after the runs). Each step is reported as a multiple of its floor, beside the targets of issue 20:
gdpo <= 0.5x TRL's step (DoRA and LoRA), <= 1.25x its floor, rollout tokens/s >= 0.9x vLLM alone. The
CPU (model, AVX-512 / AMX) is printed and saved: ratios measured on one CPU do not carry to another.

The policy is a Qwen2-shaped model of about 24M parameters (hidden 512, 8 layers, 8 heads, 2 KV heads),
randomly initialized by this script with the project's chain-arithmetic tokenizer and saved as a
plain checkpoint that every run loads. Completions are held at exactly ``--tokens`` tokens (EOS is
suppressed before that: vLLM ``min_tokens``, transformers ``min_new_tokens``), so every run generates
the same number of tokens. Each run is its own process; peak memory is the largest resident set of
that process and all its descendants together (Ray's own processes included), sampled every second
(the sampler walks every process of the machine: at 0.2 s it took 2% of a core, stolen from the runs).
Held-out reward: after training, each final policy is sampled greedily on the same held-out prompts
by one vLLM engine and scored with the same two rewards (sum of the conditioned rewards, per prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REWARDS = "[{name: accuracy}, {name: length_budget, kwargs: {max_tokens: 48}, condition_on: accuracy}]"


def settings(args) -> list[str]:
    """gdpo config overrides shared by every run (TRL's arguments are derived from the same values)."""
    return [
        f"model.path={args.out / 'policy'}",
        f"rollout.max_new_tokens={args.tokens}",
        f"rollout.min_new_tokens={args.tokens}",
        f"rollout.samples_per_prompt={args.samples}",
        f"trainer.prompts_per_step={args.prompts}",
        f"trainer.steps={args.steps}",
        "trainer.eval_every=0",
        f"trainer.save_every={args.steps}",
        "trainer.resume=never",
        f"learner.lr={args.lr}",
        "learner.lr_schedule=constant",
        f"learner.micro_batch_per_worker={args.micro}",
        f"data.eval_size={args.heldout}",
        f"rewards.functions={REWARDS}",
        "rewards.verifier_processes=1",
        f"rollout.cpu_reserved_cores={args.vllm_reserved_cores}",
        f"rollout.in_process={args.vllm_in_process}",
    ]


def load_cfg(args, *extra):
    from gdpo.config import load_config

    return load_config(None, [*settings(args), *extra])


# ----------------------------------------------------------------------------- the policy


def build_policy(out: Path) -> dict:
    """A 24M-parameter Qwen2-shaped model, random init (seed 0), with the chain-arithmetic tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gdpo.tasks.tiny_policy import build_tokenizer

    if (out / "config.json").is_file():
        return json.loads((out / "bench_policy.json").read_text())
    tok = build_tokenizer(0)
    tok.model_max_length = 512
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}
    (tmp / "bench_policy.json").write_text(json.dumps(info))
    os.replace(tmp, out)
    return info


# ----------------------------------------------------------------------------- runs (each in its own process)


def run_vllm(args) -> dict:
    """One step's batch (prompts x samples, exactly --tokens each) from the trainer's own engine setup."""
    from gdpo import rollout
    from gdpo.data import load_prompts

    cfg = load_cfg(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    llm = rollout.make_engine(cfg.model.path, cfg)
    prompts = load_prompts(cfg.data, "train", seed=0).prompts
    sampling = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=1.0, top_p=1.0)
    rollout.generate(llm, prompts[: args.prompts], args.samples, seed=1, **sampling)  # warm-up
    rates = []
    for rep in range(args.vllm_repeats):
        batch = rollout.generate(
            llm, prompts[(rep + 1) * args.prompts : (rep + 2) * args.prompts], args.samples, seed=rep + 2, **sampling
        )
        rates.append(sum(batch.completion_token_counts) / batch.seconds)
    return {
        "rollout_tokens_per_s": statistics.median(rates),
        "rollout_tokens_per_s_all": rates,
        "tokens_per_step": sum(batch.completion_token_counts),
    }


def run_gdpo(args, ahead: int, kl: float, name: str) -> dict:
    from gdpo.trainer import train

    out = args.out / name
    cfg = load_cfg(args, f"trainer.output_dir={out}", f"trainer.max_staleness={ahead}", f"algorithm.kl_coef={kl}")
    t0 = time.time()
    train(cfg, log=print)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup : len(rows) - ahead]  # ahead: the last step has no next rollout to overlap
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    return {
        "seconds_per_step": med("time/step"),
        "step_seconds_all": [r["time/step"] for r in rows],
        "rollout_tokens_per_s": med("perf/rollout_tokens_per_s"),
        "learner_tokens_per_s": med("perf/learner_tokens_per_s"),
        "overhead_frac": med("time/overhead_frac"),
        "stages": {k: med(k) for k in timed[0] if k.startswith("time/")},
        "sync_bytes": timed[0]["sync/bytes"],
        "sync_MB_per_s": med("sync/MB_per_s"),
        "sync_publish_s": med("sync/publish_s"),
        "sync_load_s": med("sync/load_s"),
        "staleness": med("staleness"),
        "tokens_per_step": med("tokens/mean") * args.prompts * args.samples,
        "final_model": str(out / "final" / "merged"),
        "wall_s": wall,
    }


def run_heldout(args, models: dict[str, str]) -> dict:
    """Greedy samples of each final policy on the same held-out prompts, scored with the same rewards."""
    from gdpo import rollout
    from gdpo.data import load_prompts
    from gdpo.advantages import apply_conditions
    from gdpo.eval.evaluate import EvalEngine
    from gdpo.trainer import reward_conditions
    from rewards import BoundReward, score_rewards

    cfg = load_cfg(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    data = load_prompts(cfg.data, "eval", seed=0)
    bound = [BoundReward.from_name(name, kw) for name, kw in cfg.rewards.specs()]
    out = {}
    with EvalEngine() as engines:  # the final policies share one architecture: one engine, loaded in turn
        for name, path in models.items():
            llm = engines.serve(path, cfg)
            batch = rollout.generate(llm, data.prompts, 1, max_new_tokens=args.tokens, temperature=0.0, seed=0)
            m = score_rewards(
                bound,
                data.prompts,
                batch.completions,
                batch.completion_token_counts,
                list(range(len(batch))),
                data.columns,
            )
            raw = apply_conditions(m.values, reward_conditions(cfg))
            out[name] = {
                "reward": float(raw.nan_to_num(0.0).sum(1).mean()),
                "accuracy": float(raw[:, 0].nan_to_num(0.0).mean()),
                "mean_tokens": sum(batch.completion_token_counts) / len(batch),
            }
    return out


# ----------------------------------------------------------------------------- the driver


def memcpy_gb_per_s(mib: int = 512, repeats: int = 5) -> float:
    """This machine's memory-copy bandwidth (one large tensor copy, median), the yardstick for the sync."""
    import torch

    src = torch.ones(mib << 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return (mib << 20) / statistics.median(times) / 1e9


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def spawn(args, run: str, extra: list[str] = ()) -> dict:
    """Run one phase in a child process; returns its JSON result plus the peak RSS of its process tree."""
    result = args.out / f"{run}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--phase", run, *extra, *sys.argv[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(1.0)

    threading.Thread(target=sample, daemon=True).start()
    rc = proc.wait()
    done.set()
    if rc != 0:
        raise SystemExit(f"bench run '{run}' failed with exit code {rc}")
    return {**json.loads(result.read_text()), "peak_rss_gib": peak[0] / 2**30}


def cpu_info() -> dict:
    """The CPU the figures were measured on (a ratio on an AMX Xeon does not carry to an AVX2-only EPYC)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "model": f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model "
        f"{fields.get('model', '?')})",
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "amx": "amx_tile" in flags,
    }


def matmul_gflops(rows: int, hidden: int, inner: int, repeats: int = 7) -> float:
    """fp32 matmul rate at the learner's shape ([rows, hidden] x [hidden, inner] and back), the best of
    ``repeats``: the floor is what the machine can do, and on a shared machine a median (once 95 GFLOP/s
    against 133 in an earlier invocation) prices the floor by the neighbours' load."""
    import torch

    x, w = torch.randn(rows, hidden), torch.randn(hidden, inner)
    (x @ w) @ w.T  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (x @ w) @ w.T
        times.append(time.perf_counter() - t0)
    return 4 * rows * hidden * inner / min(times) / 1e9


def learner_work(args) -> dict:
    """Matmul parameters of the policy and the learner's tokens per step (prompt + completion, no padding)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from gdpo.data import load_prompts

    cfg = load_cfg(args)
    conf = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(conf)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    prompts = load_prompts(cfg.data, "train", seed=0).prompts[: args.prompts]
    prompt_tokens = statistics.fmean(len(tok(p)["input_ids"]) for p in prompts)
    return {
        "matmul_params": matmul,
        "hidden": conf.hidden_size,
        "intermediate": conf.intermediate_size,
        "tokens_per_step": args.prompts * args.samples * (prompt_tokens + args.tokens),
        "completion_tokens_per_step": args.prompts * args.samples * args.tokens,
    }


def floor_seconds(work: dict, kl: float, vllm_tok_s: float | None, gflops: float) -> dict:
    passes = 4 + (2 if kl > 0 else 0)  # forward + activation backward; the reference forward with KL
    learner = passes * work["matmul_params"] * work["tokens_per_step"] / (gflops * 1e9)
    generate = work["completion_tokens_per_step"] / vllm_tok_s if vllm_tok_s else None
    return {"learner_s": learner, "generate_s": generate, "total_s": learner + generate if generate else None}


ARMS = {
    "gdpo": "gdpo trainer: vLLM generation, Ray, DeepSpeed ZeRO-2 learner, DoRA r{r} a{a}",
    "gdpo-ahead": "gdpo trainer, trainer.max_staleness=1 (rollout of step t+1 overlaps the update of step t)",
    "trl": "TRL GRPOTrainer: transformers generation, peft DoRA r{r} a{a}",
    "trl-lora": "TRL GRPOTrainer: transformers generation, peft LoRA r{r} a{a}",
}


def arm_name(arm: str, kl: float) -> str:
    return arm if kl == 0 else f"{arm}@kl{kl:g}"


def run_phase(args, phase: str) -> dict:
    if phase == "vllm":
        return run_vllm(args)
    if phase == "heldout":
        return run_heldout(args, json.loads((args.out / "models.json").read_text()))
    arm, _, kl_text = phase.partition("@kl")
    kl = float(kl_text or 0)
    if arm in ("gdpo", "gdpo-ahead"):
        return run_gdpo(args, int(arm == "gdpo-ahead"), kl, phase)
    from bench_throughput_trl import run_trl

    return run_trl(args, arm == "trl", kl, phase)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_throughput"))
    ap.add_argument("--runs", default="vllm,gdpo,trl,trl-lora")
    ap.add_argument("--kl", default="0", help="KL coefficients, one row of every training arm each (0 = off)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=32, help="sequences per forward/backward (both trainers)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout", type=int, default=32, help="held-out prompts for the final reward")
    ap.add_argument("--vllm-repeats", type=int, default=3)
    ap.add_argument(
        "--vllm-reserved-cores",
        default="null",
        help="rollout.cpu_reserved_cores for every vLLM engine (null = vLLM's default)",
    )
    ap.add_argument(
        "--vllm-in-process",
        default="null",
        help="rollout.in_process for every vLLM engine (null = in-process on CPU, separate processes on GPU)",
    )
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    arms = args.runs.split(",")
    unknown = [a for a in arms if a != "vllm" and a not in ARMS]
    if unknown:
        ap.error(f"--runs: unknown {unknown} (vllm, {', '.join(ARMS)})")
    try:
        kls = [float(k) for k in args.kl.split(",")]
    except ValueError:
        ap.error(f"--kl {args.kl!r}: comma-separated numbers")
    if any(k < 0 for k in kls):
        ap.error(f"--kl {args.kl!r}: coefficients must be >= 0")

    if args.phase:  # a child process: one run, result as JSON
        result = run_phase(args, args.phase)
        (args.out / f"{args.phase}.json").write_text(json.dumps(result, indent=2))
        return

    info = build_policy(args.out / "policy")
    info["memcpy_GB_per_s"] = memcpy_gb_per_s()
    info["cpu"] = cpu_info()
    work = learner_work(args)
    info["learner_work"] = work
    matmul_shape = (args.micro * args.tokens, work["hidden"], work["intermediate"])
    info["matmul_GFLOP_s_before"] = info["matmul_GFLOP_s"] = matmul_gflops(*matmul_shape)
    cpu = info["cpu"]
    print(
        f"CPU: {cpu['model']}, {cpu['cores']} cores, AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512']}, AMX {cpu['amx']}\n"
        f"policy: {info['parameters'] / 1e6:.1f}M parameters ({work['matmul_params'] / 1e6:.1f}M in matmuls), "
        f"vocab {info['vocab']}; memory copy {info['memcpy_GB_per_s']:.1f} GB/s; fp32 matmul "
        f"{info['matmul_GFLOP_s']:.0f} GFLOP/s at the learner's shape"
    )
    cfg = load_cfg(args)
    for arm in arms:
        if arm == "vllm":
            print("vllm: vLLM alone, the trainer's engine settings, one step's batch (the generation floor)")
            continue
        for kl in kls:
            adapters = ARMS[arm].format(r=cfg.learner.dora_rank, a=f"{cfg.learner.dora_alpha:g}")
            print(
                f"{arm_name(arm, kl)}: {adapters}; KL {kl:g}{' (k3, reference = adapters off)' if kl else ''}; "
                f"loss token mean, ratio clip [1-{cfg.algorithm.clip_eps_low}, 1+{cfg.algorithm.clip_eps_high}]; "
                f"one AdamW step (lr {args.lr}, grad clip {cfg.learner.grad_clip}) per step; micro-batch {args.micro}; "
                f"{args.prompts} x {args.samples} samples of {args.tokens} tokens; rewards {REWARDS}"
            )
    results = {}
    for arm in arms:
        for kl in [0.0] if arm == "vllm" else kls:
            run = arm_name(arm, kl)
            print(f"=== {run}", flush=True)
            results[run] = {**spawn(args, run), "kl": kl}
    # measured again after the runs: the floor takes the faster of the two (the machine's rate, not a busy moment's)
    info["matmul_GFLOP_s_after"] = matmul_gflops(*matmul_shape)
    info["matmul_GFLOP_s"] = max(info["matmul_GFLOP_s_before"], info["matmul_GFLOP_s_after"])
    print(
        f"fp32 matmul at the learner's shape: {info['matmul_GFLOP_s_before']:.0f} GFLOP/s before the runs, "
        f"{info['matmul_GFLOP_s_after']:.0f} after; the floor uses {info['matmul_GFLOP_s']:.0f}"
    )
    vllm_rate = results.get("vllm", {}).get("rollout_tokens_per_s")
    for run, r in results.items():
        if run != "vllm":
            r["floor"] = floor_seconds(work, r["kl"], vllm_rate, info["matmul_GFLOP_s"])
    models = {r: res["final_model"] for r, res in results.items() if "final_model" in res}
    if models:
        (args.out / "models.json").write_text(json.dumps(models))
        held = spawn(args, "heldout")
        for r in models:
            results[r]["heldout"] = held[r]
    (args.out / "results.json").write_text(
        json.dumps({"policy": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    print_table(results, args, kls)


def info_memcpy(args) -> float:
    return json.loads((args.out / "results.json").read_text())["policy"]["memcpy_GB_per_s"]


def _target(label: str, value: float, limit: float, better: str) -> str:
    met = value <= limit if better == "<=" else value >= limit
    verdict = "met" if met else f"missed by {abs(value - limit):.2f}"
    return f"{label}: {value:.2f} (target {better} {limit}: {verdict})"


def print_table(results: dict, args, kls: list[float]) -> None:
    print(
        f"\n{args.prompts} prompts x {args.samples} samples x {args.tokens} tokens per step, {args.steps} steps "
        f"(median over the last {args.steps - args.warmup})"
    )
    print(
        "| run | KL | s/step | floor s | x floor | rollout tok/s | overhead | peak RSS GiB | held-out reward "
        "| held-out tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, r in results.items():
        held, floor = r.get("heldout", {}), (r.get("floor") or {}).get("total_s")
        step = r.get("seconds_per_step")
        cells = [
            f"{r['kl']:g}" if run != "vllm" else "-",
            f"{step:.1f}" if step else "-",
            f"{floor:.1f}" if floor else "-",
            f"{step / floor:.2f}" if step and floor else "-",
            f"{r['rollout_tokens_per_s']:.0f}",
            f"{100 * r['overhead_frac']:.1f}%" if "overhead_frac" in r else "-",
            f"{r['peak_rss_gib']:.2f}",
            f"{held['reward']:.3f}" if held else "-",
            f"{held['mean_tokens']:.0f}" if held else "-",
        ]
        print(f"| {run} | " + " | ".join(cells) + " |")
    for kl in kls:
        for run in ("gdpo", "gdpo-ahead"):
            name = arm_name(run, kl)
            if name not in results:
                continue
            r = results[name]
            for base in ("trl", "trl-lora"):
                if arm_name(base, kl) in results:
                    ratio = r["seconds_per_step"] / results[arm_name(base, kl)]["seconds_per_step"]
                    print(_target(f"{name} / {arm_name(base, kl)} step time", ratio, 0.5, "<="))
            if r["floor"]["total_s"]:
                f = r["floor"]
                print(
                    _target(f"{name} step / its floor", r["seconds_per_step"] / f["total_s"], 1.25, "<=")
                    + f" [floor {f['total_s']:.1f} s = generation {f['generate_s']:.1f} s + learner matmuls "
                    f"{f['learner_s']:.1f} s; stages: "
                    + ", ".join(f"{k[5:]} {v:.1f}" for k, v in r["stages"].items() if k != "time/step" and v >= 0.05)
                    + "]"
                )
            if "vllm" in results:
                rate = r["rollout_tokens_per_s"] / results["vllm"]["rollout_tokens_per_s"]
                print(_target(f"{name} rollout tok/s / vLLM alone", rate, 0.9, ">="))
            if "sync_publish_s" in r:
                print(
                    f"{name} weight sync: {r['sync_bytes'] / 2**20:.1f} MiB, publish {r['sync_publish_s']:.2f} s + "
                    f"load {r['sync_load_s']:.2f} s; memory copy alone would take "
                    f"{r['sync_bytes'] / 1e9 / info_memcpy(args):.3f} s"
                )


if __name__ == "__main__":
    main()
