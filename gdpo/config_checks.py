"""Cross-field checks of a loaded config (``gdpo.config`` holds the schema, where each key's own type and
range are checked): each raises ConfigError naming the key, before anything starts."""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

from gdpo.structured import ConfigError

if TYPE_CHECKING:
    from gdpo.config import Config


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key. Nothing starts before this passes."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    known = ("tensorboard", "wandb", "mlflow")  # gdpo.trackers.LOGGERS
    bad = [x for x in cfg.trainer.loggers if x not in known]
    need(not bad, "trainer.loggers", f"unknown tracker {bad[0] if bad else ''!r}; expected some of {', '.join(known)}")
    need(
        len(set(cfg.trainer.loggers)) == len(cfg.trainer.loggers),
        "trainer.loggers",
        f"names a tracker twice: {list(cfg.trainer.loggers)}",
    )
    need(
        cfg.rollout.samples_per_prompt >= 2,
        "rollout.samples_per_prompt",
        f"the '{cfg.algorithm.estimator}' estimator normalizes within groups of samples_per_prompt "
        f"completions, so it needs >= 2 (got {cfg.rollout.samples_per_prompt})",
    )
    need(
        cfg.rollout.min_new_tokens <= cfg.rollout.max_new_tokens,
        "rollout.min_new_tokens",
        f"must be in [0, rollout.max_new_tokens = {cfg.rollout.max_new_tokens}], got {cfg.rollout.min_new_tokens}",
    )
    need(
        (cfg.trainer.prompts_per_step * cfg.rollout.samples_per_prompt)
        >= cfg.learner.num_workers * cfg.learner.updates_per_step,
        "learner.num_workers",
        "every learner needs at least one sample in every mini-batch "
        "(prompts_per_step x samples_per_prompt >= num_workers x updates_per_step)",
    )
    need(len(cfg.learner.target_modules) > 0, "learner.target_modules", "needs at least one module name")
    need(
        cfg.learner.sync_as != "adapter" or cfg.learner.adapter == "lora",
        "learner.sync_as",
        "adapter needs learner.adapter=lora: vLLM serves plain LoRA adapters, not DoRA (use merged or auto)",
    )
    need(
        not cfg.learner.syncs_adapter or cfg.learner.dora_rank <= 512,
        "learner.dora_rank",
        f"{cfg.learner.dora_rank} exceeds vLLM's largest LoRA rank (512), which an adapter sync needs",
    )
    need(cfg.sft.hidden_size % cfg.sft.num_heads == 0, "sft.num_heads", "must divide sft.hidden_size")
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
        cfg.rollout.sleep_level == 0 or cfg.trainer.max_staleness == 0,
        "rollout.sleep_level",
        "with trainer.max_staleness > 0 the engines generate during the update, so they cannot sleep through it",
    )
    need(
        cfg.rollout.tensor_parallel_size == 1 or cfg.cluster.placement == "separate",
        "rollout.tensor_parallel_size",
        f"{cfg.rollout.tensor_parallel_size} GPUs per engine need cluster.placement=separate (a colocated "
        "engine shares one GPU with its learner)",
    )
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


def _validate_rewards(cfg: Config, need) -> None:
    from gdpo.data import template_fields
    from rewards.registry import BoundReward, RewardError, resolve_reward

    specs = cfg.rewards.functions
    need(len(specs) >= 1, "rewards.functions", "needs at least one reward")
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
