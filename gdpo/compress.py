"""``gdpo compress``: post-training compression of a policy, evaluated against full precision.

``--pipeline fp4`` compares quantizers; ``--pipeline fp4,eora`` / ``gptq,eora`` / ``prune24,eora`` runs the
compression pipeline (gdpo.compress_pipeline), which exports what vLLM serves (``--target``,
compression.fp4.targets and compression.export) and evaluates it as served.

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

COMPRESSORS = ("fp4", "gptq", "prune24", "prune50")  # first stage
COMPENSATORS = ("eora",)  # optional second stage
DEFAULT_METHODS = ("minmax_int", "minmax_fp", "search")


class CompressError(ValueError):
    """Bad compression input; the message names the flag or file."""


@dataclass(frozen=True)
class CompressSettings:
    model: str  # HF directory, a run directory, a run's final/ or builtin:tiny-chain-arith
    out: str
    pipeline: str = "fp4"
    bits: Optional[str] = None  # None: w4a4 for fp4, w4 (weight-only) for gptq
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
    rank: int = 32  # EoRA / SVD compensation rank
    factor_bits: Optional[int] = None  # quantize the compensation factors to 4 or 8 bits (None: keep float)
    target: Optional[str] = None  # deployment format (compression.fp4.targets); None: sim to compare, else vllm-w4a16


EXPORT_DTYPE = torch.bfloat16  # the served checkpoint's 16-bit tensors (vLLM's CPU W4A16 kernel takes bf16, not fp32)


def target_name(s: CompressSettings) -> str:
    """--target, defaulting to the research path for ``--pipeline fp4`` (a comparison of quantizers)
    and to a served INT4 W4A16 checkpoint for a pipeline (GPTQ writes only that)."""
    if s.target:
        return s.target
    stages = stages_of(s.pipeline)
    return "vllm-w4a16" if stages[0] == "gptq" or (stages[0] == "fp4" and len(stages) > 1) else "sim"


def bits_of(s: CompressSettings) -> str:
    """--bits, defaulting to w4a4 (LLM-FP4's setting) and, for GPTQ, to weight-only w4."""
    return s.bits or ("w4" if stages_of(s.pipeline)[0] == "gptq" else "w4a4")


def reference_texts(
    spec: str, role: str, n: int, seed: int, cfg: Config, tokenizer
) -> tuple[list[str], list[str], list[str]]:
    """(prompts, reference solutions, gold answers) from a data spec: a task's verbose solutions, or a
    row's ``answer`` column (GSM8K's carries the worked solution)."""
    if spec == "task:chain_arith":
        from gdpo.tasks import chain_arith

        rng = random.Random(f"compress/{role}/{seed}")
        probs = chain_arith.problems(role, n, seed)
        rows = [{"question": p.question, "answer": str(p.answer)} for p in probs]
        solutions = [chain_arith.verbose_solution(p, rng) for p in probs]
    else:
        rows = load_rows(spec, role, n, seed)
        solutions = [str(r.get(cfg.data.answer_column, "")) for r in rows]
    built = build_prompts(rows, cfg.data, spec, tokenizer)
    for i, s in enumerate(solutions):
        if not s.strip():
            raise DataError(f"data source '{spec}': sample {i} has an empty '{cfg.data.answer_column}'")
    return built.prompts, solutions, built.columns["answer"]


def _batches(tokenizer, prompts, solutions, batch_size=16):
    """Right-padded ``input_ids``/``attention_mask`` plus ``labels`` (-100 on prompt and padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for lo in range(0, len(prompts), batch_size):
        seqs, labs = [], []
        for p, s in zip(prompts[lo : lo + batch_size], solutions[lo : lo + batch_size]):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            s_ids = tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p_ids + s_ids)
            labs.append([-100] * len(p_ids) + s_ids)
        width = max(map(len, seqs))
        out.append(
            {
                "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in seqs]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs]),
                "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labs]),
            }
        )
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
    """Completions, token counts (EOS counted, as vLLM counts them) and finish reasons of greedy decoding."""
    from gdpo.policy import completion_token_counts
    from gdpo.policy import greedy_generate as generate

    ids, reasons = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts, completion_token_counts(ids, reasons), reasons


def evaluate(
    model, tokenizer, held_out: dict, cfg: Config, s: CompressSettings, label: str, log: Callable[[str], None]
) -> tuple[dict, list[dict]]:
    from gdpo.eval.metrics import held_out_metrics, is_correct
    from rewards import BoundReward, score_rewards

    t0 = time.time()
    ppl = perplexity(model, held_out["ppl_batches"])
    prompts, answers = held_out["prompts"], held_out["answers"]
    texts, counts, reasons = greedy_generate(model, tokenizer, prompts, s.max_new_tokens)
    spec = [(n, kw) for n, kw in cfg.rewards.specs() if n == cfg.rewards.correctness]  # validated: one
    rewards = [BoundReward.from_name(n, kw) for n, kw in spec]
    matrix = score_rewards(rewards, prompts, texts, counts, list(range(len(prompts))), {"answer": answers})
    correct = [is_correct(v[0]) for v in matrix.values.tolist()]
    m = held_out_metrics(correct, counts, [r == "length" for r in reasons], list(range(len(prompts))), texts)
    metrics = {
        "perplexity": ppl,
        "accuracy": m["accuracy"],
        "mean_tokens": m["mean_tokens"],
        "truncation_rate": m["truncation_rate"],
        "eval_seconds": time.time() - t0,
    }
    log(f"{label:>12}: perplexity {ppl:.3f}, accuracy {m['accuracy']:.1%}, mean tokens {m['mean_tokens']:.1f}")
    samples = [
        {"method": label, "prompt_index": i, "completion": t, "tokens": c, "correct": ok}
        for i, (t, c, ok) in enumerate(zip(texts, counts, correct))
    ]
    return metrics, samples


def gap_recovered(full: float, baseline: float, method: float) -> Optional[float]:
    """Share of the baseline's gap to full precision that ``method`` closes (1 = all, None if no gap)."""
    gap = full - baseline
    return None if abs(gap) < 1e-12 else (method - baseline) / gap


def stages_of(pipeline: str) -> list[str]:
    stages = [p.strip() for p in pipeline.split(",") if p.strip()]
    if not stages:
        raise CompressError("--pipeline is empty")
    if stages[0] not in COMPRESSORS:
        raise CompressError(
            f"--pipeline {pipeline!r}: unknown stage {stages[0]!r} first; it must be a compressor: "
            f"{', '.join(COMPRESSORS)} (then optionally {', '.join(COMPENSATORS)})"
        )
    rest = stages[1:]
    if len(rest) > 1 or (rest and rest[0] not in COMPENSATORS):
        raise CompressError(
            f"--pipeline {pipeline!r}: unknown stage {rest[-1]!r} after {stages[0]}; only "
            f"{', '.join(COMPENSATORS)} may follow the compressor"
        )
    return stages


def check_settings(s: CompressSettings) -> None:
    from compression.fp4.search import METHODS, QuantSetting

    stages_of(s.pipeline)
    try:
        QuantSetting.parse(bits_of(s))
    except ValueError as err:
        raise CompressError(f"--bits: {err}") from None
    bad = [m for m in s.methods if m not in METHODS]
    if bad or not s.methods:
        raise CompressError(
            f"--methods: unknown method {bad[0] if bad else '(empty)'}; choose from {', '.join(METHODS)}"
        )
    for flag, v in (
        ("--calib-samples", s.calib_samples),
        ("--max-new-tokens", s.max_new_tokens),
        ("--grid-points", s.grid_points),
        ("--grid-act-points", s.grid_act_points),
        ("--grid-rounds", s.grid_rounds),
        ("--rank", s.rank),
    ):
        if v < 1:
            raise CompressError(f"{flag} must be >= 1, got {v}")
    if s.factor_bits not in (None, 4, 8):
        raise CompressError(f"--factor-bits must be 4 or 8, got {s.factor_bits}")
    _check_target(s)


def _check_target(s: CompressSettings) -> None:
    from compression.fp4.search import QuantSetting
    from compression.fp4.targets import TARGETS

    if s.target is not None and s.target not in TARGETS:
        raise CompressError(f"--target {s.target!r}: expected one of {', '.join(TARGETS)}")
    name, compressor = target_name(s), stages_of(s.pipeline)[0]
    if compressor == "gptq":
        from compression.gptq import GPTQ_PINS, gptq_site

        if not (gptq_site() / "llmcompressor").is_dir():
            raise CompressError(
                f"--pipeline gptq: llm-compressor is not installed in {gptq_site()} (run `make install`, or pip "
                f"install --no-deps --target {gptq_site()} {' '.join(GPTQ_PINS)}; GDPO_GPTQ_SITE names another)"
            )
        if name != "vllm-w4a16":
            raise CompressError(f"--target {name}: GPTQ writes INT4 W4A16 (--target vllm-w4a16) only")
        if bits_of(s) not in ("w4", "w4a16"):
            raise CompressError(f"--pipeline gptq quantizes weights only, to 4 bits: use --bits w4, not {s.bits}")
    if name == "sim":
        return
    if compressor not in ("fp4", "gptq"):
        raise CompressError(f"--target {name}: only the fp4 compressor writes a deployment format; use --target sim")
    if QuantSetting.parse(bits_of(s)).w_bits != 4:
        raise CompressError(f"--target {name} stores 4-bit weights; --bits {s.bits} asks for 8")
    for flag, on in (("--lm-head", s.lm_head), ("--embedding", s.embedding)):
        if on:
            raise CompressError(f"{flag}: --target {name} exports the decoder's linear layers only; use --target sim")


@dataclass
class _Job:
    """Everything checked and loaded before any compression starts."""

    s: CompressSettings
    cfg: Config
    model_dir: str
    tokenizer: object
    full: object  # the full-precision model
    calib: list  # calibration batches
    held_out: dict  # prompts, answers, perplexity batches
    eval_spec: str
    n_eval: int
    out: Path
    log: Callable[[str], None]


def prepare(s: CompressSettings, cfg: Config, log: Callable[[str], None] = print) -> _Job:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compression.calib import CalibrationError, target_linears
    from compression.fp4.model import check_calibration
    from gdpo.policy import ModelPathError, resolve_model_path

    check_settings(s)
    try:
        model_dir = resolve_model_path(s.model, cfg.sft, log, what="--model")
    except ModelPathError as err:
        raise CompressError(str(err)) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    eval_spec = s.eval_data or s.calib
    n_eval = s.eval_limit or (cfg.data.eval_size if eval_spec.startswith("task:") else 0)
    try:
        c_prompts, c_solutions, _ = reference_texts(s.calib, "train", s.calib_samples, s.seed, cfg, tokenizer)
        e_prompts, e_solutions, e_answers = reference_texts(eval_spec, "eval", n_eval, s.seed, cfg, tokenizer)
    except DataError as err:
        raise CompressError(f"{err}") from None
    calib = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in _batches(tokenizer, c_prompts, c_solutions)]
    held_out = {"prompts": e_prompts, "answers": e_answers, "ppl_batches": _batches(tokenizer, e_prompts, e_solutions)}
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    try:
        names = target_linears(full, None, s.lm_head)
    except CalibrationError as err:
        raise CompressError(f"--model {s.model}: {err}") from None
    try:
        check_calibration(calib)
    except CalibrationError as err:
        raise CompressError(f"--calib {s.calib}: {err}") from None
    if stages_of(s.pipeline)[0] == "prune24":
        odd = [n for n in names if full.get_submodule(n).in_features % 4]
        if odd:
            raise CompressError(
                f"--pipeline prune24: {odd[0]} has {full.get_submodule(odd[0]).in_features} inputs, "
                f"not a multiple of 4 (2:4 sparsity needs groups of 4)"
            )
    _check_shapes_for_target(full, names, s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    return _Job(s, cfg, model_dir, tokenizer, full, calib, held_out, eval_spec, n_eval, out, log)


def _check_shapes_for_target(model, names: list, s: CompressSettings) -> None:
    from compression.fp4.targets import get_target

    t = get_target(target_name(s))
    for n in names:
        lin = model.get_submodule(n)
        if lin.in_features % t.in_multiple or lin.out_features % t.out_multiple:
            raise CompressError(
                f"--target {t.name}: {n} is [{lin.out_features}, {lin.in_features}]; the format needs inputs "
                f"a multiple of {t.in_multiple} and outputs of {t.out_multiple} (use --target sim)"
            )


def run_compress(s: CompressSettings, cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Check every input, then compress and evaluate; returns what results.json holds."""
    job = prepare(s, cfg, log)
    if stages_of(s.pipeline) == ["fp4"]:
        return compare_quantizers(job)
    from gdpo.compress_pipeline import run_pipeline

    return run_pipeline(job)


def _grid(s: CompressSettings):
    from compression.fp4.search import SearchGrid

    return SearchGrid(points=s.grid_points, act_points=s.grid_act_points, rounds=s.grid_rounds)


def compare_quantizers(job: _Job) -> dict:
    """``--pipeline fp4``: full precision vs each quantizer in ``--methods``, evaluated in transformers."""
    from compression.fp4.model import load_quantized, quantize_model, save_quantized
    from compression.fp4.search import QuantSetting
    from compression.fp4.targets import get_target

    s, out, log = job.s, job.out, job.log
    setting = QuantSetting.parse(bits_of(s))
    target = get_target(target_name(s)).for_dtype(EXPORT_DTYPE)
    t_start = time.time()
    rows, samples = {}, []
    rows["full"], smp = evaluate(job.full, job.tokenizer, job.held_out, job.cfg, s, "full", log)
    samples += smp
    for method in s.methods:
        model = copy.deepcopy(job.full)
        log(f"quantizing: {method} {setting.name}")
        quant = quantize_model(
            model,
            job.calib,
            setting,
            method,
            _grid(s),
            lm_head=s.lm_head,
            embedding=s.embedding,
            log=lambda m: None,
            target=target,
        )
        if method == "search":
            save_quantized(
                model, {**quant, "source_model": str(Path(job.model_dir).resolve())}, str(out / "model"), job.tokenizer
            )
            model = load_quantized(str(out / "model"))
        metrics, smp = evaluate(model, job.tokenizer, job.held_out, job.cfg, s, method, log)
        layer_mse = [v["mse"]["final"] for v in quant["layers"].values()]
        metrics.update(quantize_seconds=quant["seconds"], calib_output_mse_mean=sum(layer_mse) / len(layer_mse))
        rows[method] = metrics
        samples += smp
        del model
    if "minmax_fp" in rows:
        for method, m in rows.items():
            if method in ("full", "minmax_fp"):
                continue
            m["gap_recovered"] = {
                k: gap_recovered(rows["full"][k], rows["minmax_fp"][k], m[k]) for k in ("accuracy", "perplexity")
            }
    results = {
        "pipeline": s.pipeline,
        "setting": setting.name,
        "target": target.name,
        "model": str(Path(job.model_dir).resolve()),
        "calibration": _calib_info(job),
        "held_out": _held_out_info(job),
        "methods": rows,
        "checkpoint": str((out / "model").resolve()) if "search" in s.methods else None,
        "settings": asdict(s),
        "seconds": time.time() - t_start,
    }
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _calib_info(job: _Job) -> dict:
    return {
        "data": job.s.calib,
        "samples": job.s.calib_samples,
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in job.calib)),
    }


def _held_out_info(job: _Job) -> dict:
    return {
        "data": job.eval_spec,
        "prompts": len(job.held_out["prompts"]),
        "max_new_tokens": job.s.max_new_tokens,
        "decoding": "greedy",
    }


def results_table(results: dict) -> list[list[str]]:
    """The printed table of either kind of results.json."""
    pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    if "variants" in results:
        acts = any("with_quantized_activations" in r for r in results["variants"].values())
        head = ["variant", "accuracy", "mean tokens", "MB on disk", "recovered"]
        head += ["accuracy (acts)", "recovered (acts)"] if acts else []
        body = []
        for name, r in results["variants"].items():
            row = [
                name,
                f"{r['accuracy']:.1%}",
                f"{r['mean_tokens']:.1f}",
                f"{r['disk']['total'] / 1e6:.3f}" if "disk" in r else "-",
                pct(r["recovered"]) if "recovered" in r else "-",
            ]
            if acts:
                q = r.get("with_quantized_activations")
                row += [f"{q['accuracy']:.1%}" if q else "-", pct(q["recovered"]) if q and "recovered" in q else "-"]
            body.append(row)
        return [head, *body]
    head = ["method", "perplexity", "accuracy", "mean tokens", "calib MSE", "gap recovered (acc / ppl)"]
    body = []
    for name, m in results["methods"].items():
        rec = m.get("gap_recovered")
        body.append(
            [
                name,
                f"{m['perplexity']:.3f}",
                f"{m['accuracy']:.1%}",
                f"{m['mean_tokens']:.1f}",
                f"{m['calib_output_mse_mean']:.3g}" if "calib_output_mse_mean" in m else "-",
                f"{pct(rec['accuracy'])} / {pct(rec['perplexity'])}" if rec else "-",
            ]
        )
    return [head, *body]
