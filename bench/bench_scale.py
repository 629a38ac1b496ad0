"""One learner update at reasoning lengths and real vocabularies: peak memory and seconds, the naive
``[tokens x vocab]`` log-prob path beside the chunked one (``learner.logprob_chunk_tokens``), in one run.

    .venv/bin/python bench/bench_scale.py                       # lengths 1k-16k at 151,936, then vocabularies
    .venv/bin/python bench/bench_scale.py --lengths 2048 --vocabs 32000,151936 --paths chunked
    .venv/bin/python bench/bench_scale.py --lengths 4096 --vocabs "" --paths chunked,chunked+p,naive,naive+p

A path ending in ``+p`` scores the sampler's processed distribution (``--processed``: temperature 0.7 and
top-p 0.9 by default; ``gdpo.logprob_head.Sampling``), the others the raw policy (temperature 1, no
nucleus): the cost of the temperature and nucleus in the update.

The model has Qwen2.5-0.5B's width (hidden 896, 14 heads with 2 KV heads of 64, intermediate 4,864, tied
embeddings), ``--depth`` layers (2 by default) and random fp32 weights, built here; DoRA rank 16 on every
projection. The batch is one sequence of ``--prompt`` + L tokens built on the CPU as the driver builds it
(``TrainBatch.from_rollouts``), and the update is ``gdpo.learner.train_step`` with the plain-PyTorch
engine (forward, loss, entropy, backward, AdamW). Each point runs in a child process under an address-space
limit (``--limit-gib``, default 20 of this machine's 24 GiB): a path that does not fit reports
"out of memory" instead of taking the machine down. Per point: the peak of every tensor storage alive at
once (``bench.bench_dora.LiveBytes``, parameters and optimizer state included), the seconds of a second
update (the first warms up), and the share of that time in attention (the profiler's scaled-dot-product
forward and backward ops). Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def qwen_05b_width(vocab: int, depth: int, **extra):
    """A Qwen2 config at Qwen2.5-0.5B's width (hidden 896, 14 heads / 2 KV heads of 64, intermediate 4,864,
    tied embeddings, 32k positions) with ``vocab`` tokens and ``depth`` layers."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=depth,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        **extra,
    )


def one(
    path: str, length: int, vocab: int, depth: int, prompt: int, chunk: int, checkpointing: bool, processed: str
) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from bench.bench_dora import LiveBytes
    from bench.gpu_check import _driver_batch, preset
    from gdpo import dora, learner, logprob_head

    torch.set_num_threads(os.cpu_count() or 1)
    hf = qwen_05b_width(vocab, depth, attn_implementation="sdpa")
    path, plus = path.removesuffix("+p"), path.endswith("+p")
    temperature, top_p = (float(x) for x in processed.split(",")) if plus else (1.0, 1.0)
    cfg = preset(
        ROOT / "configs" / "tiny_cpu.yaml",
        model={"dtype": "float32"},
        learner={"micro_batch_per_worker": 1, "dora_rank": 16, "dora_alpha": 32.0},
        rollout={"max_new_tokens": length, "temperature": temperature, "top_p": top_p},
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf)
    dora.apply_dora(model, list(cfg.learner.target_modules), 16, 32.0)
    if path == "chunked":
        logprob_head.install(model, chunk)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = learner.PlainEngine(model, cfg)
    batch = _driver_batch(1, prompt, length, vocab)
    step = dict(global_tokens=float(length), global_seqs=1.0, world_size=1)
    learner.train_step(engine, batch, cfg, **step)  # warm-up; AdamW's moments exist from here on
    counter = LiveBytes()
    for t in [*model.parameters(), *(s for st in engine.optimizer.state.values() for s in st.values())]:
        counter.add(t)
    with counter:
        learner.train_step(engine, batch, cfg, **step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        learner.train_step(engine, batch, cfg, **step)
        seconds = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(
        e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key or "flash_attention" in e.key
    )
    return {
        "peak_gib": counter.peak / 2**30,
        "seconds": seconds,
        "seconds_per_1k_tokens": seconds / (length + prompt) * 1000,
        "attention_share": attention / total if total else 0.0,
    }


def run_child(args, path: str, length: int, vocab: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{path},{length},{vocab}",
        "--depth",
        str(args.depth),
        "--prompt",
        str(args.prompt),
        "--chunk",
        str(args.chunk),
        "--processed",
        args.processed,
        *(["--checkpointing"] if args.checkpointing else []),
    ]
    limit = int(args.limit_gib * 2**30)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, timeout=3600)
    rows = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and rows:
        return json.loads(rows[-1])
    tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    oom = any(s in done.stderr for s in ("MemoryError", "can't allocate memory", "out of memory", "std::bad_alloc"))
    return {"error": "out of memory" if oom or done.returncode == -9 else tail[0][:200]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--vocabs", default="32000,64000,151936", help="the vocabulary sweep, at --vocab-length")
    ap.add_argument("--vocab-length", type=int, default=4096)
    ap.add_argument("--paths", default="naive,chunked")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both paths")
    ap.add_argument("--processed", default="0.7,0.9", help="temperature,top_p of the +p paths")
    ap.add_argument("--limit-gib", type=float, default=20.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        path, length, vocab = args.one.split(",")
        print(
            json.dumps(
                one(
                    path,
                    int(length),
                    int(vocab),
                    args.depth,
                    args.prompt,
                    args.chunk,
                    args.checkpointing,
                    args.processed,
                )
            )
        )
        return 0
    points = [(p, int(n), 151936) for n in args.lengths.split(",") if n for p in args.paths.split(",")]
    points += [(p, args.vocab_length, int(v)) for v in args.vocabs.split(",") if v for p in args.paths.split(",")]
    print(f"CPU: {_cpu()} ({os.cpu_count()} cores); depth {args.depth}, chunk {args.chunk}, checkpointing "
          f"{args.checkpointing}, limit {args.limit_gib:g} GiB")  # fmt: skip
    print(f"{'path':<9}{'tokens':>8}{'vocab':>8}{'peak GiB':>10}{'s':>8}{'s/1k tok':>10}{'attention':>11}")
    rows = []
    for path, length, vocab in dict.fromkeys(points):
        r = {"path": path, "tokens": length, "vocab": vocab, **run_child(args, path, length, vocab)}
        rows.append(r)
        if "error" in r:
            print(f"{path:<9}{length:>8}{vocab:>8}  {r['error']}", flush=True)
        else:
            print(
                f"{path:<9}{length:>8}{vocab:>8}{r['peak_gib']:>10.2f}{r['seconds']:>8.1f}"
                f"{r['seconds_per_1k_tokens']:>10.2f}{r['attention_share']:>10.0%}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"cpu": _cpu(), "args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
