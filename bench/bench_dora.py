"""One adapted linear layer, forward + backward: the project's DoRA vs peft's DoRA vs peft's LoRA.

    .venv/bin/python bench/bench_dora.py [--repeats 7] [--shapes 4096x4096,2048x8192] [--tokens 2048]

Shapes are ``in x out``. The input requires grad (the layer sits inside a network), the adapter is
non-trivial (B != 0), and the three variants run interleaved in one process, so machine noise falls
on all of them alike. Time: median over ``--repeats`` after a warm-up. Peak memory: the most bytes
held at once during one forward + backward, counting the weights and input already resident; on the
CPU it is counted over live tensor storages (a dispatch mode that sees every op's outputs), on a GPU from ``torch.cuda.max_memory_allocated``.
fp32 on the CPU, bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdpo import dora  # noqa: E402


def build(variant: str, in_f: int, out_f: int, rank: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device, dtype)
    if variant == "gdpo-dora":
        model = dora.apply_dora(base, ["0"], rank, 2 * rank)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            base,
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], use_dora=variant == "peft-dora"),
            autocast_adapter_dtype=False,
        )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and not p.any():
                p.normal_(0, 0.01)  # B starts at zero; a trained adapter does not
    return model.to(device, dtype)


def step(model, x, dy, keep_output=True):
    if keep_output:  # the caller holds y through backward, as when the next op saves it (SiLU, a product)
        y = model(x)
        y.backward(dy)
    else:  # y is dropped after the forward, as before a residual add
        model(x).backward(dy)
    x.grad = None
    for p in model.parameters():
        p.grad = None


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive at once: every op's outputs are counted until their storage dies."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if key in self.refs or n == 0:
            return

        def free(_, key=key, n=n):
            self.refs.pop(key, None)
            self.live -= n

        self.refs[key] = weakref.ref(st, free)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def peak_bytes_cpu(model, x, dy, keep_output) -> int:
    counter = LiveBytes()
    for t in [*model.parameters(), x, dy]:
        counter.add(t)
    with counter:
        step(model, x, dy, keep_output)
    return counter.peak


def peak_bytes_cuda(model, x, dy, keep_output) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(model, x, dy, keep_output)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,2048x8192")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = ["peft-lora", "peft-dora", "gdpo-dora"]
    rows = []
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        models = {v: build(v, in_f, out_f, args.rank, device, dtype) for v in variants}
        x = torch.randn(args.tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.tokens, out_f, device=device, dtype=dtype)
        times = {v: [] for v in variants}
        for rep in range(args.repeats + 1):
            for v in variants:  # interleaved: noise falls on every variant alike
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(models[v], x, dy)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:  # the first round is warm-up
                    times[v].append(time.perf_counter() - t0)
        peak_fn = peak_bytes_cuda if device.type == "cuda" else peak_bytes_cpu
        for v in variants:
            rows.append(
                {
                    "shape": shape,
                    "variant": v,
                    "median_s": statistics.median(times[v]),
                    "peak_mib": peak_fn(models[v], x, dy, True) / 2**20,
                    "peak_mib_output_freed": peak_fn(models[v], x, dy, False) / 2**20,
                }
            )
        lora = {r["shape"] + r["variant"]: r for r in rows}[shape + "peft-lora"]
        for r in rows:
            if r["shape"] == shape:
                r["time_vs_lora"] = r["median_s"] / lora["median_s"]
                r["peak_vs_lora"] = r["peak_mib"] / lora["peak_mib"]
                r["peak_vs_lora_output_freed"] = r["peak_mib_output_freed"] / lora["peak_mib_output_freed"]
        del models
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, dtype {dtype}, tokens {args.tokens}, rank {args.rank}, repeats {args.repeats}")
    print("peak: y held by the caller through backward | y dropped after the forward")
    print(
        f"{'in x out':>10} {'variant':>10} {'median s':>9} {'x LoRA':>7} {'peak MiB':>9} {'x LoRA':>7} "
        f"{'peak MiB':>9} {'x LoRA':>7}"
    )
    for r in rows:
        print(
            f"{r['shape']:>10} {r['variant']:>10} {r['median_s']:9.3f} {r['time_vs_lora']:7.2f} "
            f"{r['peak_mib']:9.1f} {r['peak_vs_lora']:7.2f} {r['peak_mib_output_freed']:9.1f} "
            f"{r['peak_vs_lora_output_freed']:7.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "dtype": str(dtype), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
