"""``gdpo compress``: post-training compression of a policy, evaluated against full precision.

``--pipeline fp4`` quantizes with LLM-FP4 (compression.fp4) at ``--bits`` (w4a4, w4a8, w8a8, w4, w8),
calibrated on ``--calib``, and compares on held-out data, in one run: full precision, MinMax INT,
MinMax FP and searched FP (``--methods``). Reported per method: perplexity of the held-out reference
solutions (completion tokens only), greedy task accuracy and mean completion tokens, the calibration
output MSE, and the share of MinMax FP's gap to full precision that the method recovers.

Outputs (atomic): ``DIR/model/`` the searched checkpoint (packed codes + biases; loads with
``compression.fp4.model.load_quantized``; the reported ``search`` row is measured on the model read
back from it), ``DIR/results.json`` and ``DIR/samples.jsonl`` (every method's completions).

Evaluation runs the quantized modules in transformers (greedy ``generate``), since vLLM cannot run
fake-quantized activations; the full-precision row is measured the same way.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from gdpo.config import Config
from gdpo.data import DataError, build_prompts, load_rows
from gdpo.fileio import atomic_write_text

PIPELINES = {"fp4"}
DEFAULT_METHODS = ("minmax_int", "minmax_fp", "search")


class CompressError(ValueError):
    """Bad compression input; the message names the flag or file."""


@dataclass(frozen=True)
class CompressSettings:
    model: str  # HF directory, a run directory, a run's final/ or builtin:tiny-chain-arith
    out: str
    pipeline: str = "fp4"
    bits: str = "w4a4"
    calib: str = "task:chain_arith"  # a data spec; its train split calibrates
    calib_samples: int = 128
    eval_data: Optional[str] = None  # a data spec; its eval split is held out (default: --calib's source)
    eval_limit: int = 0  # held-out prompts (0 = data.eval_size for a task, else all)
    max_new_tokens: int = 128
    methods: tuple[str, ...] = DEFAULT_METHODS
    lm_head: bool = False
    embedding: bool = False
    seed: int = 0
    grid_points: int = 100
    grid_act_points: int = 50
    grid_rounds: int = 3


def reference_texts(spec: str, role: str, n: int, seed: int, cfg: Config, tokenizer) -> tuple[list[str], list[str]]:
    """(prompts, reference solutions) from a data spec: a task's verbose solutions, or a row's
    ``answer`` column (GSM8K's carries the worked solution)."""
    if spec == "task:chain_arith":
        from gdpo.tasks import chain_arith

        rng = random.Random(f"compress/{role}/{seed}")
        probs = chain_arith.problems(role, n, seed)
        rows = [{"question": p.question, "answer": str(p.answer)} for p in probs]
        solutions = [chain_arith.verbose_solution(p, rng) for p in probs]
    else:
        rows = load_rows(spec, role, n, seed)
        solutions = [str(r.get(cfg.data.answer_column, "")) for r in rows]
    prompts = build_prompts(rows, cfg.data, spec, tokenizer).prompts
    for i, s in enumerate(solutions):
        if not s.strip():
            raise DataError(f"data source '{spec}': sample {i} has an empty '{cfg.data.answer_column}'")
    return prompts, solutions


def _batches(tokenizer, prompts, solutions, batch_size=16):
    """Right-padded ``input_ids``/``attention_mask`` plus ``labels`` (-100 on prompt and padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for lo in range(0, len(prompts), batch_size):
        seqs, labs = [], []
        for p, s in zip(prompts[lo:lo + batch_size], solutions[lo:lo + batch_size]):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            s_ids = tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p_ids + s_ids)
            labs.append([-100] * len(p_ids) + s_ids)
        width = max(map(len, seqs))
        out.append({"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in seqs]),
                    "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs]),
                    "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labs])})
    return out


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean negative log-likelihood) over the labelled (solution) tokens."""
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        labels = b["labels"][:, 1:]
        mask = labels != -100
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float(picked[mask].sum())
        n += int(mask.sum())
    return math.exp(nll / n)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64):
    """Completions, token counts and finish reasons ("stop" / "length") of greedy decoding."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, counts, reasons = [], [], []
    for lo in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[lo:lo + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row, reason = row[:row.index(tokenizer.eos_token_id)], "stop"
            else:
                reason = "length"
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
            counts.append(len(row))
            reasons.append(reason)
    return texts, counts, reasons


def evaluate(model, tokenizer, held_out: dict, cfg: Config, s: CompressSettings, label: str,
             log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    from gdpo.eval_metrics import summarize
    from rewards import BoundReward, score_rewards

    t0 = time.time()
    ppl = perplexity(model, held_out["ppl_batches"])
    prompts, answers = held_out["prompts"], held_out["answers"]
    texts, counts, reasons = greedy_generate(model, tokenizer, prompts, s.max_new_tokens)
    acc_spec = [(n, kw) for n, kw in cfg.rewards.specs() if n == "accuracy"]
    rewards = [BoundReward.from_name(n, kw) for n, kw in acc_spec or [("accuracy", {})]]
    matrix = score_rewards(rewards, prompts, texts, counts, list(range(len(prompts))), {"answer": answers})
    correct = [v[0] == 1.0 for v in matrix.values.tolist()]
    m = summarize(correct, counts, [r == "length" for r in reasons], list(range(len(prompts))))
    metrics = {"perplexity": ppl, "accuracy": m["accuracy"], "mean_tokens": m["mean_tokens"],
               "truncation_rate": m["truncation_rate"], "eval_seconds": time.time() - t0}
    log(f"{label:>12}: perplexity {ppl:.3f}, accuracy {m['accuracy']:.1%}, mean tokens {m['mean_tokens']:.1f}")
    samples = [{"method": label, "prompt_index": i, "completion": t, "tokens": c, "correct": ok}
               for i, (t, c, ok) in enumerate(zip(texts, counts, correct))]
    return metrics, samples


def gap_recovered(full: float, baseline: float, method: float) -> Optional[float]:
    """Share of the baseline's gap to full precision that ``method`` closes (1 = all, None if no gap)."""
    gap = full - baseline
    return None if abs(gap) < 1e-12 else (method - baseline) / gap


def check_settings(s: CompressSettings) -> None:
    from compression.fp4.search import METHODS, QuantSetting

    stages = [p.strip() for p in s.pipeline.split(",") if p.strip()]
    unknown = [p for p in stages if p not in PIPELINES]
    if not stages or unknown:
        raise CompressError(f"--pipeline {s.pipeline!r}: unknown stage {unknown[0] if unknown else '(empty)'}; "
                            f"supported: {', '.join(sorted(PIPELINES))}")
    try:
        QuantSetting.parse(s.bits)
    except ValueError as err:
        raise CompressError(f"--bits: {err}") from None
    bad = [m for m in s.methods if m not in METHODS]
    if bad or not s.methods:
        raise CompressError(f"--methods: unknown method {bad[0] if bad else '(empty)'}; choose from {', '.join(METHODS)}")
    if s.calib_samples < 1:
        raise CompressError(f"--calib-samples must be >= 1, got {s.calib_samples}")
    if s.max_new_tokens < 1:
        raise CompressError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    for flag, v in (("--grid-points", s.grid_points), ("--grid-act-points", s.grid_act_points),
                    ("--grid-rounds", s.grid_rounds)):
        if v < 1:
            raise CompressError(f"{flag} must be >= 1, got {v}")


def run_compress(s: CompressSettings, cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Check every input, then compress and evaluate; returns what results.json holds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compression.calib import CalibrationError, target_linears
    from compression.fp4.model import check_calibration, load_quantized, quantize_model, save_quantized
    from compression.fp4.search import QuantSetting, SearchGrid
    from gdpo.evaluation import EvalError, resolve_model_dir

    check_settings(s)
    setting = QuantSetting.parse(s.bits)
    grid = SearchGrid(points=s.grid_points, act_points=s.grid_act_points, rounds=s.grid_rounds)
    try:
        model_dir = resolve_model_dir(s.model, cfg, log)
    except EvalError as err:
        raise CompressError(str(err)) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    eval_spec = s.eval_data or s.calib
    n_eval = s.eval_limit or (cfg.data.eval_size if eval_spec.startswith("task:") else 0)
    try:
        c_prompts, c_solutions = reference_texts(s.calib, "train", s.calib_samples, s.seed, cfg, tokenizer)
        e_prompts, e_solutions = reference_texts(eval_spec, "eval", n_eval, s.seed, cfg, tokenizer)
        e_answers = build_prompts(load_rows(eval_spec, "eval", n_eval, s.seed), cfg.data, eval_spec,
                                  tokenizer).columns["answer"]
    except DataError as err:
        raise CompressError(f"{err}") from None
    calib = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in _batches(tokenizer, c_prompts, c_solutions)]
    held_out = {"prompts": e_prompts, "answers": e_answers, "ppl_batches": _batches(tokenizer, e_prompts, e_solutions)}
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        target_linears(full, None, s.lm_head)
        check_calibration(calib)
    except CalibrationError as err:
        raise CompressError(f"--calib {s.calib}: {err}" if "calibration" in str(err) else f"--model {s.model}: {err}") from None
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    rows, samples = {}, []
    rows["full"], smp = evaluate(full, tokenizer, held_out, cfg, s, "full", log)
    samples += smp
    for method in s.methods:
        model = copy.deepcopy(full)
        log(f"quantizing: {method} {setting.name}")
        quant = quantize_model(model, calib, setting, method, grid, lm_head=s.lm_head, embedding=s.embedding,
                               log=lambda m: None)
        if method == "search":
            save_quantized(model, {**quant, "source_model": str(Path(model_dir).resolve())}, str(out / "model"),
                           tokenizer)
            model = load_quantized(str(out / "model"))
        metrics, smp = evaluate(model, tokenizer, held_out, cfg, s, method, log)
        layer_mse = [v["mse"]["final"] for v in quant["layers"].values()]
        metrics.update(quantize_seconds=quant["seconds"], calib_output_mse_mean=sum(layer_mse) / len(layer_mse))
        rows[method] = metrics
        samples += smp
        del model
    if "minmax_fp" in rows:
        for method, m in rows.items():
            if method in ("full", "minmax_fp"):
                continue
            m["gap_recovered"] = {k: gap_recovered(rows["full"][k], rows["minmax_fp"][k], m[k])
                                  for k in ("accuracy", "perplexity")}
    results = {
        "pipeline": s.pipeline, "setting": setting.name, "model": str(Path(model_dir).resolve()),
        "calibration": {"data": s.calib, "samples": s.calib_samples,
                        "tokens": int(sum(int(b["attention_mask"].sum()) for b in calib))},
        "held_out": {"data": eval_spec, "prompts": len(e_prompts), "max_new_tokens": s.max_new_tokens,
                     "decoding": "greedy"},
        "methods": rows, "checkpoint": str((out / "model").resolve()) if "search" in s.methods else None,
        "settings": asdict(s), "seconds": time.time() - t_start,
    }
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def results_table(results: dict) -> list[list[str]]:
    head = ["method", "perplexity", "accuracy", "mean tokens", "calib MSE", "gap recovered (acc / ppl)"]
    body = []
    for name, m in results["methods"].items():
        rec = m.get("gap_recovered")
        fmt = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
        body.append([name, f"{m['perplexity']:.3f}", f"{m['accuracy']:.1%}", f"{m['mean_tokens']:.1f}",
                     f"{m['calib_output_mse_mean']:.3g}" if "calib_output_mse_mean" in m else "-",
                     f"{fmt(rec['accuracy'])} / {fmt(rec['perplexity'])}" if rec else "-"])
    return [head, *body]
