"""Per-layer search of formats and exponent biases (LLM-FP4, Liu et al. 2023, §3.2 and §4.2), and the
MinMax baselines, for one linear layer ``y = x Wᵀ`` given calibration inputs ``x`` [N, in].

Searched (method ``search``), alternating for ``rounds`` rounds:
1. activations: one format per layer and one real bias ρ per tensor, with per-input-channel biases
   ``b_c`` from calibration (Eq. 3 at each channel's max) and integer shifts
   ``s_c = clamp(round(b_c) - round(ρ), 0, 2^E - 1)`` (the pre-shifted exponent bias, §4.2);
2. weights: one format per layer and one real bias per output channel.
Each candidate is scored by the layer-output MSE ``‖Q(x) Q(W)ᵀ - x Wᵀ‖²`` on the calibration tokens.
Because ``Q_{ρ+s}(x) = 2^-s · Q_ρ(2^s x)`` exactly, the shifts move into the weights: the deployed
layer computes ``Q_ρ(x·2^s) · Q(W·2^-s)ᵀ``, one per-tensor FP x FP matmul (compression.fp4.qlinear).

Deviations from the reference release (nbasyl/LLM-FP4):
- The weights are quantized *after* the shift is folded into them (``Q(W·2^-s)``), and the weight
  search scores exactly that; the reference quantizes W unshifted and keeps ``2^-s`` in full precision
  on the activations, which a per-tensor FP4 kernel cannot run.
- Candidates scale the *maximum value* (``α · max|x|``, α on a grid over [lo, hi]), where the
  reference scales the bias itself (``α · b_init``), which is not invariant to the scale of x.
- Activation candidates use a coarser grid than weights by default (``act_points``) and are scored on
  a strided subset of the calibration tokens (``act_tokens``), to bound CPU time; each is scored with
  the weights re-quantized under its shifts, and shift-free candidates compete.
- Layers that read the same tensor (q/k/v, gate/up) share one activation quantizer and one weight
  format (compression.fp4.model searches them as one stacked matrix): one quantized activation feeds
  them all, and its shifts could move into the norm before them.
- The best solution over all rounds is kept (the reference keeps the last).
- The per-channel weight search scores candidates in Gram form (``AᵀA`` and ``AᵀE`` precomputed, E the
  activation error), so a candidate costs out·in² instead of N·in·out; the ranking is the same as the
  layer-output MSE's.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from compression.fp4.formats import FPFormat, bias_for_max, fake_quant, formats_for_bits
from compression.fp4.targets import SIM, Target
from compression.intq import (
    int_fake_quant_asymmetric,
    int_fake_quant_symmetric,
    minmax_asymmetric,
    minmax_symmetric_scale,
)

__all__ = [
    "METHODS",
    "QuantSetting",
    "SearchGrid",
    "LayerQuant",
    "quantize_weight",
    "quantize_input",
    "output_mse",
    "minmax_int",
    "minmax_fp",
    "search_fp",
    "quantize_layer",
    "search_embedding",
    "split_rows",
]

METHODS = ("minmax_int", "minmax_fp", "search", "search_pertensor")
_TINY = 1e-30


@dataclass(frozen=True)
class QuantSetting:
    w_bits: int  # weight bits: 4 or 8
    a_bits: Optional[int]  # activation bits: 4 or 8; None = weight-only

    @classmethod
    def parse(cls, text: str) -> "QuantSetting":
        """'w4a4', 'w4a8', 'w8a8', 'w4' / 'w4a16' (weight-only)."""
        s = text.strip().lower()
        try:
            if not s.startswith("w"):
                raise ValueError
            w, _, a = s[1:].partition("a")
            w_bits, a_bits = int(w), (int(a) if a else 16)
        except ValueError:
            raise ValueError(f"bits {text!r}: expected wXaY (e.g. w4a4, w4a8, w8a8) or wX for weight-only") from None
        for name, b in (("weight", w_bits), ("activation", a_bits)):
            if b not in (4, 8) and not (name == "activation" and b == 16):
                raise ValueError(
                    f"bits {text!r}: {name} bits must be 4 or 8"
                    + (" (or 16 for none)" if name == "activation" else "")
                    + f", got {b}"
                )
        return cls(w_bits, None if a_bits == 16 else a_bits)

    @property
    def name(self) -> str:
        return f"w{self.w_bits}" + (f"a{self.a_bits}" if self.a_bits else "a16")


@dataclass(frozen=True)
class SearchGrid:
    lo: float = 0.01  # smallest candidate max, as a fraction of the observed max
    hi: float = 1.2  # largest
    points: int = 100  # weight candidates per format
    act_points: int = 50  # activation candidates per format
    rounds: int = 3  # activation / weight alternations
    act_tokens: int = 1024  # calibration tokens the activation search scores on (all go to the weight search)

    def alphas(self, n: int) -> Tensor:
        return torch.linspace(self.lo, self.hi, n, dtype=torch.float64)


@dataclass
class LayerQuant:
    """How one linear layer is quantized; everything compression.fp4.qlinear.QuantLinear needs."""

    method: str
    w_bits: int
    w_fmt: Optional[FPFormat]  # None: integer weights
    w_param: Tensor  # [out] FP exponent bias per output channel, or INT scale per output channel
    w_alpha: Optional[Tensor] = None  # [out] FP: the chosen max as a fraction of the row's max (search state)
    a_bits: Optional[int] = None  # None: activations stay in full precision
    a_fmt: Optional[FPFormat] = None  # None with a_bits: integer activations
    a_bias: float = 0.0  # FP: tensor-wise bias ρ; INT: scale
    a_zero: float = 0.0  # INT: zero point
    a_shift: Optional[Tensor] = None  # [in] int: pre-shifted exponent per input channel (FP only)
    mse: dict = field(default_factory=dict)  # layer-output MSE: "start" (MinMax FP) and "final"

    def shift_or_zeros(self, in_features: int) -> Tensor:
        return self.a_shift if self.a_shift is not None else torch.zeros(in_features, dtype=torch.int32)


def quantize_weight(weight: Tensor, lq: LayerQuant) -> Tensor:
    """The dequantized deployed weight ``Q(W · 2^-s)`` [out, in] (the shift folded in)."""
    w = weight.float()
    if lq.a_shift is not None:
        w = w * torch.exp2(-lq.a_shift.float())[None, :]
    if lq.w_fmt is None:
        return int_fake_quant_symmetric(w, lq.w_bits, lq.w_param[:, None])
    return fake_quant(w, lq.w_fmt.e_bits, lq.w_fmt.m_bits, lq.w_param[:, None])


def quantize_input(x: Tensor, lq: LayerQuant, folded: bool = True) -> Tensor:
    """Quantized activations. folded: ``Q_ρ(x · 2^s)`` (what the deployed matmul reads);
    otherwise the simulated per-channel ``Q_{ρ+s}(x)`` (= folded · 2^-s exactly)."""
    if lq.a_bits is None:
        return x
    if lq.a_fmt is None:
        return int_fake_quant_asymmetric(x, lq.a_bits, lq.a_bias, lq.a_zero)
    e, m = lq.a_fmt.e_bits, lq.a_fmt.m_bits
    if lq.a_shift is None:
        return fake_quant(x, e, m, lq.a_bias)
    s = lq.a_shift.to(x.device).float()
    if folded:
        return fake_quant(x * torch.exp2(s).to(x.dtype), e, m, lq.a_bias)
    return fake_quant(x, e, m, lq.a_bias + s)


def output_mse(weight: Tensor, x: Tensor, lq: LayerQuant) -> float:
    """Mean squared error of the quantized layer's output against ``x Wᵀ`` (no bias)."""
    ref = x.float() @ weight.float().T
    out = quantize_input(x.float(), lq) @ quantize_weight(weight, lq).T
    return float(((out - ref) ** 2).mean())


def minmax_int(weight: Tensor, x: Tensor, setting: QuantSetting) -> LayerQuant:
    """MinMax INT baseline: symmetric per-output-channel weights, asymmetric per-tensor activations."""
    lq = LayerQuant("minmax_int", setting.w_bits, None, minmax_symmetric_scale(weight.float(), setting.w_bits, 1)[:, 0])
    if setting.a_bits:
        scale, zero = minmax_asymmetric(x, setting.a_bits)
        lq.a_bits, lq.a_bias, lq.a_zero = setting.a_bits, float(scale), float(zero)
    lq.mse = {"final": output_mse(weight, x, lq)}
    return lq


def _default_format(bits: int) -> FPFormat:
    return FPFormat(2, 1) if bits == 4 else FPFormat(4, 3)


def minmax_fp(weight: Tensor, x: Tensor, setting: QuantSetting, target: Target = SIM) -> LayerQuant:
    """MinMax FP baseline: E2M1 (E4M3 at 8 bits; the target's first format if it names them), bias from
    max|W| per output channel (snapped to what the target stores) and from max|x| per tensor; no search,
    no shifts."""
    w_fmt = target.w_formats[0] if target.w_formats else _default_format(setting.w_bits)
    lq = LayerQuant("minmax_fp", setting.w_bits, w_fmt, target.snap(bias_for_max(w_fmt, _row_max(weight.float()))))
    if setting.a_bits:
        a_fmt = _default_format(setting.a_bits)
        lq.a_bits, lq.a_fmt = setting.a_bits, a_fmt
        lq.a_bias = float(bias_for_max(a_fmt, x.abs().amax().float().clamp_min(_TINY)))
    lq.mse = {"final": output_mse(weight, x, lq)}
    return lq


def _row_max(w: Tensor) -> Tensor:
    return w.abs().amax(dim=1).clamp_min(_TINY)


def _search_weight(w_t: Tensor, a: Tensor, x_t: Tensor, fmts, grid: SearchGrid, target: Target = SIM):
    """Best (format, per-channel bias) for weights ``w_t`` [out, in] (shift already folded) reading the
    quantized activations ``a`` [N, in], against the reference ``x_t w_tᵀ``; each candidate bias is
    snapped to the target's stored scales before it is scored. Returns (format, bias [out], max fraction
    [out], summed relative error).

    With d = q - w and E = A - X̃: ‖A q - X̃ w‖² = dᵀ(AᵀA)d + 2 dᵀ(AᵀE)w + ‖E w‖²; the last term is the
    same for every candidate and format, so it is left out of the returned (relative) error.
    """
    gram = a.T @ a  # [in, in]
    cross = w_t @ (a.T @ (a - x_t)).T  # [out, in]: row j = (Aᵀ E) w_j
    row_max = _row_max(w_t)
    best = None
    for fmt in fmts:
        err_best = torch.full((w_t.shape[0],), float("inf"))
        bias_best, alpha_best = torch.zeros(w_t.shape[0]), torch.zeros(w_t.shape[0])
        for alpha in grid.alphas(grid.points):
            bias = target.snap(bias_for_max(fmt, row_max * float(alpha)))  # [out]
            d = fake_quant(w_t, fmt.e_bits, fmt.m_bits, bias[:, None]) - w_t  # [out, in]
            err = ((d @ gram) * d).sum(1) + 2 * (d * cross).sum(1)  # [out]
            better = err < err_best
            err_best = torch.where(better, err, err_best)
            bias_best = torch.where(better, bias, bias_best)
            alpha_best = torch.where(better, torch.full_like(alpha_best, float(alpha)), alpha_best)
        total = float(err_best.double().sum())
        if best is None or total < best[3]:
            best = (fmt, bias_best, alpha_best, total)
    return best


def _search_act(
    x: Tensor,
    w: Tensor,
    ref: Tensor,
    lq: LayerQuant,
    fmts,
    grid: SearchGrid,
    per_channel: bool,
    target: Target = SIM,
):
    """Best (format, ρ, shifts) for the activations, scored with the weights re-quantized after each
    candidate's shifts are folded in (the current weight format and per-row max fractions kept).
    With ``per_channel``, shift-free candidates compete too, so a layer whose weights suffer more from
    the fold than its activations gain keeps s = 0."""
    chan_max = x.abs().amax(dim=0).clamp_min(_TINY)  # [in], over every calibration token
    tensor_max = chan_max.max()
    if x.shape[0] > grid.act_tokens:
        rows = torch.linspace(0, x.shape[0] - 1, grid.act_tokens).long()
        x, ref = x[rows], ref[rows]
    folded_weights: dict = {}

    def weights_for(shift: Optional[Tensor]) -> Tensor:
        key = None if shift is None else tuple(shift.tolist())
        if key not in folded_weights:
            w_t = w if shift is None else w * torch.exp2(-shift.float())[None, :]
            bias = target.snap(bias_for_max(lq.w_fmt, lq.w_alpha * _row_max(w_t)))
            folded_weights[key] = fake_quant(w_t, lq.w_fmt.e_bits, lq.w_fmt.m_bits, bias[:, None])
        return folded_weights[key]

    best = None
    for fmt in fmts:
        b_c = bias_for_max(fmt, chan_max)  # [in]
        for alpha in grid.alphas(grid.act_points):
            rho = float(bias_for_max(fmt, tensor_max * float(alpha)))
            shifts = [None]
            if per_channel:
                shifts.insert(0, torch.clamp(torch.round(b_c) - round(rho), 0, 2**fmt.e_bits - 1).to(torch.int32))
            for shift in shifts:
                x_t = x if shift is None else x * torch.exp2(shift.float())[None, :]
                a = fake_quant(x_t, fmt.e_bits, fmt.m_bits, rho)
                err = float(((a @ weights_for(shift).T - ref) ** 2).sum())
                if best is None or err < best[3]:
                    best = (fmt, rho, shift, err)
    return best


def search_fp(
    weight: Tensor,
    x: Tensor,
    setting: QuantSetting,
    grid: SearchGrid = SearchGrid(),
    per_channel_act: bool = True,
    target: Target = SIM,
) -> LayerQuant:
    """LLM-FP4's search (see the module docstring), started from the MinMax FP solution. The best
    solution seen (by calibration output MSE) is returned, so it never loses to MinMax FP there.
    ``target`` limits the weight formats and per-row scales to what it stores (compression.fp4.targets)."""
    w, x = weight.float(), x.float()
    lq = minmax_fp(w, x, setting, target)
    lq.method = "search" if per_channel_act or not setting.a_bits else "search_pertensor"
    lq.w_alpha = torch.ones(w.shape[0])
    start = lq.mse["final"]
    best, best_mse = copy.deepcopy(lq), start
    ref = x @ w.T  # [N, out]
    w_fmts = target.w_formats or formats_for_bits(setting.w_bits)
    a_fmts = formats_for_bits(setting.a_bits) if setting.a_bits else ()
    for _ in range(grid.rounds if setting.a_bits else 1):
        if setting.a_bits:
            lq.a_fmt, lq.a_bias, lq.a_shift, _ = _search_act(x, w, ref, lq, a_fmts, grid, per_channel_act, target)
        a = quantize_input(x, lq, folded=True)
        x_t = x * torch.exp2(lq.a_shift.float())[None, :] if lq.a_shift is not None else x
        w_t = w * torch.exp2(-lq.a_shift.float())[None, :] if lq.a_shift is not None else w
        lq.w_fmt, lq.w_param, lq.w_alpha, _ = _search_weight(w_t, a, x_t, w_fmts, grid, target)
        mse = output_mse(w, x, lq)
        if mse < best_mse:
            best, best_mse = copy.deepcopy(lq), mse
    best.mse = {"start": start, "final": best_mse}
    return best


def quantize_layer(
    weight: Tensor,
    x: Tensor,
    setting: QuantSetting,
    method: str,
    grid: SearchGrid = SearchGrid(),
    target: Target = SIM,
) -> LayerQuant:
    """One layer's quantization by ``method`` (see METHODS); ``target`` constrains the FP methods."""
    if method == "minmax_int":
        return minmax_int(weight, x, setting)
    if method == "minmax_fp":
        return minmax_fp(weight, x, setting, target)
    if method in ("search", "search_pertensor"):
        return search_fp(weight, x, setting, grid, per_channel_act=(method == "search"), target=target)
    raise ValueError(f"quantization method {method!r}: expected one of {', '.join(METHODS)}")


def split_rows(lq: LayerQuant, sizes: list[int]) -> list[LayerQuant]:
    """Split a LayerQuant found for row-stacked weights into one per part (per-row parameters split,
    the activation quantizer and formats shared)."""
    return [
        dataclasses.replace(
            lq,
            w_param=part.clone(),
            w_alpha=None if lq.w_alpha is None else a.clone(),
            a_shift=None if lq.a_shift is None else lq.a_shift.clone(),
            mse=dict(lq.mse),
        )
        for part, a in zip(lq.w_param.split(sizes), (lq.w_alpha if lq.w_alpha is not None else lq.w_param).split(sizes))
    ]


def search_embedding(weight: Tensor, bits: int, grid: SearchGrid = SearchGrid()) -> tuple[FPFormat, Tensor]:
    """Weight-only FP quantization of an embedding table (the reference's choice): one bias per row
    (token), one format for the table, minimizing the reconstruction MSE ``‖Q(E) - E‖²``."""
    w = weight.float()
    row_max = _row_max(w)
    best = None
    for fmt in formats_for_bits(bits):
        err_best = torch.full((w.shape[0],), float("inf"))
        bias_best = torch.zeros(w.shape[0])
        for alpha in grid.alphas(grid.points):
            bias = bias_for_max(fmt, row_max * float(alpha))
            err = ((fake_quant(w, fmt.e_bits, fmt.m_bits, bias[:, None]) - w) ** 2).sum(1)
            better = err < err_best
            err_best, bias_best = torch.where(better, err, err_best), torch.where(better, bias, bias_best)
        if best is None or float(err_best.sum()) < best[2]:
            best = (fmt, bias_best, float(err_best.sum()))
    return best[0], best[1]
