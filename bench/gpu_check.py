"""GPU check of the learner side at real shapes, random weights: one command for a short GPU lease.

    python bench/gpu_check.py --out /tmp/gpu_check          # on the GPU machine (a few minutes on one H200)
    python bench/gpu_check.py --tiny --out /tmp/gpu_check   # the same code on CPU at a tiny shape (the tests)

Needs PyTorch, Triton, transformers and peft only: no vLLM, Ray, DeepSpeed, OmegaConf or model hub (the
Qwen2.5-1.5B shape comes from ``configs/models/qwen2.5-1.5b/config.json``; the learner settings from
``configs/gsm8k_qwen2.5_1.5b.yaml``, read with PyYAML onto the schema's defaults, unvalidated). bf16 on a GPU, fp32 on CPU. Sections, each timed after a
warm-up:

1. ``dora_layers``: one projection of each 1.5B shape, forward + backward over a micro-batch of
   tokens, the project's DoRA against peft's LoRA and peft's DoRA (``bench/bench_dora.py``): median
   seconds and peak memory.
2. ``update_step``: one GDPO optimizer step of the 1.5B model with DoRA (the preset's rank and alpha)
   on every projection, through ``gdpo.learner.train_step`` with a plain-PyTorch engine (AdamW on the
   adapters; DeepSpeed is not on the machine, so no ZeRO): tokens per second and peak memory at the
   preset's micro-batch and sequence length (prompt + ``rollout.max_new_tokens``), halving the
   micro-batch after an out-of-memory error. The batch is built on the CPU from a ``RolloutBatch``, as
   the driver builds it, and goes through the calls ``actors.learner.LearnerWorker`` makes
   (``attach_logprobs``, then ``train_step``), so a batch that never reaches the device fails here; the
   memory plan's estimate of the peak (``gdpo/memory_plan.py``) beside the measured one.
3. ``publish``: the merged weights a sync sends: the DoRA merge alone, and the whole file publish
   (merge, copy to host, hash, write) into a temporary directory.
4. ``kernels``: the FP4 pack/unpack and fake-quant Triton kernels and the DoRA row-norm kernel against
   their torch references (bit-exact for FP4, tolerance for the norm) and their times.
5. ``ofq_deit``: OFQ's QAT step on DeiT-Tiny at 224x224 (W2A2, distilled from the full-precision model,
   the ImageNet preset's batch of 140) through ``compression.ofq.experiment.train_step`` with the batch
   built on the CPU as the loader yields it: images per second and peak memory (fp32).

Writes ``OUT/results.json`` and prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRESET = ROOT / "configs" / "gsm8k_qwen2.5_1.5b.yaml"
MODEL_CONFIG = ROOT / "configs" / "models" / "qwen2.5-1.5b" / "config.json"
PROMPT_TOKENS = 256  # a GSM8K prompt with the preset's chat template is 100-250 tokens


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up (Triton compiles, cuBLAS picks kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def dora_layers(device, dtype, tiny: bool, cfg) -> list[dict]:
    import torch

    from bench.bench_dora import build, peak_bytes_cpu, peak_bytes_cuda, step

    shapes = [(64, 96)] if tiny else [(1536, 1536), (1536, 8960), (8960, 1536)]
    tokens = 64 if tiny else cfg.learner.micro_batch_per_worker * (PROMPT_TOKENS + cfg.rollout.max_new_tokens)
    rank = 4 if tiny else cfg.learner.dora_rank
    rows = []
    for in_f, out_f in shapes:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, out_f, device=device, dtype=dtype)
        for variant in ("peft-lora", "peft-dora", "gdpo-dora"):
            model = build(variant, in_f, out_f, rank, device, dtype)
            times = _timed(lambda m=model: step(m, x, dy), device, 2 if tiny else 5)
            peak = (peak_bytes_cuda if device.type == "cuda" else peak_bytes_cpu)(model, x, dy, True)
            rows.append(
                {
                    "shape": f"{in_f}x{out_f}",
                    "tokens": tokens,
                    "rank": rank,
                    "variant": variant,
                    "median_s": statistics.median(times),
                    "peak_mib": peak / 2**20,
                }
            )
            del model
    return rows


def _model(device, dtype, tiny: bool):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tiny:
        config = Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            tie_word_embeddings=True,
        )
    else:
        config = Qwen2Config(**json.loads(MODEL_CONFIG.read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model, config


def _driver_batch(n: int, prompt: int, completion: int, vocab: int):
    """``n`` random sequences through ``TrainBatch.from_rollouts``: the CPU tensors the driver sends."""
    import torch

    from gdpo.records import RolloutBatch, TrainBatch

    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (n, prompt + completion), generator=g).tolist()
    rollouts = RolloutBatch(
        prompt_ids=[row[:prompt] for row in ids],
        completion_ids=[row[prompt:] for row in ids],
        completions=[""] * n,
        finish_reasons=["length"] * n,
        sampling_logprobs=[[-1.0] * completion for _ in range(n)],
        group_ids=list(range(n)),
        policy_version=0,
    )
    return TrainBatch.from_rollouts(rollouts, torch.randn(n, generator=g), pad_id=0)


def update_step(device, dtype, tiny: bool, cfg) -> dict:
    import torch

    import dataclasses

    from gdpo import dora, learner, memory_plan, weight_sync

    model, config = _model(device, dtype, tiny)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        dora.apply_dora(model, list(cfg.learner.target_modules), cfg.learner.dora_rank, cfg.learner.dora_alpha)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.01)  # B != 0: a trained adapter, so the merge and the norm do real work
    for _, layer in dora.dora_layers(model):
        layer.refresh_zero_rows()
    engine = learner.PlainEngine(model, cfg)
    completion = 16 if tiny else cfg.rollout.max_new_tokens
    prompt = 8 if tiny else PROMPT_TOKENS
    width = prompt + completion
    micro = cfg.learner.micro_batch_per_worker
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "adapter_parameters": sum(p.numel() for p in engine.params),
        "sequence_tokens": width,
    }
    while micro >= 1:
        batch = _driver_batch(micro, prompt, completion, config.vocab_size)  # on the CPU, as the driver's
        tokens = float(batch.loss_mask[:, 1:].sum())

        def run():  # LearnerWorker.logprobs, then LearnerWorker.update
            learner.train_step(
                engine,
                learner.attach_logprobs(model, batch, cfg),
                cfg,
                global_tokens=tokens,
                global_seqs=float(micro),
                world_size=1,
            )

        try:
            _peak_reset(device)
            times = _timed(run, device, 2 if tiny else 3)
        except torch.OutOfMemoryError:
            out.setdefault("out_of_memory_at_micro_batch", []).append(micro)
            del batch
            engine.optimizer.zero_grad(set_to_none=True)
            micro //= 2
            continue
        sized = dataclasses.replace(
            cfg,
            learner=dataclasses.replace(cfg.learner, micro_batch_per_worker=micro),
            rollout=dataclasses.replace(cfg.rollout, max_new_tokens=completion),
        )
        planned = memory_plan.plan(sized, memory_plan.ModelShape.of(config), prompt, None)
        out.update(
            micro_batch=micro,
            median_s=statistics.median(times),
            peak_gib=_peak_gib(device),
            plan_peak_gib=planned.learner_peak - memory_plan.CUDA_CONTEXT_GIB,  # the memory plan's estimate
            tokens_per_s=micro * width / statistics.median(times),
        )
        break
    names = weight_sync.sync_module_names(model, cfg.learner.target_modules)
    tensors = weight_sync.sync_tensors(model, names)
    payload = sum(t.nbytes for t in tensors)

    def merge():
        with torch.no_grad():
            for t in tensors:
                t.make()

    with tempfile.TemporaryDirectory(prefix="gdpo-gpu-check-") as tmp:
        version = iter(range(1, 100))
        publish = _timed(
            lambda: weight_sync.publish(
                tensors, next(version), cfg.learner.sync_bucket_mb << 20, directory=tmp, device=device
            ),
            device,
            2,
        )
    merge_s = statistics.median(_timed(merge, device, 3))
    out["publish"] = {
        "tensors": len(tensors),
        "bytes": payload,
        "merge_s": merge_s,
        "merge_GB_per_s": payload / merge_s / 1e9,
        "file_s": statistics.median(publish),
        "file_GB_per_s": payload / statistics.median(publish) / 1e9,
    }
    return out


def kernels(device, tiny: bool) -> dict:
    import torch

    from kernels import fp4
    from kernels.dora_norm import dora_row_norm_reference, dora_row_norm_triton

    g = torch.Generator(device="cpu").manual_seed(0)
    rows, cols = (24, 40) if tiny else (8960, 1536)
    out = {}
    codes = torch.randint(0, 16, (rows, cols + 1), generator=g, dtype=torch.uint8).to(device)
    packed = fp4.pack_nibbles_reference(codes)
    out["pack_exact"] = bool(torch.equal(fp4.pack_nibbles_triton(codes), packed))
    out["unpack_exact"] = bool(torch.equal(fp4.unpack_nibbles_triton(packed, cols + 1), codes))
    x = (torch.randn(rows, cols, generator=g) * 3).to(device)
    bias = (torch.rand(rows, generator=g) * 2).to(device)
    shift = torch.randint(0, 3, (cols,), generator=g).to(device)
    out["fake_quant_exact"] = bool(
        torch.equal(
            fp4.fake_quant_rows_triton(x, 2, 1, bias, shift), fp4.fake_quant_rows_reference(x, 2, 1, bias, shift)
        )
    )
    reps = 1 if tiny else 20
    out["fake_quant_triton_s"] = statistics.median(
        _timed(lambda: fp4.fake_quant_rows_triton(x, 2, 1, bias, shift), device, reps)
    )
    out["fake_quant_reference_s"] = statistics.median(
        _timed(lambda: fp4.fake_quant_rows_reference(x, 2, 1, bias, shift), device, reps)
    )
    w0 = torch.randn(rows, cols, generator=g).to(device)
    a, b = (
        (torch.randn(16, cols, generator=g) * 0.05).to(device),
        (torch.randn(rows, 16, generator=g) * 0.05).to(device),
    )
    ref = dora_row_norm_reference(w0, a, b, 2.0)
    got = dora_row_norm_triton(w0, a, b, 2.0)
    out["dora_norm_max_rel_err"] = float(((got - ref).abs() / ref).max())
    out["dora_norm_triton_s"] = statistics.median(_timed(lambda: dora_row_norm_triton(w0, a, b, 2.0), device, reps))
    out["dora_norm_reference_s"] = statistics.median(
        _timed(lambda: dora_row_norm_reference(w0, a, b, 2.0), device, reps)
    )
    return out


def ofq_deit(device, tiny: bool) -> dict:
    import copy

    import torch
    from transformers import DeiTConfig, DeiTForImageClassification

    from compression.ofq.experiment import train_step
    from compression.ofq.modules import quantize_vit

    shape = (
        dict(image_size=8, patch_size=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
        if tiny
        else dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3)
    )
    cfg = DeiTConfig(
        num_channels=3, intermediate_size=4 * shape["hidden_size"], num_labels=10 if tiny else 1000, **shape
    )
    batch = 4 if tiny else 140
    torch.manual_seed(0)
    teacher = DeiTForImageClassification(cfg).eval()
    model = quantize_vit(copy.deepcopy(teacher), 2, "ofq")
    teacher.to(device)
    model.to(device)
    size = cfg.image_size
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, cfg.num_labels, (batch,))  # on the CPU, as loaded
    with torch.no_grad():
        model(pixel_values=x.to(device))  # LSQ steps initialize on a first batch, as run_ofq does
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(model, x, y, teacher)
        opt.step()

    step()
    _peak_reset(device)
    times = _timed(step, device, 1 if tiny else 5)
    med = statistics.median(times)
    return {"batch": batch, "step_s": med, "images_per_s": batch / med, "peak_gib": _peak_gib(device)}


def preset(path: Path, **overrides: dict):
    """The preset's ``model``, ``rollout``, ``algorithm`` and ``learner`` sections on the schema's defaults,
    read with PyYAML (OmegaConf, the config loader's, is not on the GPU machine); unvalidated: the preset
    itself is validated by the test suite. ``overrides``: section name -> {key: value}."""
    import dataclasses

    import yaml

    from gdpo.config import Config

    raw = yaml.safe_load(path.read_text())
    cfg = Config()
    sections = {}
    for name in ("model", "rollout", "algorithm", "learner"):
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in (raw.get(name) or {}).items()}
        sections[name] = dataclasses.replace(getattr(cfg, name), **{**values, **overrides.get(name, {})})
    return dataclasses.replace(cfg, **sections)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU: what the test suite runs)")
    p.add_argument("--sections", default="kernels,dora_layers,update_step,ofq_deit")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run interpreted
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(PRESET, model={"dtype": str(dtype).removeprefix("torch.")})
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "tiny": args.tiny,
    }
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        section = {
            "kernels": lambda: kernels(device, args.tiny),
            "dora_layers": lambda: dora_layers(device, dtype, args.tiny, cfg),
            "update_step": lambda: update_step(device, dtype, args.tiny, cfg),
            "ofq_deit": lambda: ofq_deit(device, args.tiny),
        }[name]
        results[name] = section()
        results[name + "_wall_s"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
