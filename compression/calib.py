"""Calibration plumbing shared by the compression methods: which linear layers to touch, in what order,
and what each one reads.

Layers are processed block by block (``...layers.N.``, in module order; anything outside a block,
e.g. ``lm_head``, last), and each block's inputs are captured with the blocks before it already
compressed, so a layer is calibrated on what it will read at inference. Only real tokens are kept
(padding dropped), at most ``max_tokens`` rows per layer (an evenly strided subset).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CalibrationError",
    "target_linears",
    "block_groups",
    "count_tokens",
    "capture_inputs",
    "set_module",
    "MIN_CALIB_TOKENS",
]

MIN_CALIB_TOKENS = 256  # below this a per-tensor max (and so an exponent bias) is a guess


class CalibrationError(ValueError):
    """Bad compression input; the message names the flag, layer or sample."""


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def target_linears(model: nn.Module, targets: Optional[Sequence[str]] = None, lm_head: bool = False) -> list[str]:
    """Names of the nn.Linear modules to compress, in module order: those whose name equals or ends
    with ``.t`` for a t in ``targets`` (every linear when None); the output head only with ``lm_head``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if mod is head and not lm_head:
            continue
        if targets is None or _matches(name, targets) or (mod is head and lm_head):
            names.append(name)
    if not names:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise CalibrationError(
            f"no linear layer matches the targets {list(targets) if targets else 'all'} "
            f"(the model's linear layers: {', '.join(have) or 'none'})"
        )
    return names


_BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")


def block_groups(names: Sequence[str]) -> list[list[str]]:
    """Group layer names by transformer block, keeping order; names outside blocks come last, one group each."""
    groups: dict[str, list[str]] = {}
    loose = []
    for n in names:
        m = _BLOCK.match(n)
        if m:
            groups.setdefault(m.group(1), []).append(n)
        else:
            loose.append([n])
    return list(groups.values()) + loose


def count_tokens(batches: Sequence[dict]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def capture_inputs(
    model: nn.Module, names: Sequence[str], batches: Sequence[dict], max_tokens: int = 4096
) -> dict[str, Tensor]:
    """Run the calibration batches; return each named module's input over real tokens, ``[N, in]`` float32."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    mask_now: list[Tensor] = []

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            store[name].append(x[mask_now[0].bool()].float().cpu())  # [tokens, in]

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for b in batches:
            mask_now[:] = [b["attention_mask"]]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, parts in store.items():
        x = torch.cat(parts)
        if x.shape[0] > max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
        out[n] = x
    return out
