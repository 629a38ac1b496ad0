"""``gdpo compress --pipeline C[,eora]``: compress, export what vLLM serves, compensate, evaluate every
variant on vLLM (see :func:`run_pipeline`); the settings, checks and held-out data are gdpo.compress's."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from gdpo.compress import (
    EXPORT_DTYPE,
    CompressError,
    _calib_info,
    _grid,
    _held_out_info,
    _Job,
    bits_of,
    evaluate,
    gap_recovered,
    stages_of,
    target_name,
)
from gdpo.fileio import atomic_write_text

__all__ = ["run_pipeline"]


def run_pipeline(job: _Job) -> dict:
    """``--pipeline C[,eora]``: compress the policy with C (fp4 = LLM-FP4 search at ``--bits`` under
    ``--target``; prune24 = 2:4 magnitude pruning; prune50 = 50% unstructured magnitude pruning),
    compensate with EoRA and, for comparison, plain SVD at the same rank, then evaluate every variant
    with the token-efficiency evaluation on vLLM (a base checkpoint + the compensation as a LoRA
    adapter). Every row says what ran (``ran``) and how many bytes its files take on disk (``disk``).

    With an fp4 ``--target`` other than sim, the quantized policy is also exported in that format
    (compression.export) and, where vLLM serves it on this machine (vllm-w4a16 on CPUs; NVFP4 and MXFP4
    need a CUDA GPU), evaluated as served, alone and with the EoRA adapter (rows ``*.served``). The
    simulated rows run the same quantized weights dequantized to float32. Where activations are
    quantized, which no served row does, the variants are also evaluated in transformers with them.

    Outputs in ``--out``: ``compressed/`` (the compressed weights, dequantized, as a plain
    checkpoint), ``model/`` (fp4: the packed research checkpoint), ``served/`` (fp4 with a target: the
    compressed-tensors checkpoint), ``adapters/{eora,svd}/`` (peft LoRA, 16-bit factors;
    ``eora-served/`` when the export folded pre-shifts), ``evals/<variant>/`` (gdpo eval results),
    ``report/``, ``results.json``.
    """
    from compression.calib import target_linears
    from compression.export import Fold, export_bytes, export_compressed
    from compression.fp4.model import quantize_model, save_quantized
    from compression.fp4.search import QuantSetting
    from compression.fp4.targets import get_target
    from compression.pipeline import compensate_model, save_dense, save_lora, storage_bytes
    from compression.prune import prune_linears
    from gdpo.eval.evaluate import EvalEngine, EvalSettings, evaluate_model
    from gdpo.eval.report import write_report

    s, out, log = job.s, job.out, job.log
    stages = stages_of(s.pipeline)
    compressor = stages[0]
    t_start = time.time()
    names = target_linears(job.full, None, s.lm_head)
    reference = {n: job.full.get_submodule(n).weight.detach().float().clone() for n in names}
    pruned: list[str] = []
    detail: dict = {}
    setting = QuantSetting.parse(bits_of(s))
    target = get_target(target_name(s)).for_dtype(EXPORT_DTYPE)
    export, fold = None, Fold()  # fold: the pre-shifts the export moved, which a served adapter follows
    if compressor == "fp4":
        compressed = copy.deepcopy(job.full)
        log(f"compressing: LLM-FP4 search, {setting.name}, target {target.name}")
        quant = quantize_model(
            compressed,
            job.calib,
            setting,
            "search",
            _grid(s),
            lm_head=s.lm_head,
            embedding=s.embedding,
            log=lambda m: None,
            target=target,
        )
        save_quantized(
            compressed, {**quant, "source_model": str(Path(job.model_dir).resolve())}, str(out / "model"), job.tokenizer
        )
        detail = {"setting": setting.name, "target": target.name, "quantize_seconds": quant["seconds"]}
        if target.name != "sim":
            info = export_compressed(
                copy.deepcopy(compressed), target, str(out / "served"), job.tokenizer, EXPORT_DTYPE
            )
            fold = info.folded_shifts
            export = {
                "path": info.path,
                "format": info.format,
                "dtype": info.dtype,
                "layers": info.layers,
                "folded_shift_layers": sorted(info.folded_shifts.input_shifts),
                "max_decode_error": info.max_decode_error,
                "bytes": export_bytes(info.path),
                "served_here": _served_here(target),
            }
            log(
                f"exported {info.format} ({info.dtype}): quantized layers {export['bytes']['quantized'] / 1e6:.3f} MB "
                f"on disk, {export['bytes']['quantized_ratio']:.3f}x their bf16 size"
            )
    elif compressor == "gptq":
        from compression.fp4.targets import TARGETS
        from compression.gptq import GPTQ_PINS, GPTQError, load_decompressed, run_gptq

        log("compressing: GPTQ W4A16 per channel (llm-compressor)")
        t0 = time.time()
        try:
            path = run_gptq(job.model_dir, job.calib, str(out / "served"), bits=4, log=log)
        except GPTQError as err:
            raise CompressError(str(err)) from None
        compressed = load_decompressed(str(path))  # the served weights, decoded to float32
        detail = {
            "setting": "w4a16",
            "target": "vllm-w4a16",
            "library": GPTQ_PINS[0],
            "quantize_seconds": time.time() - t0,
        }
        export = {
            "path": str(path.resolve()),
            "format": "pack-quantized",
            "dtype": "bfloat16",
            "layers": len(names),
            "folded_shift_layers": [],
            "max_decode_error": 0.0,  # the simulation rows are the checkpoint's own decoded weights
            "bytes": export_bytes(str(path)),
            "served_here": _served_here(TARGETS["vllm-w4a16"]),
        }
    else:
        pattern = "2:4" if compressor == "prune24" else "unstructured"
        log(f"compressing: {pattern} magnitude pruning")
        compressed = copy.deepcopy(job.full)
        sparsity = prune_linears(compressed, names, pattern, 0.5)
        pruned = names
        detail = {"pattern": pattern, "sparsity": sum(sparsity.values()) / len(sparsity)}
    save_dense(compressed, str(out / "compressed"), job.tokenizer)
    simulated = (
        "vLLM, the compressed weights dequantized to float32" if compressor in ("fp4", "gptq") else "vLLM, float32"
    )
    models = {"full": job.full, compressor: compressed}
    # label -> (model dir, adapter dir, engine dtype, what ran)
    served = {
        "full": (job.model_dir, None, job.cfg.model.dtype, f"vLLM, {job.cfg.model.dtype}"),
        compressor: (str(out / "compressed"), None, "float32", simulated),
    }
    compensation = {}
    if len(stages) > 1:
        for method in ("svd", "eora"):
            model = copy.deepcopy(compressed)
            log(f"compensating: {method}, rank {s.rank}")
            t0 = time.time()
            factors = compensate_model(model, reference, job.calib, s.rank, method, s.factor_bits, log=log)
            label = f"{compressor}+{method}"
            save_lora(factors, str(out / "adapters" / method), str((out / "compressed").resolve()))
            models[label] = model
            served[label] = (
                str(out / "compressed"),
                str(out / "adapters" / method),
                "float32",
                f"{simulated}, + {'EoRA' if method == 'eora' else 'SVD'} as a LoRA adapter (bf16 factors)",
            )
            compensation[label] = {
                "output_error_before": sum(f.error_before for f in factors.values()),
                "output_error_after": sum(f.error_after for f in factors.values()),
                "seconds": time.time() - t0,
            }
            if method == "eora" and export and export["served_here"]["ok"]:
                adapter = out / "adapters" / ("eora-served" if fold else "eora")
                if fold:
                    save_lora(factors, str(adapter), export["path"], fold=fold)
                models[f"{compressor}+eora.served"] = model
                served_eora = (
                    export["path"],
                    str(adapter),
                    "bfloat16",
                    f"{export['served_here']['ran']}, + EoRA as a LoRA adapter (bf16 factors)",
                )
    if export and export["served_here"]["ok"]:  # the served rows last: the original and the base in bf16, + EoRA
        served["full.bf16"] = (job.model_dir, None, "bfloat16", "vLLM, bfloat16 (the served rows' reference)")
        models["full.bf16"] = job.full
        served[f"{compressor}.served"] = (export["path"], None, "bfloat16", export["served_here"]["ran"])
        models[f"{compressor}.served"] = compressed
        if len(stages) > 1:
            served[f"{compressor}+eora.served"] = served_eora

    rows: dict = {}
    with EvalEngine(lora_rank=s.rank if len(stages) > 1 else 0, seed=s.seed) as engines:  # one per dtype/format
        for label, (model_path, lora, dtype, ran) in served.items():
            log(f"evaluating on vLLM: {label} ({ran})")
            settings = EvalSettings(
                model=model_path,
                data=job.eval_spec,
                max_new_tokens=s.max_new_tokens,
                limit=job.n_eval,
                seed=s.seed,
                lora=lora,
                base=None if label == "full" else str(out / "evals" / "full"),
            )
            cfg = dataclasses.replace(job.cfg, model=dataclasses.replace(job.cfg.model, dtype=dtype))
            res = evaluate_model(settings, cfg, str(out / "evals" / label), log, engines)
            m = res["metrics"]
            rows[label] = {
                "ran": ran,
                "accuracy": m["accuracy"],
                "mean_tokens": m["mean_tokens"],
                "truncation_rate": m["truncation_rate"],
                "disk": _disk_bytes(model_path, lora),
                "bytes": storage_bytes(
                    models[label], pruned if label != "full" else (), factor_bits=s.factor_bits or 16
                ),
                **compensation.get(label.removesuffix(".served"), {}),
            }
    if compressor == "fp4" and setting.a_bits:
        for label, model in models.items():
            if label.startswith("full") or label.endswith(".served"):
                continue
            m, _ = evaluate(model, job.tokenizer, job.held_out, job.cfg, s, label + " (acts)", log)
            rows[label]["with_quantized_activations"] = {k: m[k] for k in ("accuracy", "mean_tokens", "perplexity")}
    full_acc = rows["full"]["accuracy"]
    for label, row in rows.items():
        if "+" in label:  # the loss recovered, against the original run alike (float32, or bf16 for served rows)
            is_served = label.endswith(".served")
            base, ref = compressor + (".served" if is_served else ""), rows["full.bf16" if is_served else "full"]
            row["recovered"] = gap_recovered(ref["accuracy"], rows[base]["accuracy"], row["accuracy"])
            if "with_quantized_activations" in row:
                acts = {
                    k: v["with_quantized_activations"]["accuracy"]
                    for k, v in rows.items()
                    if "with_quantized_activations" in v
                }
                row["with_quantized_activations"]["recovered"] = gap_recovered(full_acc, acts[compressor], acts[label])
    write_report(
        [str(out / "evals" / k) for k in served],
        str(out / "report"),
        title=f"gdpo compress: {s.pipeline} ({detail.get('setting') or detail['pattern']}), rank {s.rank}",
    )
    results = {
        "pipeline": s.pipeline,
        "compressor": {"stage": compressor, **detail},
        "rank": s.rank,
        "factor_bits": s.factor_bits,
        "model": str(Path(job.model_dir).resolve()),
        "calibration": _calib_info(job),
        "held_out": _held_out_info(job),
        "variants": rows,
        "export": export,
        "outputs": {
            "compressed": str((out / "compressed").resolve()),
            "served": export["path"] if export else None,
            "adapters": {m: str((out / "adapters" / m).resolve()) for m in ("svd", "eora") if len(stages) > 1},
            "report": str((out / "report" / "report.html").resolve()),
        },
        "settings": asdict(s),
        "seconds": time.time() - t_start,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _served_here(target) -> dict:
    """Whether vLLM on this machine serves the target's checkpoint, and the row label of what runs."""
    if target.name == "vllm-w4a16" and not torch.cuda.is_available():
        return {"ok": True, "ran": "vLLM W4A16 (compressed-tensors pack-quantized, CPU kernel CPUWNA16), bfloat16"}
    if target.name == "vllm-w4a16":
        return {"ok": True, "ran": "vLLM W4A16 (compressed-tensors pack-quantized, Marlin), bfloat16"}
    if torch.cuda.is_available():
        return {"ok": True, "ran": f"vLLM {target.name.upper()} (compressed-tensors), bfloat16"}
    return {"ok": False, "ran": None, "why": f"vLLM's {target.name.upper()} kernels need a CUDA GPU; not served here"}


def _disk_bytes(model_dir: str, adapter: Optional[str]) -> dict:
    """Bytes of the weight files as they lie on disk (the model's .safetensors, the adapter's)."""
    model = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    lora = (Path(adapter) / "adapter_model.safetensors").stat().st_size if adapter else 0
    return {"model": model, "adapter": lora, "total": model + lora}
