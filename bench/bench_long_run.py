"""The whole stack (Ray, vLLM, DeepSpeed) with reasoning-length responses at a real vocabulary, on this CPU.

    .venv/bin/python bench/bench_long_run.py --tokens 8192 --out /tmp/long_run

A model at Qwen2.5-0.5B's width and vocabulary (hidden 896, 14 heads with 2 KV heads, intermediate 4,864,
151,936 tokens, tied embeddings; ``--depth`` layers, random fp32 weights) is built here with the tiny
policy's tokenizer, its vocabulary padded with never-merged tokens up to the model's 151,936 (a random
model samples all of them, and vLLM must detokenize them). ``gdpo train`` then runs ``--steps`` steps on
the chain-arithmetic prompts: ``--samples`` responses of exactly ``--tokens`` tokens each
(``rollout.min_new_tokens`` = ``max_new_tokens``), scored by the default rewards, one update with one
response per micro-batch (``learner.max_tokens_per_micro_batch``) through the chunked log-prob head, and
the weight sync into the engine. The machine's used memory (MemTotal - MemAvailable) is sampled every
second; its peak above the start is reported beside the step's timings and truncation rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151936


def build_model(out: Path, depth: int) -> Path:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    from bench.bench_scale import qwen_05b_width
    from gdpo.tasks.tiny_policy import EOS, build_tokenizer

    if (out / "config.json").is_file():
        return out
    spec = json.loads(build_tokenizer(0).backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), VOCAB):  # byte-level letters: each decodes to a short word of its own
        vocab[f"w{i}"] = i
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS, pad_token=EOS)
    hf = qwen_05b_width(
        VOCAB,
        depth,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(hf).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def used_gib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from bench.bench_scale import _cpu
    from gdpo.config import load_config
    from gdpo.trainer import train

    model = build_model(args.out / "model", args.depth)
    prompt = 64
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            f"trainer.output_dir={args.out / 'run'}",
            "trainer.resume=never",
            f"trainer.steps={args.steps}",
            "trainer.prompts_per_step=1",
            "trainer.eval_every=0",
            f"trainer.save_every={args.steps}",
            "data.eval_size=1",
            f"rollout.samples_per_prompt={args.samples}",
            f"rollout.max_new_tokens={args.tokens}",
            f"rollout.min_new_tokens={args.tokens}",
            f"rollout.max_model_len={args.tokens + 2 * prompt}",
            "rollout.kv_cache_gib=2",
            "rollout.eval_temperature=1.0",
            f"learner.max_tokens_per_micro_batch={args.tokens + prompt}",
            "learner.logprob_chunk_tokens=1024",
            "algorithm.kl_coef=0",
        ],
    )
    base = used_gib()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            peak[0] = max(peak[0], used_gib())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        summary = train(cfg, log=lambda m: print(m, flush=True))
    finally:
        stop.set()
        watcher.join()
        import ray

        ray.shutdown()
    rows = [json.loads(line) for line in (args.out / "run" / "metrics.jsonl").read_text().splitlines()]
    result = {
        "cpu": _cpu(),
        "tokens": args.tokens,
        "samples": args.samples,
        "depth": args.depth,
        "steps": summary["steps"],
        "seconds": time.perf_counter() - t0,
        "memory_used_at_start_gib": base,
        "memory_used_peak_gib": peak[0],
        "rows": rows,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    for r in rows:
        print({k: v for k, v in r.items() if k.startswith(("time/", "tokens", "truncation", "learner/"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
