"""Policy-gradient losses: clipped surrogate, KL to the reference, aggregation. Torch only.

Every aggregation takes its denominator as an argument (the global token or sequence count of the
whole step, across micro-batches and data-parallel ranks), so summing the micro-batch losses gives
exactly the full-batch loss and gradient, however the batch is split.

Deviations: none from the cited formulas; the DAPO-style asymmetric clip (eps_low / eps_high) reduces
to PPO's symmetric clip when both are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from gdpo.logprob_head import Sampling, process_logits

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

__all__ = ["LossOutput", "policy_loss", "aggregate", "kl_penalty", "entropy_from_logits", "token_logprobs"]


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


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: AggMode = "token-mean",
    global_tokens: Optional[float] = None,
    global_seqs: Optional[float] = None,
    max_len: Optional[int] = None,
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k3"] = "k3",
) -> LossOutput:
    """Clipped surrogate (PPO, Schulman et al. 2017, Eq. 7) with DAPO's decoupled clip range.

    ``-min(ρ·A, clip(ρ, 1-eps_low, 1+eps_high)·A) + kl_coef·KL`` per token, ρ = exp(logp - old_logp).
    logp, old_logp, ref_logp, mask: ``[N, T]``; advantages: ``[N]`` (broadcast over tokens).
    """
    adv = advantages.unsqueeze(-1).to(logp.dtype)  # [N, 1]
    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # [N, T]
    pg_tokens = -surrogate
    agg_kwargs = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len)
    pg_loss = aggregate(pg_tokens, mask, agg, **agg_kwargs)
    fmask = mask.to(logp.dtype)
    n_tok = fmask.sum().clamp(min=1)
    if ref_logp is not None and kl_coef > 0:
        kl_tokens = kl_penalty(logp, ref_logp, kl_estimator)  # [N, T]
        loss = pg_loss + kl_coef * aggregate(kl_tokens, mask, agg, **agg_kwargs)
        kl_metric = (kl_tokens.detach() * fmask).sum() / n_tok
    else:
        loss = pg_loss
        kl_metric = torch.zeros((), dtype=logp.dtype, device=logp.device)
    with torch.no_grad():
        was_clipped = (ratio * adv != torch.minimum(ratio * adv, clipped_ratio * adv)).to(logp.dtype)
        clip_fraction = (was_clipped * fmask).sum() / n_tok
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
