"""The one config schema: frozen dataclasses, YAML presets, dotted overrides, validated once.

The dataclasses are the schema; ``gdpo.structured`` loads it on OmegaConf (a preset and ``key=value``
overrides merged onto it, keys, types and ``Literal`` values checked, ``${key}`` interpolation resolved).
Every field carries its documentation in ``metadata["doc"]`` and its bounds in ``metadata["bounds"]`` (the
README's config reference is generated from both, so they cannot drift); cross-field rules live in
``gdpo.config_checks.validate``.
Workers receive the validated, frozen object and never mutate it.

    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.prompts_per_step=8"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from gdpo.paths import PRESETS, preset_path  # noqa: F401 (where the presets are; preset_path is public here)
from gdpo.structured import ConfigError, build, doc, doc_factory, read_yaml, reference_table, to_dict

__all__ = ["Config", "ConfigError", "build", "config_reference", "doc", "doc_factory", "load_config", "to_dict"]

DEFAULT_CONFIG = PRESETS / "tiny_cpu.yaml"
BUILTIN_TINY_POLICY = "builtin:tiny-chain-arith"


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc(
        BUILTIN_TINY_POLICY,
        "HF model directory or hub id loaded with from_pretrained; "
        f"'{BUILTIN_TINY_POLICY}' builds (and caches) the project's tiny SFT policy",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "parameter dtype for learner and rollout")
    trust_remote_code: bool = doc(False, "passed to from_pretrained")


@dataclass(frozen=True)
class SFTConfig:
    cache_dir: Optional[str] = doc(
        None,
        "where built policies are cached (keyed by a hash of this section); unset: $GDPO_CACHE_DIR, else the "
        "per-user cache (~/.cache/gdpo or $XDG_CACHE_HOME/gdpo; ~/Library/Caches/gdpo on macOS)",
    )
    seed: int = doc(0, "seed for data generation, initialization and batching")
    hidden_size: int = doc(128, "tiny policy width", ge=1)
    num_layers: int = doc(4, "tiny policy depth", ge=1)
    num_heads: int = doc(
        2, "attention heads; head_dim = hidden_size / num_heads must be >= 64 for vLLM's CPU attention", ge=1
    )
    steps: int = doc(500, "optimizer steps of the first round of supervised training (cosine lr schedule)", ge=1)
    target_accuracy: float = doc(
        0.95,
        "greedy accuracy on held-out validation problems the build must reach (0 = none): "
        "rounds of steps/2 more steps (warm restarts at half the previous peak lr) follow "
        "until it does; float paths differ between CPUs, so one step count does not give "
        "every machine the same policy",
        ge=0,
        le=1,
    )
    max_steps: int = doc(
        1500,
        "cap on all rounds together; a build that has not reached target_accuracy by then stops with an error",
        ge=1,
    )
    sequences_per_step: int = doc(64, "training sequences per optimizer step", ge=1)
    lr: float = doc(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay)", gt=0)
    concise_fraction: float = doc(
        0.0,
        "share of training targets that are the problem's shortest solution (the rest are verbose): "
        "how often the built policy samples the concise form that length rewards can then reinforce",
        ge=0,
        le=1,
    )
    threads: int = doc(2, "torch intra-op threads while training", ge=1)
    eval_problems: int = doc(200, "held-out problems for the post-build accuracy / verbosity check", ge=1)


@dataclass(frozen=True)
class DataConfig:
    train: str = doc(
        "task:chain_arith", "prompt source: 'task:NAME' (project task), a .jsonl path, or 'hf:NAME[:CONFIG]:SPLIT'"
    )
    eval: str = doc("task:chain_arith", "held-out source, same forms as data.train (tasks use a disjoint seed)")
    prompt_column: str = doc("question", "column holding the problem text")
    answer_column: str = doc("answer", "column holding the gold answer; passed to rewards as `answer`")
    template: str = doc("{question}\n", "prompt template; {column} placeholders are filled from the row")
    use_chat_template: bool = doc(False, "wrap the filled template with the tokenizer's chat template")
    eval_size: int = doc(200, "held-out prompts per evaluation (0 = all)", ge=0)
    eval_seed: int = doc(
        0, "which held-out problems a task draws (fixed, so runs of every trainer.seed are evaluated on the same set)"
    )
    train_size: int = doc(0, "train prompts to use (0 = all / task default)", ge=0)


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = doc(1, "vLLM rollout workers (Ray actors); prompts are split across them", ge=1)
    samples_per_prompt: int = doc(8, "completions per prompt: the group size of group-normalized estimators", ge=1)
    max_new_tokens: int = doc(128, "generation limit per completion, in tokens", ge=1)
    min_new_tokens: int = doc(
        0, "EOS is suppressed until a completion has this many tokens (benchmarks: fixed lengths)", ge=0
    )
    temperature: float = doc(1.0, "sampling temperature for training rollouts", gt=0)
    top_p: float = doc(1.0, "nucleus sampling for training rollouts", gt=0, le=1)
    eval_temperature: float = doc(0.0, "sampling temperature for held-out evaluation (0 = greedy)", ge=0)
    tensor_parallel_size: int = doc(
        1,
        "vLLM tensor parallelism per worker (GPU only): the engine gets a bundle of that many GPUs of "
        "its own, so > 1 needs cluster.placement=separate",
        ge=1,
    )
    gpu_memory_utilization: float = doc(0.5, "vLLM GPU memory fraction (GPU only)", gt=0, le=1)
    max_model_len: Optional[int] = doc(
        None,
        "the engines' context, prompt + completion tokens; None = the model's "
        "max_position_embeddings. A run whose longest prompt plus max_new_tokens does "
        "not fit is refused at start",
        ge=1,
    )
    enforce_eager: Optional[bool] = doc(
        None, "vLLM without CUDA graphs; None = eager on CPU, CUDA graphs on GPU (decoding is much slower without them)"
    )
    in_process: Optional[bool] = doc(
        None,
        "run vLLM's engine core and its worker inside the calling process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of two processes of their own; None = "
        "in-process on CPU (an engine starts in seconds, not ~25 s, and decodes without the "
        "inter-process hop), separate processes on GPU (scheduling overlaps the GPU's work)",
    )
    cpu_threads: int = doc(
        0,
        "torch threads of an in-process engine on CPU; 0 = the machine's cores / "
        "rollout.num_workers (Ray alone would give a fractional-CPU actor one thread), half the cores "
        "when the engines generate during the update (trainer.max_staleness > 0, colocated)",
        ge=0,
    )
    sleep_level: Literal[0, 1, 2] = doc(
        0,
        "placement colocated: engines sleep through the learner's update and wake "
        "before the sync (vLLM sleep mode): 1 offloads weights to CPU and drops the KV "
        "cache, 2 drops both (the base weights are reloaded from model.path on wake); "
        "0 = off. vLLM's CPU backend frees nothing (it only pauses the engine)",
    )
    seed_per_prompt: Optional[bool] = doc(
        None,
        "seed each prompt's samples (the step's seed + the prompt's index): the same samples however the "
        "prompts are split over engines, but vLLM samples such requests one by one, off its batched "
        "(FlashInfer top-p) path; None = on CPU yes, on GPU no (the engine's own seed, set at its start)",
    )
    kv_cache_gib: int = doc(1, "vLLM CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", ge=1)
    cpu_reserved_cores: Optional[int] = doc(
        None,
        "CPU, rollout.in_process off: cores vLLM keeps free of its OpenMP threads for the "
        "front end (VLLM_CPU_NUM_OF_RESERVED_CPU); None = vLLM's default (1), 0 = "
        "every core generates (faster while rollouts do not overlap learning)",
        ge=0,
    )


@dataclass(frozen=True)
class RewardSpec:
    name: str = doc("accuracy", "registered reward name, 'module:function', or 'path/to/file.py:function'")
    weight: float = doc(1.0, "weight w_k of this reward in the advantage sum")
    kwargs: dict = doc_factory(dict, "keyword arguments bound to the reward function (e.g. a token budget)")
    condition_on: Optional[str] = doc(
        None, "GDPO Eq. 8: pay this reward only when reward `condition_on` reaches the threshold, else 0"
    )
    condition_threshold: float = doc(1.0, "threshold on the raw conditioning reward")


@dataclass(frozen=True)
class RewardsConfig:
    functions: tuple[RewardSpec, ...] = doc_factory(
        lambda: (RewardSpec(),), "the reward functions, in order (K columns of the reward matrix)"
    )
    correctness: str = doc(
        "accuracy",
        "the reward whose score >= 1 marks a correct answer: every held-out accuracy, floor and shortcut "
        "figure (training, gdpo eval, compare, compress) counts with it; must be one of rewards.functions",
    )
    num_workers: int = doc(1, "reward worker actors", ge=1)
    verifier_processes: int = doc(2, "math-verify worker processes per reward worker", ge=1)
    verifier_timeout_s: float = doc(
        20.0,
        "per-item limit of the math verifier: math-verify's own parse and verify "
        "limits are a fifth of it (a slow item scores 0, an unparsable gold None); a "
        "verifier process that makes no progress for this long is killed (the item "
        "scores None)",
        gt=0,
    )
    timeout_s: float = doc(
        600.0,
        "limit of one reward's call on one reward worker's share of a step; past it the "
        "worker is killed and replaced and the share scored again (cluster.max_restarts)",
        gt=0,
    )

    def specs(self) -> list[tuple[str, dict]]:
        """``(name, kwargs)`` per reward, the verifier settings added to ``accuracy``'s."""
        verifier = {"processes": self.verifier_processes, "timeout_s": self.verifier_timeout_s}
        return [(r.name, dict(r.kwargs, **(verifier if r.name == "accuracy" else {}))) for r in self.functions]


@dataclass(frozen=True)
class AlgorithmConfig:
    estimator: Literal["gdpo", "grpo"] = doc("gdpo", "advantage estimator")
    grpo_scale: Literal["group", "batch", "none"] = doc(
        "group", "GRPO std scaling (group std, batch std, or none as in Dr. GRPO)"
    )
    adv_eps: float = doc(1e-4, "epsilon added to every std in the advantage normalization", gt=0)
    clip_eps_low: float = doc(0.2, "lower clip of the importance ratio: 1 - clip_eps_low", ge=0, lt=1)
    clip_eps_high: float = doc(0.28, "upper clip of the importance ratio: 1 + clip_eps_high (DAPO clip-higher)", ge=0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = doc(
        "token-mean", "loss aggregation; the denominator is always global over the step's batch"
    )
    kl_coef: float = doc(0.0, "coefficient of the KL penalty to the reference policy (0 = off)", ge=0)
    kl_estimator: Literal["k1", "k3"] = doc("k3", "per-token KL estimator")
    filter_zero_variance: tuple[str, ...] = doc((), "drop groups whose named reward components all have zero variance")
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = doc(
        "ppo_clip",
        "ppo_clip: the clipped token ratio (PPO, DAPO's clip range); gspo: the clipped sequence ratio "
        "(the length-normalized log-ratio; the paper clips at 3e-4/4e-4 with seq-mean-token-mean); cispo: "
        "the clipped ratio detached as a weight, every token keeps its gradient (MiniMax-M1)",
    )
    rollout_correction: Literal["none", "tis", "mis"] = doc(
        "tis",
        "weigh each token's loss by w = pi_learner / pi_sampler (rollout-training mismatch and staleness): tis "
        "truncates w at the cap, mis masks the tokens/sequences whose w is outside [1/cap, cap], none "
        "only logs the mismatch",
    )
    rollout_correction_level: Literal["token", "sequence", "geometric"] = doc(
        "token", "the ratio w per token, per sequence (the product), or the geometric mean over the sequence"
    )
    rollout_correction_cap: float = doc(2.0, "the cap C of the rollout correction's weights", gt=1)


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = doc(1, "DeepSpeed learner workers (data parallel)", ge=1)
    zero_stage: Literal[2, 3] = doc(2, "DeepSpeed ZeRO stage")
    zero3_param_persistence_threshold: int = doc(
        100000,
        "ZeRO-3: parameters with fewer elements stay whole on every rank instead of being partitioned "
        "(DeepSpeed's stage3_param_persistence_threshold; most DoRA adapters are below the default)",
        ge=0,
    )
    lr: float = doc(1e-3, "AdamW learning rate of the adapters", gt=0)
    weight_decay: float = doc(0.0, "AdamW weight decay", ge=0)
    grad_clip: float = doc(1.0, "gradient norm clip", ge=0)
    micro_batch_per_worker: int = doc(
        16,
        "sequences per forward/backward on each learner; sequences of similar length are grouped and each "
        "micro-batch is cut to its longest sequence (no step-wide padding)",
        ge=1,
    )
    updates_per_step: int = doc(
        1, "optimizer steps per rollout batch (mini-batches); > 1 makes updates off-policy", ge=1
    )
    lr_schedule: Literal["constant", "cosine"] = doc(
        "constant", "learning-rate schedule over trainer.steps x updates_per_step optimizer steps"
    )
    lr_warmup_steps: int = doc(0, "linear warm-up optimizer steps", ge=0)
    min_lr_ratio: float = doc(0.1, "cosine schedule: final lr as a fraction of learner.lr", ge=0, le=1)
    logprob_chunk_tokens: int = doc(
        1024,
        "log-probs and entropy from the final hidden states, this many tokens at a time "
        "(gdpo/logprob_head.py): the [tokens x vocab] logits never exist whole, and backward recomputes "
        "each chunk's; 0 = the full logits in fp32 (the naive path)",
        ge=0,
    )
    gradient_checkpointing: bool = doc(
        False,
        "activation checkpointing (non-reentrant, DoRA layers inside the checkpointed decoder layers): "
        "each layer keeps only its input and is recomputed in backward, about a third more compute",
    )
    max_tokens_per_micro_batch: int = doc(
        0,
        "micro-batches by a token budget: sequences sorted by length and packed while rows x the longest "
        "stay within it (a longer sequence gets a micro-batch of its own); 0 = micro_batch_per_worker "
        "sequences each",
        ge=0,
    )
    adapter: Literal["dora", "lora"] = doc(
        "dora", "DoRA, or plain LoRA (vLLM serves its final adapter); dora_* set both"
    )
    sync_as: Literal["auto", "merged", "adapter"] = doc(
        "auto",
        "what a weight sync sends: adapter = the LoRA adapter alone, served by the engines through vLLM's LoRA "
        "(learner.adapter=lora only: vLLM cannot serve DoRA); merged = the adapted layers' merged weights; "
        "auto = adapter for LoRA, merged for DoRA",
    )
    dora_rank: int = doc(8, "DoRA rank r", ge=1)
    dora_alpha: float = doc(16.0, "DoRA alpha (scale s = alpha / r)", gt=0)
    cpu_threads: int = doc(
        0,
        "torch threads per learner when training on CPU; 0 = the machine's cores / "
        "learner.num_workers (Ray alone would give a fractional-CPU actor one thread), half the cores "
        "when the engines generate during the update (trainer.max_staleness > 0, colocated)",
        ge=0,
    )
    sync_bucket_mb: int = doc(
        32,
        "weight sync: a version is written and broadcast in buckets of this many MiB (bounds the learner's extra "
        "memory)",
        ge=1,
    )
    dora_dropout: float = doc(
        0.0, "dropout on the adapter input in training; 0 keeps the fused one-product forward", ge=0, lt=1
    )
    target_modules: tuple[str, ...] = doc(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names of the linear layers that get adapters",
    )

    @property
    def syncs_adapter(self) -> bool:
        """Whether a weight sync sends the LoRA adapter instead of merged weights."""
        return self.sync_as == "adapter" or (self.sync_as == "auto" and self.adapter == "lora")


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = doc(20, "training steps (one rollout batch each)", ge=1)
    prompts_per_step: int = doc(16, "prompts per step; each gets rollout.samples_per_prompt completions", ge=1)
    seed: int = doc(0, "global seed (prompt order, sampling, initialization)")
    output_dir: str = doc("runs/tiny_cpu", "metrics, checkpoints, final policy and summary.json go here")
    resume: Literal["auto", "never"] = doc(
        "auto",
        "auto: continue the run in output_dir from its newest intact "
        "checkpoint (a finished run is left as it is); never: output_dir must be "
        "new or empty",
    )
    force_resume: bool = doc(
        False,
        "resume although keys that change what the run computes differ from the "
        "checkpoint's config (they are listed at start); the checkpoint's optimizer and "
        "scheduler state are kept",
    )
    eval_every: int = doc(10, "held-out evaluation every N steps (0 = only before and after)", ge=0)
    save_every: int = doc(5, "checkpoint every N steps", ge=1)
    loggers: tuple[str, ...] = doc(
        ("tensorboard",),
        "experiment trackers that get every metrics row and the resolved config: tensorboard, wandb, mlflow "
        "(wandb and mlflow are the optional extras gdpo[wandb], gdpo[mlflow]); metrics.jsonl is always written",
    )
    run_name: Optional[str] = doc(None, "the run's name in W&B / MLflow (None: output_dir's last part)")
    wandb_project: str = doc("gdpo", "W&B project")
    wandb_mode: Literal["online", "offline"] = doc(
        "online", "W&B: online needs credentials (wandb login); offline writes output_dir/wandb for wandb sync"
    )
    mlflow_tracking_uri: Optional[str] = doc(None, "MLflow server or store URI (None: SQLite, output_dir/mlflow.db)")
    mlflow_experiment: str = doc("gdpo", "MLflow experiment name")
    max_staleness: int = doc(
        0,
        "k > 0: the rollouts of the next k steps are sampled while the learners update (each batch at most k "
        "policy versions behind the learner that trains on it); 0 = on-policy. Replaces rollout_ahead "
        "(rollout_ahead=1 is max_staleness=1)",
        ge=0,
    )


@dataclass(frozen=True)
class ClusterConfig:
    address: Optional[str] = doc(
        None,
        "Ray address to join; None starts an embedded Ray. A driver inside a Ray job "
        "(ray job submit) always joins the job's cluster (RAY_ADDRESS)",
    )
    placement: Literal["colocated", "separate"] = doc(
        "colocated", "rollout and learner share devices, or get their own"
    )
    num_cpus: Optional[int] = doc(None, "CPUs for the embedded Ray (None = all)", ge=1)
    weight_sync: Literal["auto", "file", "collective"] = doc(
        "auto",
        "how engines get each policy version: auto = a file in /dev/shm for engines on learner rank 0's node, "
        "a broadcast from learner 0 (NCCL on GPUs, gloo on CPUs) for the rest; file = the file only (every rollout "
        "worker must run on learner 0's node); collective = the broadcast for every engine not sharing learner 0's GPU",
    )
    rollout_timeout_s: float = doc(
        1800.0,
        "deadline of one rollout worker's call (its share of a generation, a "
        "sleep or wake); a worker that misses it is killed and replaced, and its share "
        "retried",
        gt=0,
    )
    learner_timeout_s: float = doc(
        3600.0,
        "deadline of one learner call (start-up, log-probs, update, checkpoint); "
        "a learner that misses it stops the run, which resubmitting resumes",
        gt=0,
    )
    max_restarts: int = doc(
        10,
        "worker restarts allowed per role (rollout, reward) over a run, each after a back-off "
        "of 2^(n-1) s (at most 60 s); one more stops the run naming the role and worker",
        ge=0,
    )
    sync_timeout_s: float = doc(
        300.0,
        "deadline of one weight sync (joining the broadcast group, sending, loading); "
        "a receiver that dies or hangs fails the sync within it",
        gt=0,
    )
    gpu_memory_gb: Optional[float] = doc(
        None,
        "memory of one GPU in GiB, for the memory plan checked before Ray starts (gdpo check-config, "
        "gdpo train): a run that cannot fit is refused naming the keys to change; None = read from this "
        "machine's GPU where it has one, else no plan (a driver on a GPU-less head node: set it)",
        gt=0,
    )
    learner_resources: dict = doc_factory(
        dict,
        "Ray resources added to every learner bundle, e.g. {trainer_node: "
        "0.01} keeps learners on nodes started with --resources='{\"trainer_node\": 1}'",
    )
    rollout_resources: dict = doc_factory(
        dict,
        "Ray resources added to every rollout bundle (same form); with "
        "placement colocated the two are merged into the shared bundles",
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = doc_factory(ModelConfig, "policy model")
    sft: SFTConfig = doc_factory(SFTConfig, "building the tiny project policy (used when model.path is the builtin)")
    data: DataConfig = doc_factory(DataConfig, "prompt data")
    rollout: RolloutConfig = doc_factory(RolloutConfig, "vLLM rollout")
    rewards: RewardsConfig = doc_factory(RewardsConfig, "reward functions")
    algorithm: AlgorithmConfig = doc_factory(AlgorithmConfig, "advantages and loss")
    learner: LearnerConfig = doc_factory(LearnerConfig, "DeepSpeed learners and DoRA adapters")
    trainer: TrainerConfig = doc_factory(TrainerConfig, "driver loop")
    cluster: ClusterConfig = doc_factory(ClusterConfig, "Ray cluster")


# ----------------------------------------------------------------------------- loading


# keys that were replaced: a config naming one gets an error saying what to write instead
REPLACED_KEYS = {
    "trainer.rollout_ahead": "trainer.max_staleness (trainer.rollout_ahead=1 is trainer.max_staleness=1)",
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (the embedded default when None), apply dotted overrides, validate."""
    raw = read_yaml(preset_path(path) if path is not None else DEFAULT_CONFIG)
    for key, instead in REPLACED_KEYS.items():
        section, name = key.split(".")
        in_file = isinstance(raw, dict) and isinstance(raw.get(section), dict) and name in raw[section]
        in_overrides = any(o.split("=", 1)[0].strip().lstrip("+~") == key for o in overrides)
        if in_file or in_overrides:
            where = f"config file {path}" if in_file else "the overrides"
            raise ConfigError(f"config key '{key}' (in {where}) was replaced by {instead}")
    cfg = build(Config, raw, overrides)
    from gdpo.config_checks import validate  # cross-field rules: their own module

    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- documentation


def config_reference() -> str:
    """Markdown reference of every config key, generated from the field docs (the README's table)."""
    return reference_table(Config)
