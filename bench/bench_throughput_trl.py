"""The TRL arms of bench/bench_throughput.py: ``trl.GRPOTrainer`` with peft DoRA or LoRA on the same
policy, prompts, rewards and settings as the gdpo arms (see that script's docstring). Run through it:

    .venv/bin/python bench/bench_throughput.py --runs trl,trl-lora
"""

from __future__ import annotations

import statistics
import time

from bench_throughput import TARGETS, load_cfg


def run_trl(args, dora: bool, kl: float, name: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import trl.trainer.grpo_trainer as grpo_mod

    from gdpo.advantages import apply_conditions
    from gdpo.trainer import reward_conditions
    from gdpo.data import load_prompts
    from rewards import BoundReward, score_rewards

    cfg = load_cfg(args)
    data = load_prompts(cfg.data, "train", seed=0)
    ds = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(data.prompts, data.columns["answer"])])
    bound = [BoundReward.from_name(name, kw) for name, kw in cfg.rewards.specs()]
    conditions = reward_conditions(cfg)  # length_budget paid only where accuracy >= 1, as in gdpo's runs
    cache: dict = {}

    def matrix(prompts, completions, completion_ids, answer):
        key = (tuple(prompts), tuple(completions))
        if key not in cache:
            cache.clear()
            m = score_rewards(
                bound,
                prompts,
                completions,
                [len(c) for c in completion_ids],
                [0] * len(completions),
                {"answer": list(answer)},
            )
            cache[key] = apply_conditions(m.values, conditions)
        return cache[key]

    def accuracy(prompts, completions, completion_ids, answer, **_):
        return matrix(prompts, completions, completion_ids, answer)[:, 0].tolist()

    def length_budget(prompts, completions, completion_ids, answer, **_):
        return matrix(prompts, completions, completion_ids, answer)[:, 1].tolist()

    gen_times: list[float] = []
    original = grpo_mod.profiling_context

    class timed_generate:  # TRL names the transformers generation "transformers.generate"
        def __init__(self, trainer, name):
            self.inner, self.name = original(trainer, name), name

        def __enter__(self):
            self.t0 = time.perf_counter()
            return self.inner.__enter__()

        def __exit__(self, *exc):
            if self.name == "transformers.generate":
                gen_times.append(time.perf_counter() - self.t0)
            return self.inner.__exit__(*exc)

    grpo_mod.profiling_context = timed_generate
    step_ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    total = args.prompts * args.samples
    targs = GRPOConfig(
        output_dir=str(args.out / name),
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=total // args.micro,
        num_generations=args.samples,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.learner.grad_clip,
        max_steps=args.steps,
        beta=kl,
        loss_type="dapo",
        epsilon=cfg.algorithm.clip_eps_low,
        epsilon_high=cfg.algorithm.clip_eps_high,
        multi_objective_aggregation="normalize_then_sum",
        scale_rewards="group",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(
        r=cfg.learner.dora_rank,
        lora_alpha=cfg.learner.dora_alpha,
        use_dora=dora,
        target_modules=TARGETS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    trainer = GRPOTrainer(
        model=cfg.model.path,
        reward_funcs=[accuracy, length_budget],
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[StepTimer()],
    )
    t0 = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([t0] + step_ends[:-1], step_ends)]
    merged = trainer.model.merge_and_unload()
    final = args.out / name / "merged"
    merged.save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    timed_steps, timed_gen = steps[args.warmup :], gen_times[args.warmup :]
    return {
        "seconds_per_step": statistics.median(timed_steps),
        "step_seconds_all": steps,
        "rollout_tokens_per_s": total * args.tokens / statistics.median(timed_gen),
        "generate_seconds_all": gen_times,
        "threads": torch.get_num_threads(),
        "final_model": str(final),
    }
