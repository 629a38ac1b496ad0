"""The one config schema: frozen dataclasses, YAML presets, dotted overrides, validated once.

Every field carries its documentation in ``metadata["doc"]`` (the README's config reference is
generated from it, so the two cannot drift). Workers receive the validated, frozen object and never
mutate it.

    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.prompts_per_step=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PRESETS = Path(__file__).resolve().parent / "configs"  # shipped inside the package (package data)
DEFAULT_CONFIG = PRESETS / "tiny_cpu.yaml"
BUILTIN_TINY_POLICY = "builtin:tiny-chain-arith"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation (immutable defaults only)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples / doc_factory for container defaults")
    return field(default=default, metadata={"doc": text})


def doc_factory(factory: Any, text: str) -> Any:
    return field(default_factory=factory, metadata={"doc": text})


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
    cache_dir: str = doc(".cache/gdpo", "where built policies are cached (keyed by a hash of this section)")
    seed: int = doc(0, "seed for data generation, initialization and batching")
    hidden_size: int = doc(128, "tiny policy width")
    num_layers: int = doc(4, "tiny policy depth")
    num_heads: int = doc(
        2, "attention heads; head_dim = hidden_size / num_heads must be >= 64 for vLLM's CPU attention"
    )
    steps: int = doc(500, "optimizer steps of the first round of supervised training (cosine lr schedule)")
    target_accuracy: float = doc(
        0.95,
        "greedy accuracy on held-out validation problems the build must reach (0 = none): "
        "rounds of steps/2 more steps (warm restarts at half the previous peak lr) follow "
        "until it does; float paths differ between CPUs, so one step count does not give "
        "every machine the same policy",
    )
    max_steps: int = doc(
        1500, "cap on all rounds together; a build that has not reached target_accuracy by then stops with an error"
    )
    sequences_per_step: int = doc(64, "training sequences per optimizer step")
    lr: float = doc(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay)")
    threads: int = doc(2, "torch intra-op threads while training")
    eval_problems: int = doc(200, "held-out problems for the post-build accuracy / verbosity check")


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
    eval_size: int = doc(200, "held-out prompts per evaluation (0 = all)")
    eval_seed: int = doc(
        0, "which held-out problems a task draws (fixed, so runs of every trainer.seed are evaluated on the same set)"
    )
    train_size: int = doc(0, "train prompts to use (0 = all / task default)")


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = doc(1, "vLLM rollout workers (Ray actors); prompts are split across them")
    samples_per_prompt: int = doc(8, "completions per prompt: the group size of group-normalized estimators")
    max_new_tokens: int = doc(128, "generation limit per completion, in tokens")
    min_new_tokens: int = doc(
        0, "EOS is suppressed until a completion has this many tokens (benchmarks: fixed lengths)"
    )
    temperature: float = doc(1.0, "sampling temperature for training rollouts")
    top_p: float = doc(1.0, "nucleus sampling for training rollouts")
    eval_temperature: float = doc(0.0, "sampling temperature for held-out evaluation (0 = greedy)")
    tensor_parallel_size: int = doc(1, "vLLM tensor parallelism per worker (GPU only)")
    gpu_memory_utilization: float = doc(0.5, "vLLM GPU memory fraction (GPU only)")
    max_model_len: Optional[int] = doc(
        None,
        "the engines' context, prompt + completion tokens; None = the model's "
        "max_position_embeddings. A run whose longest prompt plus max_new_tokens does "
        "not fit is refused at start",
    )
    enforce_eager: Optional[bool] = doc(
        None, "vLLM without CUDA graphs; None = eager on CPU, CUDA graphs on GPU (decoding is much slower without them)"
    )
    sleep_level: Literal[0, 1, 2] = doc(
        0,
        "placement colocated: engines sleep through the learner's update and wake "
        "before the sync (vLLM sleep mode): 1 offloads weights to CPU and drops the KV "
        "cache, 2 drops both (the base weights are reloaded from model.path on wake); "
        "0 = off. vLLM's CPU backend frees nothing (it only pauses the engine)",
    )
    kv_cache_gib: int = doc(1, "vLLM CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    cpu_reserved_cores: Optional[int] = doc(
        None,
        "CPU only: cores vLLM keeps free of its OpenMP threads for the "
        "front end (VLLM_CPU_NUM_OF_RESERVED_CPU); None = vLLM's default (1), 0 = "
        "every core generates (faster while rollouts do not overlap learning)",
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
    num_workers: int = doc(1, "reward worker actors")
    verifier_processes: int = doc(2, "math-verify worker processes per reward worker")
    verifier_timeout_s: float = doc(
        20.0,
        "per-item limit of the math verifier: math-verify's own parse and verify "
        "limits are a fifth of it (a slow item scores 0, an unparsable gold None); a "
        "verifier process that makes no progress for this long is killed (the item "
        "scores None)",
    )
    timeout_s: float = doc(
        600.0,
        "limit of one reward's call on one reward worker's share of a step; past it the "
        "worker is killed and replaced and the share scored again (cluster.max_restarts)",
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
    adv_eps: float = doc(1e-4, "epsilon added to every std in the advantage normalization")
    clip_eps_low: float = doc(0.2, "lower clip of the importance ratio: 1 - clip_eps_low")
    clip_eps_high: float = doc(0.28, "upper clip of the importance ratio: 1 + clip_eps_high (DAPO clip-higher)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = doc(
        "token-mean", "loss aggregation; the denominator is always global over the step's batch"
    )
    kl_coef: float = doc(0.0, "coefficient of the KL penalty to the reference policy (0 = off)")
    kl_estimator: Literal["k1", "k3"] = doc("k3", "per-token KL estimator")
    filter_zero_variance: tuple[str, ...] = doc((), "drop groups whose named reward components all have zero variance")


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = doc(1, "DeepSpeed learner workers (data parallel)")
    zero_stage: Literal[2, 3] = doc(2, "DeepSpeed ZeRO stage")
    lr: float = doc(1e-3, "AdamW learning rate of the adapters")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    grad_clip: float = doc(1.0, "gradient norm clip")
    micro_batch_per_worker: int = doc(16, "sequences per forward/backward on each learner")
    updates_per_step: int = doc(1, "optimizer steps per rollout batch (mini-batches); > 1 makes updates off-policy")
    lr_schedule: Literal["constant", "cosine"] = doc(
        "constant", "learning-rate schedule over trainer.steps x updates_per_step optimizer steps"
    )
    lr_warmup_steps: int = doc(0, "linear warm-up optimizer steps")
    min_lr_ratio: float = doc(0.1, "cosine schedule: final lr as a fraction of learner.lr")
    dora_rank: int = doc(8, "DoRA rank r")
    dora_alpha: float = doc(16.0, "DoRA alpha (scale s = alpha / r)")
    cpu_threads: int = doc(
        0,
        "torch threads per learner when training on CPU; 0 = the machine's cores / "
        "learner.num_workers (Ray alone would give a fractional-CPU actor one thread)",
    )
    sync_bucket_mb: int = doc(
        32, "weight sync: merged weights are written in buckets of this many MiB (bounds the learner's extra memory)"
    )
    dora_dropout: float = doc(0.0, "dropout on the adapter input in training; 0 keeps the fused one-product forward")
    target_modules: tuple[str, ...] = doc(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names of the linear layers that get adapters",
    )


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = doc(20, "training steps (one rollout batch each)")
    prompts_per_step: int = doc(16, "prompts per step; each gets rollout.samples_per_prompt completions")
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
    eval_every: int = doc(10, "held-out evaluation every N steps (0 = only before and after)")
    save_every: int = doc(5, "checkpoint every N steps")
    rollout_ahead: Literal[0, 1] = doc(
        0,
        "1: the rollout of step t+1 runs while the learners update on step t "
        "(one policy version stale; the importance ratio uses the sampler's log-probs)",
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
    num_cpus: Optional[int] = doc(None, "CPUs for the embedded Ray (None = all)")
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
    )
    learner_timeout_s: float = doc(
        3600.0,
        "deadline of one learner call (start-up, log-probs, update, checkpoint); "
        "a learner that misses it stops the run, which resubmitting resumes",
    )
    max_restarts: int = doc(
        10,
        "worker restarts allowed per role (rollout, reward) over a run, each after a back-off "
        "of 2^(n-1) s (at most 60 s); one more stops the run naming the role and worker",
    )
    sync_timeout_s: float = doc(
        300.0,
        "deadline of one weight sync (joining the broadcast group, sending, loading); "
        "a receiver that dies or hangs fails the sync within it",
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (the embedded default when None), apply dotted overrides, validate."""
    raw = read_yaml(preset_path(path) if path is not None else DEFAULT_CONFIG)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def preset_path(spec: str | Path) -> Path:
    """A config file: ``spec`` itself where that file exists, else the preset of that name shipped in the
    package (``multireward_cpu``, ``multireward_cpu.yaml`` or ``configs/multireward_cpu.yaml``, so the
    paths of a source checkout work from any directory and from an installed wheel)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if (PRESETS / name).is_file() and path.parent in (Path("."), Path("configs")):
        return PRESETS / name
    presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {spec} (nor a preset of that name; presets: {presets})")


def read_yaml(path: Path) -> dict:
    """A config file's mapping (YAML ``safe_load``: no tags that build objects); errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; list elements are addressed by index."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(
            f"override key '{key}' goes below '{'.'.join(parts[:-1])}', which is a value ({node!r}), not a section"
        )


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override key '{where}' goes below a value that is not a section")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key '{where}': index {part!r} is out of range 0..{len(node) - 1}")
    return int(part)


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, naming the dotted key of any mistake."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"; did you mean '{_join(prefix, near[0])}'?" if near else ""
        raise ConfigError(f"unknown config key '{_join(prefix, key)}'{hint} (allowed: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed (allowed: {', '.join(map(repr, args))})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key. Nothing starts before this passes."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    for key, value in _positive_ints(cfg):
        need(value >= 1, key, f"must be >= 1, got {value}")
    need(
        cfg.rollout.samples_per_prompt >= 2,
        "rollout.samples_per_prompt",
        f"the '{cfg.algorithm.estimator}' estimator normalizes within groups of samples_per_prompt "
        f"completions, so it needs >= 2 (got {cfg.rollout.samples_per_prompt})",
    )
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "training rollouts must sample (> 0)")
    need(cfg.rollout.eval_temperature >= 0, "rollout.eval_temperature", "must be >= 0")
    need(0 < cfg.rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    need(cfg.algorithm.adv_eps > 0, "algorithm.adv_eps", "must be > 0")
    need(
        cfg.algorithm.clip_eps_low >= 0 and cfg.algorithm.clip_eps_low < 1,
        "algorithm.clip_eps_low",
        "must be in [0, 1)",
    )
    need(cfg.algorithm.clip_eps_high >= 0, "algorithm.clip_eps_high", "must be >= 0")
    need(cfg.algorithm.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
    need(
        0 <= cfg.rollout.min_new_tokens <= cfg.rollout.max_new_tokens,
        "rollout.min_new_tokens",
        f"must be in [0, rollout.max_new_tokens = {cfg.rollout.max_new_tokens}], got {cfg.rollout.min_new_tokens}",
    )
    need(
        cfg.rollout.cpu_reserved_cores is None or cfg.rollout.cpu_reserved_cores >= 0,
        "rollout.cpu_reserved_cores",
        f"must be >= 0 or null, got {cfg.rollout.cpu_reserved_cores}",
    )
    need(cfg.learner.lr > 0, "learner.lr", "must be > 0")
    need(
        cfg.learner.cpu_threads >= 0,
        "learner.cpu_threads",
        f"must be >= 0 (0 = automatic), got {cfg.learner.cpu_threads}",
    )
    need(cfg.learner.dora_alpha > 0, "learner.dora_alpha", "must be > 0")
    need(0 <= cfg.learner.dora_dropout < 1, "learner.dora_dropout", "must be in [0, 1)")
    need(cfg.learner.lr_warmup_steps >= 0, "learner.lr_warmup_steps", "must be >= 0")
    need(0 <= cfg.learner.min_lr_ratio <= 1, "learner.min_lr_ratio", "must be in [0, 1]")
    need(
        (cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt)
        >= cfg.learner.num_workers * cfg.learner.updates_per_step,
        "learner.num_workers",
        "every learner needs at least one sample in every mini-batch "
        "(prompts_per_step x samples_per_prompt >= num_workers x updates_per_step)",
    )
    need(len(cfg.learner.target_modules) > 0, "learner.target_modules", "needs at least one module name")
    need(cfg.sft.hidden_size % cfg.sft.num_heads == 0, "sft.num_heads", "must divide sft.hidden_size")
    need(0 <= cfg.sft.target_accuracy <= 1, "sft.target_accuracy", f"must be in [0, 1], got {cfg.sft.target_accuracy}")
    need(
        cfg.sft.max_steps >= cfg.sft.steps,
        "sft.max_steps",
        f"must be >= sft.steps = {cfg.sft.steps}, got {cfg.sft.max_steps}",
    )
    need(
        cfg.sft.hidden_size // cfg.sft.num_heads >= 64,
        "sft.num_heads",
        f"head_dim = {cfg.sft.hidden_size // cfg.sft.num_heads} < 64 is rejected by vLLM's CPU attention",
    )
    need(cfg.trainer.eval_every >= 0, "trainer.eval_every", "must be >= 0")
    need(cfg.data.eval_size >= 0 and cfg.data.train_size >= 0, "data.eval_size", "sizes must be >= 0")
    need(
        cfg.rollout.max_model_len is None or cfg.rollout.max_model_len > cfg.rollout.max_new_tokens,
        "rollout.max_model_len",
        f"must exceed rollout.max_new_tokens = {cfg.rollout.max_new_tokens} (room for a "
        f"prompt), got {cfg.rollout.max_model_len}",
    )
    need(
        cfg.rollout.sleep_level == 0 or cfg.cluster.placement == "colocated",
        "rollout.sleep_level",
        "sleeping frees memory for learners on the engines' devices: it needs cluster.placement=colocated",
    )
    need(
        cfg.rollout.sleep_level == 0 or cfg.trainer.rollout_ahead == 0,
        "rollout.sleep_level",
        "with trainer.rollout_ahead=1 the engines generate during the update, so they cannot sleep through it",
    )
    for key in (
        "cluster.sync_timeout_s",
        "cluster.rollout_timeout_s",
        "cluster.learner_timeout_s",
        "rewards.timeout_s",
        "rewards.verifier_timeout_s",
    ):
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        need(0 < value < math.inf, key, f"must be a positive number of seconds, got {value}")
    need(cfg.cluster.max_restarts >= 0, "cluster.max_restarts", f"must be >= 0, got {cfg.cluster.max_restarts}")
    need(
        cfg.cluster.num_cpus is None or cfg.cluster.num_cpus >= 1,
        "cluster.num_cpus",
        f"must be >= 1 or null, got {cfg.cluster.num_cpus}",
    )
    need(
        cfg.learner.grad_clip >= 0, "learner.grad_clip", f"must be >= 0 (0 = no clipping), got {cfg.learner.grad_clip}"
    )
    need(cfg.learner.weight_decay >= 0, "learner.weight_decay", f"must be >= 0, got {cfg.learner.weight_decay}")
    need(
        cfg.trainer.output_dir.strip() != "",
        "trainer.output_dir",
        "must name a directory (empty would write into the current one)",
    )
    for key in ("learner_resources", "rollout_resources"):
        for name, amount in getattr(cfg.cluster, key).items():
            need(
                isinstance(name, str) and name not in ("CPU", "GPU", "memory"),
                f"cluster.{key}",
                f"{name!r}: name custom resources here (CPU and GPU per bundle follow from the placement)",
            )
            need(
                isinstance(amount, (int, float)) and not isinstance(amount, bool) and 0 < amount < math.inf,
                f"cluster.{key}.{name}",
                f"must be a positive number, got {amount!r}",
            )
    _validate_rewards(cfg, need)


def _positive_ints(cfg: Config):
    yield from [
        ("rollout.num_workers", cfg.rollout.num_workers),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size),
        ("rollout.kv_cache_gib", cfg.rollout.kv_cache_gib),
        ("rewards.num_workers", cfg.rewards.num_workers),
        ("rewards.verifier_processes", cfg.rewards.verifier_processes),
        ("learner.num_workers", cfg.learner.num_workers),
        ("learner.micro_batch_per_worker", cfg.learner.micro_batch_per_worker),
        ("learner.updates_per_step", cfg.learner.updates_per_step),
        ("learner.dora_rank", cfg.learner.dora_rank),
        ("learner.sync_bucket_mb", cfg.learner.sync_bucket_mb),
        ("trainer.steps", cfg.trainer.steps),
        ("trainer.prompts_per_step", cfg.trainer.prompts_per_step),
        ("trainer.save_every", cfg.trainer.save_every),
        ("sft.steps", cfg.sft.steps),
        ("sft.sequences_per_step", cfg.sft.sequences_per_step),
        ("sft.threads", cfg.sft.threads),
        ("sft.hidden_size", cfg.sft.hidden_size),
        ("sft.num_layers", cfg.sft.num_layers),
        ("sft.num_heads", cfg.sft.num_heads),
        ("sft.eval_problems", cfg.sft.eval_problems),
    ]


def _validate_rewards(cfg: Config, need) -> None:
    from gdpo.data import template_fields
    from rewards.registry import BoundReward, RewardError, resolve_reward

    specs = cfg.rewards.functions
    need(len(specs) >= 1, "rewards.functions", "needs at least one reward")
    need(cfg.rewards.verifier_timeout_s > 0, "rewards.verifier_timeout_s", "must be > 0")
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):
        key = f"rewards.functions.{i}"
        try:  # imports a plugin
            resolve_reward(spec.name)
        except RewardError as err:
            raise ConfigError(f"config key '{key}.name': {err}") from None
        try:  # a reward's signature, and every kwarg names one of its parameters
            fn = BoundReward.from_name(spec.name, cfg.rewards.specs()[i][1]).fn
        except RewardError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
        params = inspect.signature(fn).parameters
        need(names.count(spec.name) == 1, f"{key}.name", f"reward '{spec.name}' is listed twice")
        if spec.condition_on is not None:
            need(
                spec.condition_on in names[:i],
                f"{key}.condition_on",
                f"must name a reward listed before this one (one of {names[:i]}), got {spec.condition_on!r}",
            )
            # such a reward already says what a wrong answer earns (its paper's formula); zeroing that, and
            # then z-scoring the column per group (GDPO), can rank a correct answer below a wrong one
            need(
                "correctness_from" not in params,
                f"{key}.condition_on",
                f"reward '{spec.name}' reads correctness itself (correctness_from); conditioning it on "
                f"'{spec.condition_on}' replaces what it pays wrong answers with 0, and under GDPO its per-group "
                "normalization can then rank a correct answer below a wrong one. List it without condition_on",
            )
        if "target_tokens" in params and spec.name.startswith("l1_"):
            # L1 (LCPO) trains the policy to follow a length target it reads in its prompt
            need(
                "target_tokens" not in spec.kwargs and "target_tokens" in template_fields(cfg.data.template),
                f"{key}",
                f"reward '{spec.name}' rewards meeting a target length that the prompt states (L1): "
                "put {target_tokens} in data.template and give the data a target_tokens column, instead of a "
                "target the policy never sees",
            )
    for name in cfg.algorithm.filter_zero_variance:
        need(name in names, "algorithm.filter_zero_variance", f"{name!r} is not a configured reward (one of {names})")
    need(
        cfg.rewards.correctness in names,
        "rewards.correctness",
        f"must name one of rewards.functions ({names}), got {cfg.rewards.correctness!r}: it decides which "
        "answers count as correct",
    )


# ----------------------------------------------------------------------------- documentation


def config_reference() -> str:
    """Markdown reference of every config key, generated from the field docs."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints_cache: dict[type, dict] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
        for f in dataclasses.fields(cls):
            key = _join(prefix, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if typing.get_origin(tp) is tuple and default and dataclasses.is_dataclass(default[0]):
                lines.append(f"| `{key}` | list | see below | {f.metadata['doc']} |")
                walk(type(default[0]), f"{key}.N")
                continue
            lines.append(f"| `{key}` | {_type_name(tp)} | `{_plain(default)}` | {f.metadata['doc']} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-ready mapping of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)
