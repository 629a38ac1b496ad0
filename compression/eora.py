"""EoRA: training-free compensation of a compressed layer in the eigenspace of its inputs
(Liu et al., 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", §3).

For a layer ``y = x Wᵀ`` compressed to ``W_c``, with ``ΔW = W - W_c`` [out, in] and the calibration
input covariance ``C = XᵀX/n = QΛQᵀ`` [in, in], the rank-r ``B A`` minimizing the layer-output error
``‖(ΔW - BA) Xᵀ‖_F`` is (Eq. 4-6): ``ΔW' = ΔW Q√Λ``, truncated SVD ``ΔW' ≈ U_r Σ_r V_rᵀ``, then
``B = U_r √Σ_r`` [out, r] and ``A = √Σ_r V_rᵀ √Λ⁻¹ Qᵀ`` [r, in] (the release splits √Σ between the two
factors, as here: the product is the paper's ``U_r Σ_r · V_rᵀ √Λ⁻¹ Qᵀ``, and the factors' magnitudes
are balanced, which is what 16-bit storage and factor quantization need). Because ``‖M Xᵀ‖² = n·‖M Q√Λ‖²``, this is
Eckart-Young in the projected space, hence optimal. Plain SVD (:func:`svd_compensation`) minimizes
``‖ΔW - BA‖`` instead and never does better on the output error.

Quantized activations (an extension, not in the paper): when the compressed layer reads ``Q(x)``
(W4A4), its error ``T = X Wᵀ - Q(X) W_cᵀ`` is not ``X ΔWᵀ``. The best rank-r ``BA`` on the full-precision
input then solves ``min ‖T - X (BA)ᵀ‖``, a reduced-rank regression: with the unconstrained solution
``ΔW_eff = W - W_c (Q(X)ᵀX/n) C⁻¹`` (:func:`activation_aware_delta`), ``‖T - X Mᵀ‖² = ‖T - X ΔW_effᵀ‖² +
n·tr((ΔW_eff - M) C (ΔW_eff - M)ᵀ)``, so EoRA applied to ``ΔW_eff`` is again optimal. With exact
activations ``ΔW_eff = ΔW``.

Deviations: eigenvalues are floored at ``eig_floor · λ_max`` (and the same floor appears in the
projection back), so directions the calibration data never excites neither blow up A nor get a share
of the rank; on a full-rank covariance with the floor below every eigenvalue the result is the exact
optimum. All linear algebra runs in float64; the factors come back in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from compression.intq import int_fake_quant_symmetric, minmax_symmetric_scale

__all__ = [
    "eora_compensation",
    "svd_compensation",
    "output_error",
    "quantize_factors",
    "input_covariance",
    "activation_aware_delta",
    "regression_error",
]


def _check(delta_w: Tensor, rank: int, cov: Optional[Tensor] = None) -> None:
    if delta_w.dim() != 2:
        raise ValueError(f"delta_w must be [out, in], got shape {tuple(delta_w.shape)}")
    if not 1 <= rank <= min(delta_w.shape):
        raise ValueError(f"rank must be in 1..{min(delta_w.shape)} for a {tuple(delta_w.shape)} layer, got {rank}")
    if cov is not None and cov.shape != (delta_w.shape[1], delta_w.shape[1]):
        raise ValueError(f"cov must be [in, in] = {(delta_w.shape[1],) * 2}, got {tuple(cov.shape)}")


def input_covariance(x: Tensor) -> Tensor:
    """``XᵀX / n`` in float64 for inputs ``x`` [n, in]."""
    x64 = x.double()
    return x64.T @ x64 / x64.shape[0]


def eora_compensation(delta_w: Tensor, cov: Tensor, rank: int, eig_floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``[out, in], [in, in] -> (B [out, r], A [r, in])`` minimizing ``tr((ΔW - BA) C (ΔW - BA)ᵀ)``."""
    _check(delta_w, rank, cov)
    c = cov.double()
    lam, q = torch.linalg.eigh((c + c.T) / 2)  # ascending eigenvalues, orthonormal columns
    lam = lam.clamp_min(eig_floor * float(lam.max().clamp_min(1e-300)))
    root = lam.sqrt()  # [in]
    projected = (delta_w.double() @ q) * root[None, :]  # [out, in] = ΔW Q √Λ
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    half = s[:rank].sqrt()
    b = u[:, :rank] * half[None, :]  # [out, r] = U_r √Σ_r
    a = half[:, None] * ((vh[:rank] / root[None, :]) @ q.T)  # [r, in] = √Σ_r V_rᵀ √Λ⁻¹ Qᵀ
    return b.float(), a.float()


def svd_compensation(delta_w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD of ΔW (the baseline EoRA is measured against): ``(B [out, r], A [r, in])``,
    √Σ split between them as for EoRA."""
    _check(delta_w, rank)
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    half = s[:rank].sqrt()
    return (u[:, :rank] * half[None, :]).float(), (half[:, None] * vh[:rank]).float()


def output_error(delta_w: Tensor, cov: Tensor, b: Optional[Tensor] = None, a: Optional[Tensor] = None) -> float:
    """``tr(M C Mᵀ)`` with ``M = ΔW - BA`` (= the mean squared layer-output error times ``out``)."""
    m = delta_w.double() - (b.double() @ a.double() if b is not None else 0.0)
    return float(((m @ cov.double()) * m).sum())


def quantize_factors(b: Tensor, a: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest INT quantization of the factors (per output row of B and of A)."""
    return (
        int_fake_quant_symmetric(b, bits, minmax_symmetric_scale(b, bits, 1)),
        int_fake_quant_symmetric(a, bits, minmax_symmetric_scale(a, bits, 1)),
    )


def _floored_inverse(cov: Tensor, eig_floor: float) -> Tensor:
    lam, q = torch.linalg.eigh((cov + cov.T) / 2)
    lam = lam.clamp_min(eig_floor * float(lam.max().clamp_min(1e-300)))
    return (q / lam[None, :]) @ q.T


def activation_aware_delta(w: Tensor, w_c: Tensor, x: Tensor, x_q: Tensor, eig_floor: float = 1e-6) -> Tensor:
    """``ΔW_eff = W - W_c (Q(X)ᵀX/n) C⁻¹`` [out, in]: the full-rank least-squares correction, read from
    the full-precision input ``x`` [n, in], of a layer that computes ``x_q W_cᵀ`` instead of ``x Wᵀ``."""
    x64, q64 = x.double(), x_q.double()
    n = x64.shape[0]
    cov = x64.T @ x64 / n
    cross = q64.T @ x64 / n  # [in, in] = Q(X)ᵀX/n
    return (w.double() - w_c.double() @ cross @ _floored_inverse(cov, eig_floor)).float()


def regression_error(
    w: Tensor, w_c: Tensor, x: Tensor, x_q: Tensor, b: Optional[Tensor] = None, a: Optional[Tensor] = None
) -> float:
    """``‖X Wᵀ - Q(X) W_cᵀ - X (BA)ᵀ‖² / n``: the compensated layer's output error on ``x`` [n, in]."""
    x64 = x.double()
    t = x64 @ w.double().T - x_q.double() @ w_c.double().T  # [n, out]
    if b is not None:
        t = t - (x64 @ a.double().T) @ b.double().T
    return float((t**2).sum() / x64.shape[0])
