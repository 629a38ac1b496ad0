"""The memory plan's learner estimate (``gdpo/memory_plan.py``) against the measured peak of one update
on the CPU, at small Qwen2 shapes with random weights.

    .venv/bin/python bench/bench_memory_plan.py

Each shape runs twice: the full ``[tokens x vocab]`` logits (``learner.logprob_chunk_tokens=0``) and the
chunked log-prob head. The update is ``gdpo.learner.train_step`` with the plain-PyTorch engine (no ZeRO: the plan's ZeRO-2 at one
learner): the driver's CPU batch, the forward, the loss, the entropy metric, the backward and AdamW's
step. The peak counts every tensor storage alive at once (``bench.bench_dora.LiveBytes``: parameters,
adapter gradients and moments, activations, logits). The plan's CUDA-context term is left out (no GPU).
Prints one row per shape and the largest relative error; exits 1 past 25%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_dora import LiveBytes  # noqa: E402
from bench.gpu_check import _driver_batch, preset  # noqa: E402
from gdpo import dora, learner, logprob_head, memory_plan  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
# (hidden, layers, heads, kv heads, intermediate, vocab, micro-batch, prompt, completion)
SHAPES = [
    (128, 2, 2, 1, 344, 1000, 4, 32, 96),
    (256, 4, 4, 2, 688, 4000, 4, 64, 192),
    (256, 2, 4, 4, 512, 32000, 2, 64, 448),
    (384, 3, 6, 2, 1024, 8000, 8, 32, 224),
]


def measure(shape: tuple, rank: int, chunk: int = 0) -> tuple[float, float]:
    """(measured, planned) peak GiB of one update; ``chunk`` > 0: through the chunked log-prob head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab, micro, prompt, completion = shape
    hf = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    cfg = preset(
        PRESET,
        model={"dtype": "float32"},
        learner={
            "micro_batch_per_worker": micro,
            "dora_rank": rank,
            "dora_alpha": 2.0 * rank,
            "logprob_chunk_tokens": chunk,
        },
        rollout={"max_new_tokens": completion},
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf)
    dora.apply_dora(model, list(cfg.learner.target_modules), rank, cfg.learner.dora_alpha)
    for _, layer in dora.dora_layers(model):
        layer.lora_B.data.normal_(0, 0.01)
    if chunk:
        logprob_head.install(model, chunk)
    engine = learner.PlainEngine(model, cfg)
    batch = _driver_batch(micro, prompt, completion, vocab)
    tokens = float(batch.loss_mask[:, 1:].sum())
    step = dict(global_tokens=tokens, global_seqs=float(micro), world_size=1)
    learner.train_step(engine, batch, cfg, **step)  # AdamW's moments exist from here on, as in a run
    counter = LiveBytes()
    for t in [*model.parameters(), *(s for st in engine.optimizer.state.values() for s in st.values())]:
        counter.add(t)
    with counter:
        learner.train_step(engine, batch, cfg, **step)
    planned = memory_plan.plan(cfg, memory_plan.ModelShape.of(hf), prompt, None)
    estimate = planned.learner_peak - memory_plan.CUDA_CONTEXT_GIB
    return counter.peak / memory_plan.GIB, estimate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64, help="the chunked path's chunk (small shapes: small chunks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    worst = 0.0
    print(
        f"{'shape (h, L, heads, kv, I, V, micro, prompt, completion)':<58}{'logits':>8}{'measured':>10}{'plan':>10}{'error':>8}"
    )
    for shape in SHAPES:
        for chunk in (0, args.chunk):
            measured, estimate = measure(shape, args.rank, chunk)
            err = estimate / measured - 1
            worst = max(worst, abs(err))
            path = f"c{chunk}" if chunk else "full"
            print(f"{str(shape):<58}{path:>8}{measured * 1024:>8.1f}Mi{estimate * 1024:>8.1f}Mi{err:>+8.1%}")
    print(f"largest error {worst:.1%} (target: within 25%)")
    return 0 if worst <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
