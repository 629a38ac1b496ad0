"""Learner: the policy with DoRA adapters inside a DeepSpeed engine; log-probs, GDPO updates, merged weights.

Plain functions over (engine, model); ``actors/learner.py`` only holds them. Loss denominators are
global (all micro-batches on all ranks), and DeepSpeed averages gradients over ranks, so each rank
scales its share by the world size: the update equals one large-batch step on one learner.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from gdpo.config import Config
from gdpo import dora
from gdpo.losses import entropy_from_logits, policy_loss, token_logprobs
from gdpo.records import TrainBatch, WeightUpdate

# vLLM loads these projections as one stacked tensor; they must be published together
STACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def build_policy(model_path: str, cfg: Config):
    """HF model + the project's DoRA adapters on ``learner.target_modules``; only adapter weights train."""
    from gdpo.policy import load_policy

    model, tokenizer = load_policy(model_path, cfg.model.dtype, cfg.model.trust_remote_code)
    try:
        # A's initialization is seeded from trainer.seed: without it two runs of one config (or a run and its
        # resumed twin's first run) start from different adapters, and every step after differs
        with torch.random.fork_rng():
            torch.manual_seed(cfg.trainer.seed)
            dora.apply_dora(model, list(cfg.learner.target_modules), cfg.learner.dora_rank, cfg.learner.dora_alpha,
                            cfg.learner.dora_dropout)
    except ValueError as e:
        raise ValueError(f"config key 'learner.target_modules' on {model_path}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def make_engine(model, cfg: Config):
    import deepspeed

    if cfg.learner.zero_stage == 3:
        # the fused DoRA forward reads its base weight: gather it with the layer
        deepspeed.utils.set_z3_leaf_modules(model, [dora.DoraLinear])
        # ZeRO-3 re-gathers a module's weights from a backward hook on its inputs; with a frozen embedding
        # the first layers' inputs need no grad, the hook never fires and their norms see empty weights
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay, betas=(0.9, 0.999))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.learner.micro_batch_per_worker,
        "gradient_accumulation_steps": 1,  # boundaries are set by hand in train_step
        "gradient_clipping": cfg.learner.grad_clip,
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine


def lr_factor(cfg: Config):
    """Multiplier of learner.lr at optimizer step s: linear warm-up, then constant or cosine decay."""
    total = cfg.trainer.steps * cfg.learner.updates_per_step
    warm, floor = cfg.learner.lr_warmup_steps, cfg.learner.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.learner.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _micro_slices(n: int, micro: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + micro)) for lo in range(0, n, micro)]


@torch.no_grad()
def sequence_logprobs(model, batch: TrainBatch, micro: int, adapters: bool = True) -> torch.Tensor:
    """Log-prob of token t+1 at position t: ``[N, L-1]`` (reference = adapters disabled, no model copy)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo, hi in _micro_slices(len(batch), micro):
            ids, att = batch.input_ids[lo:hi], batch.attention_mask[lo:hi]
            if adapters:
                logits = model(input_ids=ids, attention_mask=att).logits
            else:
                with dora.adapters_disabled(model):
                    logits = model(input_ids=ids, attention_mask=att).logits
            out.append(token_logprobs(logits[:, :-1], ids[:, 1:]))
    finally:
        model.train(was_training)
    return torch.cat(out)


def train_step(engine, batch: TrainBatch, cfg: Config, *, global_tokens: float, global_seqs: float,
               world_size: int) -> dict[str, float]:
    """One optimizer step on this rank's share of the batch; returns this rank's metric sums."""
    alg = cfg.algorithm
    slices = _micro_slices(len(batch), cfg.learner.micro_batch_per_worker)
    sums = {"loss": 0.0, "pg_loss": 0.0, "kl_tokens": 0.0, "clipped_tokens": 0.0, "entropy_tokens": 0.0,
            "tokens": 0.0, "forward_tokens": 0.0, "drift_tokens": 0.0}
    engine.train()
    for i, (lo, hi) in enumerate(slices):
        mb = batch.slice(lo, hi)
        engine.set_gradient_accumulation_boundary(i == len(slices) - 1)
        logits = engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]  # [n, L-1, V]
        logp = token_logprobs(logits, mb.input_ids[:, 1:])  # [n, L-1]
        mask = mb.loss_mask[:, 1:]  # [n, L-1]
        out = policy_loss(logp, behaviour_logprobs(mb, logp, cfg), mb.advantages, mask, eps_low=alg.clip_eps_low,
                          eps_high=alg.clip_eps_high, agg=alg.loss_agg, global_tokens=global_tokens,
                          global_seqs=global_seqs, max_len=cfg.rollout.max_new_tokens, ref_logp=mb.ref_logprobs,
                          kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator)
        engine.backward(out.loss * world_size, scale_wrt_gas=False)
        n_tok = mask.sum().item()
        with torch.no_grad():
            ent = (entropy_from_logits(logits.detach()) * mask).sum().item()
        sums["loss"] += out.loss.item()
        sums["pg_loss"] += out.pg_loss.item()
        sums["kl_tokens"] += out.kl.item() * n_tok
        sums["clipped_tokens"] += out.clip_fraction.item() * n_tok
        sums["entropy_tokens"] += ent
        sums["tokens"] += n_tok
        sums["forward_tokens"] += mb.attention_mask.sum().item()
        if mb.sampling_logprobs is not None:  # how far the learner's policy is from the one that sampled
            sums["drift_tokens"] += ((logp.detach() - mb.sampling_logprobs).abs() * mask).sum().item()
    engine.step()
    sums["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
    return sums


def sync_module_names(model, target_modules: tuple[str, ...]) -> list[str]:
    """HF names of the linear modules whose weights a sync must send: adapted ones and their stack mates."""
    wanted = set(target_modules)
    for group in STACKED:
        if wanted & set(group):
            wanted |= set(group)
    # by module type, not weight shape: ZeRO-3 leaves each rank a flat [0] placeholder
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in wanted
            and isinstance(m, (torch.nn.Linear, dora.DoraLinear))]


@torch.no_grad()
def merged_weights(model, module_names: list[str]) -> dict[str, torch.Tensor]:
    """Checkpoint-format ``{name.weight: W'}`` of the given modules, DoRA merged as merge_dora does."""
    return {key: make().clone() for key, _, _, make in _sync_tensors(model, module_names)}


def _sync_tensors(model, module_names: list[str]):
    """``(key, shape, dtype, make)`` per tensor a sync sends; ``make()`` computes that one tensor when called."""
    out = []
    for name in module_names:
        mod = model.get_submodule(name)
        base = getattr(mod, "base_layer", mod)
        make = (lambda m=mod: m.merged_weight()) if isinstance(mod, dora.DoraLinear) else (lambda b=base: b.weight)
        out.append((f"{name}.weight", tuple(base.weight.shape), base.weight.dtype, make))
        if base.bias is not None:  # unchanged, but vLLM reloads a stacked module whole
            out.append((f"{name}.bias", tuple(base.bias.shape), base.bias.dtype, lambda b=base: b.bias))
    return out


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@torch.no_grad()
def write_merged_weights(model, module_names: list[str], path: str, metadata: dict[str, str],
                         bucket_bytes: int) -> tuple[str, int]:
    """Stream the merged weights into a safetensors file; returns (sha256 of the file, bytes written).

    The header is known from the shapes, so each layer's merged weight is computed, copied into one
    reused bucket of ``bucket_bytes`` and written when the bucket fills: the learner never holds more
    than one bucket and one layer's merged weight besides the model (no state-dict copy). The hash is
    taken on the bytes as they are written, so the file is not read back.
    """
    specs = _sync_tensors(model, module_names)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype, _ in specs:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    sha = hashlib.sha256()
    bucket = torch.empty(max(1, bucket_bytes), dtype=torch.uint8)
    fill = 0
    with open(path, "wb") as f:
        def emit(buf) -> None:
            sha.update(buf)
            f.write(buf)

        emit(len(head).to_bytes(8, "little") + head)
        for key, shape, dtype, make in specs:
            raw = make().detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
            if fill + raw.numel() > bucket.numel() and fill:
                emit(bucket[:fill].numpy())
                fill = 0
            if raw.numel() > bucket.numel():  # a tensor larger than a bucket goes out on its own
                emit(raw.numpy())
                continue
            bucket[fill:fill + raw.numel()] = raw
            fill += raw.numel()
        if fill:
            emit(bucket[:fill].numpy())
    return sha.hexdigest(), len(head) + 8 + offset


def publish_weights(model, module_names: list[str], version: int, directory: str, rank: int = 0,
                    zero_stage: int = 2, bucket_mb: int = 32) -> WeightUpdate | None:
    """Rank 0 streams the merged weights to ``directory/policy-v{version}.safetensors`` atomically.

    Every rank must call it (under ZeRO-3 gathering the parameters is collective); others return None.
    """
    os.makedirs(directory, exist_ok=True)
    final = Path(directory) / f"policy-v{version}.safetensors"
    tmp = final.with_suffix(".tmp")
    with gathered(model, zero_stage):
        if rank != 0:
            return None
        digest, size = write_merged_weights(model, module_names, str(tmp), {"policy_version": str(version)},
                                            bucket_mb << 20)
    os.replace(tmp, final)
    for old in Path(directory).glob("policy-v*.safetensors"):
        if old != final:
            old.unlink(missing_ok=True)
    return WeightUpdate(path=str(final), version=version, checksum=digest, num_bytes=size,
                        names=[key for key, *_ in _sync_tensors(model, module_names)])


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors, for cross-rank equality checks and checkpoints."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checksum_params(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(adapter_state(model).items()):
        h.update(n.encode())
        h.update(p.float().numpy().tobytes())
    return h.hexdigest()


def set_cpu_threads(cfg: Config) -> int:
    """Torch threads for this learner on CPU (``learner.cpu_threads``; 0 = cores / learners); returns them."""
    if not torch.cuda.is_available():
        n = cfg.learner.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.learner.num_workers)
        torch.set_num_threads(n)
    return torch.get_num_threads()


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: Optional[str] = None) -> None:
    """Set the torch.distributed environment and initialize it (gloo on CPU, nccl on GPU)."""
    import deepspeed

    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0" if not torch.cuda.is_available() else str(rank % max(1, torch.cuda.device_count()))})
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)



def needs_old_logprobs(cfg: Config) -> bool:
    """Whether the update needs a separate pass for the pre-update log-probs of the importance ratio.

    Only when a batch is split into several optimizer steps on-policy: later mini-batches meet moved
    weights. With one step, the training forward's own log-probs (detached) are exactly the pre-update
    ones; with ``rollout_ahead`` the batch comes from the previous version and the sampler's log-probs
    are the behaviour policy's.
    """
    return cfg.learner.updates_per_step > 1 and cfg.trainer.rollout_ahead == 0


def needs_logprob_pass(cfg: Config) -> bool:
    return needs_old_logprobs(cfg) or cfg.algorithm.kl_coef > 0


def behaviour_logprobs(mb: TrainBatch, logp: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The denominator of the importance ratio for this micro-batch (see ``needs_old_logprobs``)."""
    if mb.old_logprobs is not None:
        return mb.old_logprobs
    if cfg.trainer.rollout_ahead:
        if mb.sampling_logprobs is None:
            raise ValueError("trainer.rollout_ahead=1 needs the sampler's log-probs in the batch")
        return mb.sampling_logprobs
    if needs_old_logprobs(cfg):
        raise ValueError("learner.updates_per_step > 1 needs old log-probs: call attach_logprobs first")
    return logp.detach()


def attach_logprobs(model, batch: TrainBatch, cfg: Config) -> TrainBatch:
    """Old log-probs where the update needs a pass for them, and the reference's when KL is on."""
    micro = cfg.learner.micro_batch_per_worker
    if needs_old_logprobs(cfg):
        batch.old_logprobs = sequence_logprobs(model, batch, micro, adapters=True)
    if cfg.algorithm.kl_coef > 0:
        batch.ref_logprobs = sequence_logprobs(model, batch, micro, adapters=False)
    return batch


def save_checkpoint(engine, model, directory: str, rank: int, zero_stage: int = 2) -> None:
    """DeepSpeed state (module, optimizer, scheduler) on every rank; the adapter (peft format) from rank 0."""
    engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state")
    with gathered(model, zero_stage):
        if rank == 0:
            dora.save_adapter(model, os.path.join(directory, "adapter"))


def load_checkpoint(engine, directory: str) -> None:
    path, _ = engine.load_checkpoint(os.path.join(directory, "deepspeed"), tag="state")
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/deepspeed")



def gathered(model, zero_stage: int):
    """Full parameters on every rank for the duration (ZeRO-3 partitions them; collective call)."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def save_final(model, tokenizer, directory: str, rank: int = 0, zero_stage: int = 2) -> None:
    """``directory/adapter`` (peft format) and ``directory/merged``: a plain HF model with DoRA merged in
    by the same math the weight sync uses. Collective under ZeRO-3; rank 0 writes."""
    with gathered(model, zero_stage):
        if rank == 0:
            _save_final(model, tokenizer, directory)


def _save_final(model, tokenizer, directory: str) -> None:
    dora.save_adapter(model, os.path.join(directory, "adapter"))
    model.save_pretrained(os.path.join(directory, "merged"), state_dict=dora.merged_state_dict(model),
                          safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(directory, "merged"))
