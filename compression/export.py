"""Export an LLM-FP4-quantized model as a compressed-tensors checkpoint, the format vLLM serves.

The quantized layers are written with compressed-tensors' own compressors (``pack-quantized`` for
INT4 W4A16, ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``) and the ``quantization_config`` its
``QuantizationConfig`` describes; vLLM and transformers read the directory without project code. The
search must have run under the same target (compression.fp4.targets), so every row's scale is one the
format stores: the export then writes the searched weights, and checks it by decoding what it wrote
with the same library (``max_decode_error``; 0 unless a row's scale fell out of the format's range).

Mapping of a row with unit ``u = 2^-b`` (compression.fp4.formats):
- W4A16: E1M2 values are ``k · u/2``, k in -7..7: INT4 codes k, per-channel ``weight_scale`` u/2.
- NVFP4: E2M1 values are ``v · 2u``, v in the OCP FP4 set: codes v, ``weight_scale`` = 2u·G (E4M3)
  for each group of 16, ``weight_global_scale`` = G, a power of two (the format divides by it).
- MXFP4: codes v, ``weight_scale`` = 2u (E8M0) for each group of 32.

Activation pre-shifts. The deployed layer reads ``x · 2^s`` (per input channel, s >= 0 integers) with
the shift folded into its weights ``Q(W · 2^-s)``; no target has a place for ``2^s``, so it moves into
what produces x: the RMSNorm weight before q/k/v and gate/up, the rows of v_proj before o_proj (one
shift per KV head's channels), the rows of up_proj before down_proj. Multiplying by a power of two is
exact in every format here, so the export computes what the search scored (with its activations in
16 bits).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from compression.fp4.qlinear import QuantEmbedding, QuantLinear
from compression.fp4.targets import Target
from gdpo.fileio import atomic_dir
from gdpo.policy import save_tokenizer

__all__ = ["ExportError", "ExportInfo", "Fold", "export_compressed", "export_bytes", "fold_pre_shifts"]

_FORMAT = {"vllm-w4a16": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_E4M3_MAX, _E4M3_MIN_NORMAL = 448.0, 2.0**-6


class ExportError(ValueError):
    """The model cannot be written in the target format; the message names the layer."""


@dataclass
class ExportInfo:
    path: str
    target: str
    format: str  # compressed-tensors format name
    dtype: str  # the unquantized tensors' and (W4A16) scales' dtype
    layers: int  # quantized linear layers written
    folded_shifts: Fold  # the activation pre-shifts moved into the layer before
    max_decode_error: float  # max |decoded - searched| over all quantized weights, relative to the row's max


def _scheme(target: Target):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if target.name == "vllm-w4a16":
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel", dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=args, format=_FORMAT[target.name])
    scheme = preset_name_to_scheme("NVFP4A16" if target.name == "nvfp4" else "MXFP4A16", ["Linear"])
    scheme.format = _FORMAT[target.name]
    return scheme


def _producer(name: str) -> tuple[str, str]:
    """(module that produces ``name``'s input, how: 'norm' or 'rows') for Llama-style decoder layers."""
    prefix, _, leaf = name.rpartition(".")
    block = prefix.rpartition(".")[0]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{block}.input_layernorm", "norm"
    if leaf in ("gate_proj", "up_proj"):
        return f"{block}.post_attention_layernorm", "norm"
    if leaf == "o_proj":
        return f"{prefix}.v_proj", "rows"
    if leaf == "down_proj":
        return f"{prefix}.up_proj", "rows"
    raise ExportError(
        f"{name}: cannot fold its activation pre-shift: no known layer produces its input "
        f"(q/k/v/gate/up after a norm, o_proj after v_proj, down_proj after up_proj)"
    )


@dataclass
class Fold:
    """What :func:`fold_pre_shifts` moved, for whatever else reads or writes those layers (a LoRA
    adapter): ``input_shifts[name]`` = s [in], the layer now reads ``x · 2^s``; ``output_factors[name]``
    [out], the producer's outputs are now multiplied by these powers of two."""

    input_shifts: dict = field(default_factory=dict)
    output_factors: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.input_shifts)


@torch.no_grad()
def fold_pre_shifts(model: nn.Module) -> Fold:
    """Move each quantized layer's input shift ``2^s`` into the layer that produces its input, in place;
    afterwards every QuantLinear reads the shifted input as produced (``lq.a_shift`` None) and the model
    computes what it computed before, activation quantization included."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    done_norms: dict[str, Tensor] = {}
    moved = Fold()
    for name, mod in quant.items():
        shift = mod.lq.a_shift
        if shift is None or not bool((shift != 0).any()):
            mod.lq.a_shift = None
            continue
        factor = torch.exp2(shift.float())  # [in]
        src_name, how = _producer(name)
        try:
            src = model.get_submodule(src_name)
        except AttributeError:
            raise ExportError(f"{name}: its input's producer {src_name} is not in the model") from None
        if how == "norm":
            if src_name in done_norms:  # q/k/v (gate/up) share one quantized input and one shift
                if not torch.equal(done_norms[src_name], shift):
                    raise ExportError(f"{name}: its pre-shift differs from another reader of {src_name}'s output")
            else:
                src.weight.mul_(factor.to(src.weight.dtype))
                done_norms[src_name] = shift.clone()
        else:
            rows = _producer_rows(model, name, factor)
            _scale_rows(src, rows, src_name)
            moved.output_factors[src_name] = rows.clone()
        mod.lq.a_shift = None
        moved.input_shifts[name] = shift.clone()
    return moved


def _producer_rows(model: nn.Module, name: str, factor: Tensor) -> Tensor:
    """Per-row factors for the producer of ``name``'s input: the same channels, except o_proj under
    grouped-query attention, where the query heads sharing a KV head must share their shifts."""
    if not name.endswith("o_proj"):
        return factor
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    per = factor.view(heads, -1)  # [heads, head_dim]
    grouped = per.view(kv, heads // kv, -1)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ExportError(
            f"{name}: its pre-shifts differ between query heads that share a KV head, so v_proj cannot carry them"
        )
    return grouped[:, 0].reshape(-1)


def _scale_rows(src: nn.Module, rows: Tensor, src_name: str) -> None:
    if isinstance(src, QuantLinear):
        if src.lq.w_fmt is None:
            raise ExportError(f"{src_name}: an INT-quantized producer cannot take a pre-shift")
        src.weight.mul_(rows[:, None])  # exact: a power of two per row
        src.lq.w_param = src.lq.w_param - torch.log2(rows)  # unit 2^-b times 2^s
    elif isinstance(src, nn.Linear):
        src.weight.mul_(rows[:, None].to(src.weight.dtype))
    else:
        raise ExportError(f"{src_name}: cannot scale the rows of a {type(src).__name__}")
    if src.bias is not None:
        src.bias.mul_(rows.to(src.bias.dtype))


def _layer_state(mod: QuantLinear, name: str, target: Target, scheme, dtype: torch.dtype) -> tuple[dict, float]:
    """compressed-tensors' state for one layer, and its decode error relative to the row max."""
    from compressed_tensors.compressors.base import BaseCompressor

    lq = mod.lq
    if lq.w_bits != 4 or lq.w_fmt is None or (target.w_formats and lq.w_fmt not in target.w_formats):
        raise ExportError(
            f"{name}: quantized as w{lq.w_bits} {lq.w_fmt.name if lq.w_fmt else 'int'}, which {target.name} "
            f"does not store (its formats: {', '.join(f.name for f in target.w_formats)}); "
            f"run the search with this target"
        )
    out_f, in_f = mod.weight.shape
    if in_f % target.in_multiple or out_f % target.out_multiple:
        raise ExportError(
            f"{name}: [{out_f}, {in_f}] weight; {target.name} needs inputs a multiple of {target.in_multiple} "
            f"and outputs of {target.out_multiple}"
        )
    w = mod.weight.float()  # [out, in] the searched, deployed weight
    unit = torch.exp2(-lq.w_param.double()).float()  # [out]
    state: dict = {"weight": w}
    if target.name == "vllm-w4a16":
        state["weight_scale"] = (unit / 2)[:, None]  # [out, 1]
    else:
        scale = 2 * unit  # [out]: E2M1 at b=1 is the OCP FP4 grid
        groups = in_f // target.group_size
        if target.name == "nvfp4":
            g = 2.0 ** math.floor(math.log2(_E4M3_MAX / float(scale.max())))
            state["weight_global_scale"] = torch.tensor([g], dtype=torch.float32)
            scale = scale * g
        state["weight_scale"] = scale[:, None].expand(out_f, groups).contiguous()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    packed = compressor.compress(state, scheme)
    if target.name == "vllm-w4a16":
        packed["weight_scale"] = packed["weight_scale"].to(dtype)
    decoded = compressor.decompress({**packed, "weight_scale": packed["weight_scale"].float()}, scheme)["weight"]
    decoded = decoded.float()  # the codes times the stored scales, in float32
    row_max = w.abs().amax(1).clamp_min(1e-30)
    err = float(((decoded - w).abs().amax(1) / row_max).max())
    if mod.bias is not None:
        packed["bias"] = mod.bias.to(dtype)
    return packed, err


@torch.no_grad()
def export_compressed(
    model: nn.Module, target: Target, out_dir: str, tokenizer=None, dtype: torch.dtype = torch.bfloat16
) -> ExportInfo:
    """Write ``model`` (its linears LLM-FP4-quantized under ``target``) as a compressed-tensors
    checkpoint in ``out_dir`` (atomically). The model is changed: its pre-shifts are folded."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    if target.name not in _FORMAT:
        raise ExportError(f"target {target.name!r} has no stored format; export one of {', '.join(_FORMAT)}")
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            raise ExportError(f"{name}: a quantized embedding has no compressed-tensors form here; leave it full")
    folded = fold_pre_shifts(model)
    scheme = _scheme(target)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ExportError("the model has no quantized linear layers to export")
    state: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        state[k] = v.detach().to(dtype) if v.is_floating_point() else v.detach()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    worst = 0.0
    for name, mod in quant.items():
        packed, err = _layer_state(mod, name, target, scheme, dtype)
        worst = max(worst, err)
        state.pop(f"{name}.weight", None)
        state.update({f"{name}.{k}": v for k, v in packed.items()})
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme}, format=scheme.format, ignore=ignore, quantization_status="compressed"
    )
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": compressed_tensors.__version__,
        **qconfig.model_dump(exclude=["quant_method"]),
    }
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return ExportInfo(
        str(Path(out_dir).resolve()),
        target.name,
        scheme.format,
        config["dtype"],
        len(quant),
        folded,
        worst,
    )


def _safetensors_sizes(path: Path) -> dict[str, tuple[int, list[int], str]]:
    """name -> (bytes on disk, shape, dtype), read from the file's header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["data_offsets"][1] - v["data_offsets"][0], v["shape"], v["dtype"]) for k, v in header.items()}


def export_bytes(path: str, reference_bytes_per_value: int = 2) -> dict:
    """Bytes on disk of an exported checkpoint (read from its safetensors header and file size):
    ``quantized`` (every tensor of a quantized layer but its bias), ``quantized_bf16`` (the same layers'
    weights at ``reference_bytes_per_value`` bytes each), ``rest`` and ``file``."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path}: no .safetensors file")
    sizes: dict = {}
    for f in files:
        sizes.update(_safetensors_sizes(f))
    layers = {k.rsplit(".", 1)[0] for k in sizes if k.endswith(".weight_packed")}
    quantized = reference = 0
    for layer in layers:
        for suffix in ("weight_packed", "weight_scale", "weight_global_scale", "weight_shape", "weight_zero_point"):
            if f"{layer}.{suffix}" in sizes:
                quantized += sizes[f"{layer}.{suffix}"][0]
        shape = _weight_shape(sizes, layer)
        reference += shape[0] * shape[1] * reference_bytes_per_value
    total = sum(s[0] for s in sizes.values())
    return {
        "quantized": quantized,
        "quantized_bf16": reference,
        "quantized_ratio": quantized / reference if reference else None,
        "rest": total - quantized,
        "file": sum(f.stat().st_size for f in files),
        "layers": len(layers),
    }


def _weight_shape(sizes: dict, layer: str) -> tuple[int, int]:
    """[out, in] of a packed layer: INT packs 8 codes per int32 along the input, FP4 two per uint8."""
    _, shape, dtype = sizes[f"{layer}.weight_packed"]
    per = 8 if dtype == "I32" else 2
    return shape[0], shape[1] * per
