"""DoRA adapters (Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024). Pure torch.

The adapted weight (paper Eq. 5): ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_c`` with the norm taken per output
row over the input dimension and treated as a constant in backprop (paper §4.3). ``m`` starts at the row
norms of W0, B at zero, A as peft initialises it (Kaiming-uniform, a=√5), s = alpha / r (alpha / √r with
rsLoRA).

How this differs from peft's DoRA (same math, same files):
- The forward never forms an out x in matrix. The row norm (float32) comes from
  ``kernels.dora_norm``: on a GPU a Triton kernel that streams W0 in tiles and adds ``s·BA`` in
  registers; elsewhere cross terms ``‖W0_i‖² + 2s·(W0Aᵀ)_i·B_i + s²·B_i(AAᵀ)B_iᵀ``, which lose
  precision only where the adapter nearly cancels a row of W0.
- With dropout 0 (or in eval) one fused autograd function computes the base product once and writes the
  DoRA output into its buffer; for bias-free layers it keeps the output itself for the magnitude
  gradient instead of a second ``[tokens, out]`` tensor. So time and memory stay near plain LoRA's.
  With dropout > 0 in training it follows peft's formula with ordinary autograd ops (a second base
  product on the dropped input, as peft does).
- Adapter tensors take the input's dtype inside the forward (peft computes the adapter path in float32).
- ``merge_dora`` keeps a copy of W0 so ``unmerge_dora`` restores it bit for bit (peft inverts the
  formula, which is not exact).

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's layout (keys
``base_model.model.<module>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``), so
``peft.PeftModel.from_pretrained`` reads what :func:`save_adapter` writes and :func:`load_adapter` reads
peft's DoRA adapters. Under DeepSpeed ZeRO-3 mark :class:`DoraLinear` as a leaf module so its base weight
is gathered for the fused forward (``gdpo.learner`` does).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdpo.fileio import atomic_write, atomic_write_text
from kernels.dora_norm import dora_row_norm

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def dora_merged_weight(w0: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scale: float) -> Tensor:
    """``[out, in], [r, in], [out, r], [out] -> [out, in]``, computed in float32 (or wider)."""
    dtype = torch.promote_types(w0.dtype, torch.float32)
    w = w0.to(dtype) + scale * (lora_b.to(dtype) @ lora_a.to(dtype))  # [out, in]
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)  # [out, 1]
    return (magnitude.to(dtype).unsqueeze(1) * w / norm).to(w0.dtype)


class _FusedDora(torch.autograd.Function):
    """``y = g ⊙ (x W0ᵀ + s·(x Aᵀ) Bᵀ) + b`` with ``g = m / ‖W0 + s·BA‖`` (norm constant in backprop)."""

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, m, scale, zero_rows):  # x [T, in], w0 [out, in], a [r, in], b [out, r], m [out]
        norm = dora_row_norm(w0, a, b, scale)  # [out]
        g = (m.float() / norm).to(x.dtype)  # [out]
        h = F.linear(x, a)  # [T, r]
        z = F.linear(x, w0)  # [T, out]
        z.addmm_(h, b.T, alpha=scale)
        keep_output = bias is None and not zero_rows  # a host flag: reading m here would sync every layer
        if keep_output:  # y = g ⊙ z in place: the output doubles as the saved tensor
            y = z.mul_(g)
        else:
            y = torch.addcmul(bias if bias is not None else torch.zeros_like(g), z, g)
        ctx.keep_output, ctx.scale = keep_output, scale
        ctx.save_for_backward(x, w0, a, b, m, h, g, norm, y if keep_output else z)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy [T, out]
        x, w0, a, b, m, h, g, norm, kept = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w0, need_bias, need_a, need_b, need_m, _, _ = ctx.needs_input_grad
        dz = dy * kept  # [T, out]; reused below for dL/dz
        dm = dz.sum(0).float()  # [out]
        if ctx.keep_output:  # dy⊙y/m = dy⊙z/‖·‖; a row whose m reached exactly 0 since gets no gradient
            dm = torch.where(m != 0, dm / m.float(), 0.0)
        else:
            dm = dm / norm
        torch.mul(dy, g, out=dz)  # dL/dz
        dx = dw0 = dbias = da = db = None
        dh = (dz @ b) * s  # [T, r]
        if need_x:
            dx = dz @ w0  # [T, in]
            dx.addmm_(dh, a)
        if need_w0:
            dw0 = dz.T @ x
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0)
        if need_a:
            da = dh.T @ x  # [r, in]
        if need_b:
            db = (dz.T @ h) * s  # [out, r]
        return dx, dw0, dbias, da, db, dm.to(m.dtype) if need_m else None, None, None


class DoraLinear(nn.Module):
    """A linear layer with a DoRA adapter, or with ``use_dora=False`` a plain LoRA one (``W0 + s·BA``, no
    magnitude). ``base_layer`` keeps the original module (peft's naming)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = True,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"DoRA rank must be >= 1, got {rank}")
        self.use_dora = use_dora
        self.base_layer = base
        w0 = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w0.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w0.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if use_dora:
            with torch.no_grad():
                mag = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32)  # [out]
            self.lora_magnitude_vector = nn.Parameter(mag)
        else:
            self.lora_magnitude_vector = None
        self.refresh_zero_rows()
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, float(alpha), float(dropout), use_rslora
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.merged = False
        self.disabled = False
        self._w0_stash: Tensor | None = None

    @torch.no_grad()
    def refresh_zero_rows(self) -> None:
        """Whether a row's magnitude is 0 (a zero row of W0, e.g. a pruned one): the fused forward then keeps
        ``z`` for the magnitude's gradient, which ``y = 0`` cannot give. Read once here (at creation and when
        an adapter is loaded), not per forward, where it would stop the GPU's queue at every layer."""
        m = self.lora_magnitude_vector
        self.zero_rows = m is not None and (m.device.type == "meta" or bool((m == 0).any()))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:  # what code expecting an nn.Linear reads (dtype, device, shape)
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return (
            f"{'dora' if self.use_dora else 'lora'}, rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, "
            f"dropout={self.dropout}, merged={self.merged}"
        )

    def merged_weight(self) -> Tensor:
        """W' (paper Eq. 5; LoRA: ``W0 + s·BA``), in W0's dtype: what merge_dora writes and the weight sync
        sends."""
        w0 = self._w0_stash if self.merged else self.base_layer.weight
        if not self.use_dora:
            return (w0.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(w0.dtype)
        return dora_merged_weight(w0, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        w0, bias = self.base_layer.weight, self.base_layer.bias
        if self.disabled:  # the base model: W0, which a merged layer keeps aside
            return F.linear(x, self._w0_stash if self.merged else w0, bias)
        if self.merged:
            return F.linear(x, w0, bias)
        if not self.use_dora:  # LoRA: base(x) + s·B·A·drop(x)
            xd = F.dropout(x, self.dropout, training=True) if self.dropout > 0 and self.training else x
            a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            return F.linear(x, w0, bias) + F.linear(F.linear(xd, a), b) * self.scale
        a, b, m = (p.to(x.dtype) for p in (self.lora_A, self.lora_B, self.lora_magnitude_vector))
        if self.dropout > 0 and self.training:
            return self._forward_dropout(x, w0, bias, a, b, m)
        lead = x.shape[:-1]
        y = _FusedDora.apply(x.reshape(-1, x.shape[-1]), w0, bias, a, b, m, self.scale, self.zero_rows)
        return y.reshape(*lead, y.shape[-1])

    def _forward_dropout(self, x, w0, bias, a, b, m):
        """peft's formula: ``base(x) + (g - 1)·W0·drop(x) + g·s·B·A·drop(x)``."""
        g = (m.float() / dora_row_norm(w0, a, b, self.scale)).to(x.dtype)  # [out]
        xd = F.dropout(x, self.dropout, training=True)
        return F.linear(x, w0, bias) + (g - 1) * F.linear(xd, w0) + g * (F.linear(F.linear(xd, a), b) * self.scale)


def _matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def dora_layers(model: nn.Module) -> Iterator[tuple[str, DoraLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, DoraLinear):
            yield name, mod


def apply_dora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = True,
) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name matches in place and freeze all other parameters
    (``use_dora=False``: plain LoRA adapters).

    ``target_modules`` follows peft: a list of names matches a module named exactly so or ending in
    ``.name``; a string is a regular expression matched against the full module name.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"DoRA dropout must be in [0, 1), got {dropout}")
    if any(True for _ in dora_layers(model)):
        raise ValueError("apply_dora: the model already has DoRA layers")
    names = [n for n, mod in model.named_modules() if n and _matches(n, target_modules)]
    linear = [n for n in names if type(model.get_submodule(n)) is nn.Linear]
    if not linear:
        others = sorted({type(model.get_submodule(n)).__name__ for n in names})
        raise ValueError(
            f"target_modules {target_modules!r}: no nn.Linear module matches"
            + (f" (matched only {others})" if others else "")
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in linear:
        parent, _, leaf = name.rpartition(".")
        layer = DoraLinear(model.get_submodule(name), rank, alpha, dropout, use_rslora, use_dora)
        setattr(model.get_submodule(parent), leaf, layer)
    model.gdpo_dora_config = {
        "use_dora": use_dora,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
    }
    return model


@torch.no_grad()
def merge_dora(model: nn.Module) -> nn.Module:
    """Write W' into every base weight (forward becomes a plain linear); W0 is kept for unmerge_dora."""
    for _, layer in dora_layers(model):
        if not layer.merged:
            w = layer.merged_weight()
            layer._w0_stash = layer.base_layer.weight.detach().clone()
            layer.base_layer.weight.copy_(w)
            layer.merged = True
    return model


@torch.no_grad()
def unmerge_dora(model: nn.Module) -> nn.Module:
    """Restore W0 exactly (bit for bit) in every merged layer."""
    for _, layer in dora_layers(model):
        if layer.merged:
            layer.base_layer.weight.copy_(layer._w0_stash)
            layer._w0_stash, layer.merged = None, False
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (the reference policy), without a second copy of it."""
    layers = [layer for _, layer in dora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under its original (HF) names with DoRA merged in; the model is unchanged."""
    out = {}
    layers = dict(dora_layers(model))
    for key, value in model.state_dict().items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if rest == "base_layer.weight":
            out[f"{owner}.weight"] = layers[owner].merged_weight()
        elif rest == "base_layer.bias":
            out[f"{owner}.bias"] = value
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """peft-layout tensors: ``base_model.model.<name>.lora_A.weight`` etc."""
    out = {}
    for name, layer in dora_layers(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
        if layer.use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    if not out:
        raise ValueError("the model has no DoRA layers (call apply_dora first)")
    return out


def peft_config(model: nn.Module) -> dict:
    """The adapter's ``adapter_config.json`` in peft's layout (what peft and vLLM read)."""
    cfg = dict(model.gdpo_dora_config)
    return {
        "peft_type": "LORA",
        "use_dora": cfg.get("use_dora", True),
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"],
        "use_rslora": cfg["use_rslora"],
        "target_modules": cfg["target_modules"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """adapter_config.json + adapter_model.safetensors that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(peft_config(model), indent=2, sort_keys=True) + "\n")


def read_adapter_config(path: Union[str, os.PathLike]) -> dict:
    """The adapter's config, checked for what this DoRA supports; errors name the file and the key."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    cfg = json.loads(file.read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} is not supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            problems.append(f"{key} is missing")
    if problems:
        raise ValueError(f"{file}: " + "; ".join(problems))
    return cfg


@torch.no_grad()
def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a DoRA (or plain LoRA) adapter in peft's layout; applies it first if the model has none."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    if not any(True for _ in dora_layers(model)):
        apply_dora(
            model,
            cfg["target_modules"],
            cfg["r"],
            cfg["lora_alpha"],
            cfg.get("lora_dropout", 0.0),
            cfg.get("use_rslora", False),
            bool(cfg.get("use_dora", False)),
        )
    kind = {layer.use_dora for _, layer in dora_layers(model)}
    if kind != {bool(cfg.get("use_dora", False))}:
        raise ValueError(
            f"{Path(path) / CONFIG_NAME}: a {'DoRA' if cfg.get('use_dora') else 'plain LoRA'} adapter, the model's "
            f"layers are {'DoRA' if True in kind else 'LoRA'}"
        )
    tensors = load_file(str(file))
    tensors = {
        k.replace(".lora_A.default.weight", ".lora_A.weight")
        .replace(".lora_B.default.weight", ".lora_B.weight")
        .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"): v
        for k, v in tensors.items()
    }
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file}: adapter does not fit the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise ValueError(
                f"{file}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(param.shape)}"
            )
        param.copy_(tensors[key])
    for _, layer in dora_layers(model):
        layer.refresh_zero_rows()
    return model
