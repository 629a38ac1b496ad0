"""Quantize a transformers causal LM with LLM-FP4 (or a MinMax baseline), save it packed, load it back.

On-disk layout (``save_quantized``; written to a temporary directory and renamed into place):
- ``config.json`` and the tokenizer files: the model's own (``tie_word_embeddings`` turned off when the
  head or the embedding is quantized and they were tied);
- ``model.safetensors``: every unquantized tensor under its usual name, and per quantized module
  ``<name>.qweight`` (uint8 codes, two per byte at 4 bits), ``<name>.w_param`` (float32 exponent bias or
  INT scale per output row), ``<name>.a_shift`` (int8 pre-shift per input channel, when used) and
  ``<name>.bias``;
- ``quantization.json``: the setting, the method and per module its formats, ρ and calibration MSE.
``load_quantized(dir)`` builds the model from its config and swaps the quantized modules in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from compression.calib import (
    MIN_CALIB_TOKENS,
    CalibrationError,
    block_groups,
    capture_inputs,
    count_tokens,
    set_module,
    target_linears,
)
from compression.fp4.qlinear import QuantEmbedding, QuantLinear, layer_meta
from gdpo.fileio import atomic_dir
from gdpo.policy import save_tokenizer
from compression.fp4.search import QuantSetting, SearchGrid, quantize_layer, search_embedding, split_rows
from compression.fp4.targets import SIM, Target

__all__ = ["quantize_model", "save_quantized", "load_quantized", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _untie(model: nn.Module) -> None:
    """Give the output head its own weight (quantizing one side of a tied pair must not touch the other)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def check_calibration(batches: Sequence[dict], min_tokens: int = MIN_CALIB_TOKENS) -> int:
    n = count_tokens(batches)
    if n < min_tokens:
        raise CalibrationError(
            f"calibration data too small to estimate exponent biases: {n} tokens in "
            f"{sum(len(b['input_ids']) for b in batches)} samples, need at least {min_tokens} "
            f"(raise --calib-samples or use longer texts)"
        )
    return n


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    batches: Sequence[dict],
    setting: QuantSetting,
    method: str,
    grid: SearchGrid = SearchGrid(),
    targets: Optional[Sequence[str]] = None,
    lm_head: bool = False,
    embedding: bool = False,
    max_tokens: int = 4096,
    log: Callable[[str], None] = print,
    target: Target = SIM,
) -> dict:
    """Quantize ``model`` in place; returns ``quantization.json``'s content. Inputs are checked first.
    ``target``: the deployment format the weights must fit (compression.fp4.targets)."""
    names = target_linears(model, targets, lm_head)
    check_calibration(batches)
    model.eval()
    if lm_head or embedding:
        _untie(model)
    layers = {}
    t0 = time.time()
    for group in block_groups(names):
        xs = capture_inputs(model, group, batches, max_tokens)
        for readers in shared_input_sets(group, xs):
            linears = [model.get_submodule(n) for n in readers]
            stacked = torch.cat([lin.weight.detach() for lin in linears])  # [sum(out), in]
            lq = quantize_layer(stacked, xs[readers[0]], setting, method, grid, target)
            parts = split_rows(lq, [lin.out_features for lin in linears])
            for name, linear, part in zip(readers, linears, parts):
                set_module(model, name, QuantLinear.from_linear(linear, part))
                layers[name] = {
                    **layer_meta(part),
                    "in_features": linear.in_features,
                    "out_features": linear.out_features,
                    "shares_input_with": readers,
                }
            log(
                f"  {', '.join(readers)}: w {layers[readers[0]]['w_format']}, a {layers[readers[0]]['a_format']}, "
                f"output MSE {lq.mse.get('start', lq.mse['final']):.3g} -> {lq.mse['final']:.3g}"
            )
    emb_meta = None
    if embedding:
        emb = model.get_input_embeddings()
        fmt, row_bias = search_embedding(emb.weight.detach(), setting.w_bits, grid)
        from compression.fp4.formats import fake_quant

        q = fake_quant(emb.weight.detach().float(), fmt.e_bits, fmt.m_bits, row_bias[:, None])
        model.set_input_embeddings(QuantEmbedding(fmt, row_bias, q, emb.padding_idx))
        emb_meta = {
            "w_format": fmt.name,
            "padding_idx": emb.padding_idx,
            "num_embeddings": q.shape[0],
            "embedding_dim": q.shape[1],
        }
    return {
        "format_version": FORMAT_VERSION,
        "setting": setting.name,
        "method": method,
        "target": target.name,
        "grid": {
            "lo": grid.lo,
            "hi": grid.hi,
            "points": grid.points,
            "act_points": grid.act_points,
            "rounds": grid.rounds,
        },
        "layers": layers,
        "embedding": emb_meta,
        "seconds": time.time() - t0,
    }


def shared_input_sets(names: Sequence[str], xs: dict) -> list[list[str]]:
    """Partition ``names`` (order kept) into sets whose captured inputs are identical tensors."""
    sets: list[list[str]] = []
    for n in names:
        for s in sets:
            if xs[s[0]].shape == xs[n].shape and torch.equal(xs[s[0]], xs[n]):
                s.append(n)
                break
        else:
            sets.append([n])
    return sets


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def save_quantized(model: nn.Module, quant: dict, out_dir: str, tokenizer=None) -> Path:
    """Write the packed checkpoint (see the module docstring) atomically; returns its directory."""
    from safetensors.torch import save_file

    qmods = _quant_modules(model)
    tensors = {}
    for name, t in model.state_dict().items():  # QuantLinear / QuantEmbedding buffers are not persistent
        tensors[name] = t.detach().contiguous().clone()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied: the embedding holds it
    for name, mod in qmods.items():
        for k, t in mod.packed_state().items():
            tensors[f"{name}.{k}"] = t.detach().contiguous().clone()
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "gdpo_quantization": "fp4"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        (tmp / "quantization.json").write_text(json.dumps(quant, indent=2) + "\n")
    out = Path(out_dir)
    return out


def load_quantized(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model saved by :func:`save_quantized`, with its quantized modules in place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    qfile = p / "quantization.json"
    if not qfile.is_file():
        raise CalibrationError(f"{path}: not a quantized checkpoint (no quantization.json)")
    quant = json.loads(qfile.read_text())
    if quant.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{qfile}: format_version {quant.get('format_version')} is not {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(p)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(p / "model.safetensors"))
    used = set()

    def take(prefix: str) -> dict:
        keys = [k for k in tensors if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1 :]]
        used.update(keys)
        return {k[len(prefix) + 1 :]: tensors[k] for k in keys}

    for name, meta in quant["layers"].items():
        state = take(name)
        if "qweight" not in state:
            raise CalibrationError(f"{path}: quantized layer {name} has no packed weight in model.safetensors")
        set_module(model, name, QuantLinear.from_packed(meta, state, meta["in_features"]))
    if quant.get("embedding"):
        name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        model.set_input_embeddings(
            QuantEmbedding.from_packed(quant["embedding"], take(name), quant["embedding"]["embedding_dim"])
        )
    rest = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CalibrationError(
            f"{path}: model.safetensors does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
