"""``gdpo compare``: the same policy, task, rewards and seeds trained with each estimator, evaluated, reported.

Layout under OUT: ``runs/{estimator}-seed{s}/`` (training runs), ``evals/base/`` and
``evals/{estimator}-seed{s}/`` (``gdpo eval`` of the base policy and of each run's final policy, all with
the same sampling), ``compare.json`` and the report (``report.md``, ``report.html``, PNGs) whose first
table is estimator x (accuracy, mean tokens, truncation rate, AES), mean and spread over seeds.
Re-running the same command skips finished runs and evaluations and resumes an interrupted run.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from gdpo.config import load_config
from gdpo.fileio import atomic_write_text

METRICS = [("accuracy", "accuracy", "{:.1%}", "metrics"), ("mean_tokens", "mean tokens", "{:.1f}", "metrics"),
           ("truncation_rate", "truncation", "{:.1%}", "metrics"), ("aes", "AES", "{:+.3f}", "against_base")]


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(sd).lstrip('+')}"


def estimator_table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """``{estimator: [results.json of each seed]}`` -> table rows: mean ± sample std over seeds."""
    head = ["estimator", "seeds"] + [label for _, label, _, _ in METRICS]
    body = []
    for est, runs in results.items():
        row = [est, str(len(runs))]
        for key, _, fmt, section in METRICS:
            row.append(_spread([r[section][key] for r in runs if r.get(section)], fmt))
        body.append(row)
    return head, body


def compare(config: str | None, overrides: list[str], estimators: list[str], seeds: int, out: str,
            samples_per_prompt: int = 4, log: Callable[[str], None] = print) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    import ray

    own_ray = not ray.is_initialized()  # an embedded Ray started by the first run is stopped at the end
    try:
        return _compare(config, overrides, estimators, seeds, out, samples_per_prompt, log)
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()


def _compare(config, overrides, estimators, seeds, out, samples_per_prompt, log) -> dict:
    from gdpo.evaluation import EvalSettings, evaluate_model
    from gdpo.policy import resolve_model_path
    from gdpo.report import write_report
    from gdpo.trainer import train

    root = Path(out)
    plans = []
    for est in estimators:  # every config is validated before any work starts
        for seed in range(seeds):
            name = f"{est}-seed{seed}"
            cfg = load_config(config, [*overrides, f"algorithm.estimator={est}", f"trainer.seed={seed}",
                                       f"trainer.output_dir={root / 'runs' / name}"])
            plans.append((est, name, cfg))
    base_cfg = plans[0][2]
    model_path = resolve_model_path(base_cfg, log)
    started = time.time()

    def settings(model: str, base: str | None) -> EvalSettings:
        return EvalSettings(model=model, data=base_cfg.data.eval, samples_per_prompt=samples_per_prompt,
                            max_new_tokens=base_cfg.rollout.max_new_tokens, seed=0, base=base)

    def evaluate_once(name: str, model: str, base: str | None, cfg) -> dict:
        target = root / "evals" / name
        if (target / "results.json").is_file():
            return json.loads((target / "results.json").read_text())
        log(f"[compare] evaluating {name}")
        return evaluate_model(settings(model, base), cfg, str(target), log)

    evaluate_once("base", model_path, None, base_cfg)
    results: dict[str, list[dict]] = {est: [] for est in estimators}
    for est, name, cfg in plans:
        run = Path(cfg.trainer.output_dir)
        summary = run / "summary.json"
        if not (summary.is_file() and "final" in json.loads(summary.read_text())):
            log(f"[compare] training {name} ({cfg.trainer.steps} steps)")
            train(cfg, log)
        results[est].append(evaluate_once(name, str(run / "final"), str(root / "evals" / "base"), cfg))
    head, body = estimator_table(results)
    note = (f"{seeds} seed(s) per estimator, the same policy, rewards and data; each final policy sampled "
            f"{samples_per_prompt}x per held-out prompt (temperature {base_cfg.rollout.temperature}); "
            "mean ± sample standard deviation over seeds; AES against the base policy (O1-Pruner: a=1, b=3, g=5).")
    dirs = [str(root / "evals" / "base")] + [str(root / "evals" / n) for _, n, _ in plans] + \
        [str(root / "runs" / n) for _, n, _ in plans]
    write_report(dirs, str(root), title="GRPO vs GDPO: " + ", ".join(estimators),
                 tables=[("Estimators", head, body, note)])
    summary = {"table": {"head": head, "body": body}, "estimators": estimators, "seeds": seeds,
               "seconds": time.time() - started,
               "per_run": {name: res["metrics"] for (_, name, _), res in
                           zip(plans, [r for est in estimators for r in results[est]])}}
    atomic_write_text(root / "compare.json", json.dumps(summary, indent=2) + "\n")
    return summary
