"""Policy-gradient losses: clipped surrogates (PPO, GSPO, CISPO), rollout correction, KL to the
reference, aggregation. Torch only.

Every aggregation takes its denominator as an argument (the global token or sequence count of the
whole step, across micro-batches and data-parallel ranks), so summing the micro-batch losses gives
exactly the full-batch loss and gradient, however the batch is split.

Three policies meet in an update (verl's "decoupled" formulation, Hilton et al. 2022 "Batch size-invariance
for policy optimization"): the sampler π_s that generated the tokens (the rollout engine: another
kernel, another precision, possibly an older version), the proximal policy π_old (the learner before
this update: the anchor of the clipped ratio ρ = π_θ / π_old) and the policy being trained π_θ. The
rollout correction weighs each token's loss by w = π_old / π_s (:func:`rollout_correction`).

Deviations: none from the cited formulas; the DAPO-style asymmetric clip (eps_low / eps_high) reduces
to PPO's symmetric clip when both are equal. Tokens that MIS masks keep their place in the loss's
denominator (it is global and fixed before the update); verl drops them from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from gdpo.logprob_head import Sampling, process_logits

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LossType = Literal["ppo_clip", "gspo", "cispo"]
CorrectionMode = Literal["none", "tis", "mis"]
CorrectionLevel = Literal["token", "sequence", "geometric"]

__all__ = [
    "LossOutput",
    "Correction",
    "policy_loss",
    "rollout_correction",
    "aggregate",
    "kl_penalty",
    "entropy_from_logits",
    "token_logprobs",
]

LOG_RATIO_BOUND = 20.0  # |log w| is bounded before exp (verl's safety bound): a long sequence cannot overflow


@dataclass
class LossOutput:
    loss: Tensor  # [] this micro-batch's share of the global loss; backprop this
    pg_loss: Tensor  # [] policy-gradient part (same denominator)
    kl: Tensor  # [] mean KL per token in this micro-batch (metric)
    clip_fraction: Tensor  # [] fraction of tokens whose ratio was clipped (metric)
    ratio_mean: Tensor  # [] mean importance ratio over tokens (metric)


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: AggMode,
    *,
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
    max_len: Optional[int] = None,
) -> Tensor:
    """Reduce per-token values ``[N, T]`` to this micro-batch's share of the global loss ``[]``.

    - "token-mean": ``Σ values·mask / global_tokens`` (DAPO, Yu et al. 2025, Eq. 12).
    - "seq-mean-token-mean": ``Σ_i (Σ_t values_it / |o_i|) / global_seqs`` (GRPO, Shao et al. 2024, Eq. 3).
    - "seq-mean-token-sum-norm": ``Σ_i Σ_t values_it / (max_len · global_seqs)`` (Dr. GRPO, Liu et al. 2025).
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        if global_tokens is None:
            raise ValueError("token-mean needs global_tokens (the step's token count over all micro-batches)")
        return (values * mask).sum() / global_tokens
    if global_seqs is None:
        raise ValueError(f"{mode} needs global_seqs (the step's sequence count over all micro-batches)")
    per_seq_sum = (values * mask).sum(-1)  # [N]
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / mask.sum(-1).clamp(min=1)).sum() / global_seqs
    if mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the generation limit in tokens)")
        return per_seq_sum.sum() / (max_len * global_seqs)
    raise ValueError(f"unknown aggregation mode {mode!r}")


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL").

    k1 = log π - log π_ref (unbiased, high variance); k3 = exp(-k1) + k1 - 1 (unbiased, >= 0). ``[N, T]``.
    """
    log_ratio = logp - ref_logp  # [N, T]
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r} (allowed: 'k1', 'k3')")


@dataclass
class Correction:
    """Rollout-correction weights of one micro-batch and their metrics (sums over its masked tokens)."""

    weights: Tensor  # [N, T] w multiplying each token's loss, detached; 0 where masked (MIS) or off-mask
    mismatch_kl: Tensor  # [] Σ k3(π_s, π_old) over tokens: KL(π_s ‖ π_old) x tokens
    weight_sum: Tensor  # [] Σ w applied
    weight_max: Tensor  # [] max w before the cap
    capped: Tensor  # [] tokens whose w passed the cap (TIS: truncated; MIS: masked)


def rollout_correction(
    proximal_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    mode: CorrectionMode = "tis",
    level: CorrectionLevel = "token",
    cap: float = 2.0,
) -> Correction:
    """Importance weights from the sampler π_s to the proximal policy π_old, ``[N, T]`` each.

    Per token ``log r_t = log π_old(y_t) - log π_s(y_t)`` (bounded to ±``LOG_RATIO_BOUND``), then by
    ``level``: "token" w_t = r_t; "sequence" w = Π_t r_t (one weight per sequence); "geometric"
    w = (Π_t r_t)^(1/|y|). By ``mode``: "tis" truncates, w <- min(w, cap) (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training", TIS); "mis" masks, w <- 0
    outside [1/cap, cap] (masked importance sampling; IcePop's two-sided band; verl's rejection sampling);
    "none" gives w = 1 and the metrics only. The mismatch metric is the k3 estimator of
    KL(π_s ‖ π_old) on the sampler's tokens: ``r - 1 - log r``.
    """
    if cap <= 1.0 and mode != "none":
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    fmask = mask.to(proximal_logp.dtype)
    log_r = ((proximal_logp - sampler_logp) * fmask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # [N, T]
    mismatch = ((log_r.exp() - 1 - log_r) * fmask).sum()
    if level == "token":
        log_w = log_r
    elif level in ("sequence", "geometric"):
        seq = log_r.sum(-1, keepdim=True)  # [N, 1]
        if level == "geometric":
            seq = seq / fmask.sum(-1, keepdim=True).clamp(min=1)
        log_w = seq.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).expand_as(log_r)
    else:
        raise ValueError(f"unknown rollout correction level {level!r} (allowed: token, sequence, geometric)")
    raw = log_w.exp() * fmask  # [N, T]
    if mode == "none":
        weights, capped = fmask, torch.zeros((), dtype=raw.dtype, device=raw.device)
    elif mode == "tis":
        weights, capped = raw.clamp(max=cap), ((raw > cap).to(raw.dtype) * fmask).sum()
    elif mode == "mis":
        outside = ((raw > cap) | (raw < 1.0 / cap)).to(raw.dtype) * fmask
        weights, capped = raw * (1 - outside), outside.sum()
    else:
        raise ValueError(f"unknown rollout correction mode {mode!r} (allowed: none, tis, mis)")
    weights = weights.detach()
    return Correction(
        weights=weights,
        mismatch_kl=mismatch.detach(),
        weight_sum=(weights * fmask).sum(),
        weight_max=raw.detach().max() if raw.numel() else raw.new_zeros(()),
        capped=capped.detach(),
    )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: LossType = "ppo_clip",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: AggMode = "token-mean",
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
    max_len: Optional[int] = None,
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k3"] = "k3",
    weights: Optional[Tensor] = None,
) -> LossOutput:
    """The policy-gradient loss of one micro-batch; logp, old_logp, ref_logp, mask, weights: ``[N, T]``;
    advantages: ``[N]`` (broadcast over tokens). Per token, before aggregation, by ``loss_type``:

    - "ppo_clip": ``-min(ρ·A, clip(ρ, 1-eps_low, 1+eps_high)·A)``, ρ = exp(logp - old_logp) (PPO,
      Schulman et al. 2017, Eq. 7; DAPO's decoupled clip range).
    - "gspo": the same with the sequence ratio s_i = exp(mean_t (logp - old_logp)) (GSPO, Zheng et al.
      2025, Eq. 5-7), clipped per sequence; in its token form (Eq. 13) s_i,t = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)],
      whose value is s_i and whose gradient is s_i·∇log π_θ(y_t), so "seq-mean-token-mean" aggregation
      gives the paper's (1/G) Σ_i (1/|y_i|) Σ_t s_i A_i ∇log π_θ(y_i,t) exactly.
    - "cispo": ``-sg(clip(ρ, 1-eps_low, 1+eps_high))·A·logp`` (CISPO, MiniMax-M1 2025, Eq. 4): the
      clipped importance weight, detached, and every token keeps its gradient.

    then times ``weights`` (the rollout correction, :func:`rollout_correction`) and aggregated, plus
    ``kl_coef·KL`` to the reference.
    """
    adv = advantages.unsqueeze(-1).to(logp.dtype)  # [N, 1]
    fmask = mask.to(logp.dtype)
    log_ratio = logp - old_logp  # [N, T]
    if loss_type == "gspo":
        seq_log_ratio = (log_ratio * fmask).sum(-1, keepdim=True) / fmask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq_log_ratio.detach() + logp - logp.detach()  # value: the sequence's; gradient: the token's
    ratio = torch.exp(log_ratio)  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    if loss_type in ("ppo_clip", "gspo"):
        surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # [N, T]
        was_clipped = ratio * adv != surrogate
    elif loss_type == "cispo":
        surrogate = clipped_ratio.detach() * adv * logp
        was_clipped = ratio != clipped_ratio
    else:
        raise ValueError(f"unknown policy loss {loss_type!r} (allowed: ppo_clip, gspo, cispo)")
    pg_tokens = -surrogate if weights is None else -surrogate * weights
    agg_kwargs = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len)
    pg_loss = aggregate(pg_tokens, mask, agg, **agg_kwargs)
    n_tok = fmask.sum().clamp(min=1)
    if ref_logp is not None and kl_coef > 0:
        kl_tokens = kl_penalty(logp, ref_logp, kl_estimator)  # [N, T]
        loss = pg_loss + kl_coef * aggregate(kl_tokens, mask, agg, **agg_kwargs)
        kl_metric = (kl_tokens.detach() * fmask).sum() / n_tok
    else:
        loss = pg_loss
        kl_metric = torch.zeros((), dtype=logp.dtype, device=logp.device)
    with torch.no_grad():
        clip_fraction = (was_clipped.to(logp.dtype) * fmask).sum() / n_tok
        ratio_mean = (ratio * fmask).sum() / n_tok
    return LossOutput(
        loss=loss, pg_loss=pg_loss.detach(), kl=kl_metric, clip_fraction=clip_fraction, ratio_mean=ratio_mean
    )


def processed(logits: Tensor, tokens: Tensor, sampling: Optional[Sampling]) -> Tensor:
    """``[N, T, V]`` logits in fp32, processed as the sampler processed them (``gdpo.logprob_head``:
    temperature, top-p; each position's token kept); a copy, the input is left as it is."""
    z = logits.float()
    if sampling is None or sampling.raw:
        return z
    z = z.clone() if z is logits else z
    flat = z.view(-1, z.shape[-1])
    process_logits(flat, tokens.reshape(-1), sampling)
    return z


def token_logprobs(logits: Tensor, tokens: Tensor, sampling: Optional[Sampling] = None) -> Tensor:
    """Log-probability of each token under the logits that predict it: ``[N, T, V], [N, T] -> [N, T]``;
    under the ``sampling``-processed distribution when given."""
    logp = torch.log_softmax(processed(logits, tokens, sampling), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, tokens: Optional[Tensor] = None, sampling: Optional[Sampling] = None) -> Tensor:
    """Per-token entropy of the policy (of its ``sampling``-processed distribution when given, ``tokens``
    the scored ones the nucleus keeps), a metric: ``[N, T, V] -> [N, T]``."""
    z = logits.float() if sampling is None else processed(logits, tokens, sampling)
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
