"""``gdpo compare``: the same policy, task, rewards and seeds trained in each arm, evaluated, reported.

An arm is an estimator (``grpo``, ``gdpo``), ``grpo-matched`` (GRPO whose reward weights are divided by
each reward's spread on the base policy: the baseline that tells GDPO's per-group decoupling from a
global rescale of the rewards), or ``--arm 'NAME: key=value ...'`` (any overrides). Seeds are paired:
seed s of every arm uses ``trainer.seed=s``, and every evaluation uses the same held-out problems.

Layout under OUT: ``runs/{arm}-seed{s}/`` (training runs), ``evals/base/`` and ``evals/{arm}-seed{s}/``
(``gdpo eval`` of the base policy and of each run's final policy, all with the same sampling),
``compare.json`` and the report (``report.md``, ``report.html``, PNGs) whose first table is arm x
(accuracy, mean tokens, truncation rate, AES, the joint success of ``--joint``, each reward's mean, the
advantage scale), mean ± sample std over seeds; with a ``gdpo`` arm and several seeds, the paired
difference of the joint success (GDPO minus each other arm) with its 95% confidence interval.
The base policy is evaluated first (``grpo-matched`` needs its samples), then every run is trained, then
the final policies are evaluated in a row on one vLLM engine, each loaded into it in turn.
Re-running the same command skips finished runs and evaluations and resumes an interrupted run; a run
directory of another config is refused (naming the keys), an evaluation of other settings, config or
run is done again.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from gdpo.config import ConfigError, load_config, to_dict
from gdpo.fileio import atomic_write_text, read_json_object
from gdpo.metrics import read_rows

METRICS = [
    ("accuracy", "accuracy", "{:.1%}", "metrics"),
    ("mean_tokens", "mean tokens", "{:.1f}", "metrics"),
    ("truncation_rate", "truncation", "{:.1%}", "metrics"),
    ("aes", "AES", "{:+.3f}", "against_base"),
]
ESTIMATORS = ("grpo", "gdpo", "grpo-matched")
# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    matched_weights: bool = False  # GRPO with each reward weight divided by its spread on the base policy


def parse_arms(estimators: Sequence[str], specs: Sequence[str] = ()) -> list[Arm]:
    """``--estimators`` names and ``--arm 'NAME: key=value ...'`` specs -> arms (names must be unique)."""
    arms = []
    for est in estimators:
        if est not in ESTIMATORS:
            raise ConfigError(f"--estimators: unknown arm {est!r} (one of {', '.join(ESTIMATORS)}, or use --arm)")
        arms.append(Arm(est, (f"algorithm.estimator={est.split('-')[0]}",), matched_weights=est == "grpo-matched"))
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--arm {spec!r}: expected 'NAME: key=value ...'")
        arms.append(Arm(name.strip(), tuple(rest.split())))
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if not arms or dupes:
        raise ConfigError(f"compare needs arms with distinct names, got {names}")
    return arms


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(sd).lstrip('+')}"


def joint_success(samples: list[dict], names: Sequence[str]) -> float:
    """Share of samples where every named reward reached 1 (e.g. correct, no restatement, within budget)."""
    ok = [all((row["rewards"].get(n) or 0.0) >= 1.0 for n in names) for row in samples]
    return sum(ok) / len(ok) if ok else float("nan")


def matched_weights(samples: list[dict], cfg) -> list[float]:
    """Each configured reward weight divided by that reward's mean within-prompt standard deviation on
    ``samples`` (conditions applied), so every reward has the same spread in GRPO's sum; a reward that
    never varies keeps its weight."""
    import torch

    from gdpo.advantages import apply_conditions
    from gdpo.trainer import reward_conditions

    names = [r.name for r in cfg.rewards.functions]
    by_prompt: dict[int, list[list[float]]] = {}
    for row in samples:
        by_prompt.setdefault(row["prompt_index"], []).append(
            [math.nan if row["rewards"].get(n) is None else row["rewards"][n] for n in names]
        )
    spreads = []
    for k in range(len(names)):
        per_prompt = []
        for rows in by_prompt.values():
            col = apply_conditions(torch.tensor(rows, dtype=torch.float64), reward_conditions(cfg))[:, k]
            col = col[~torch.isnan(col)]
            if col.numel() > 1:
                per_prompt.append(float(col.std(unbiased=False)))
        spreads.append(statistics.fmean(per_prompt) if per_prompt else 0.0)
    return [r.weight / s if s > 1e-6 else r.weight for r, s in zip(cfg.rewards.functions, spreads)]


def _stored(path: Path) -> dict | None:
    """What an earlier evaluation recorded of itself; None (evaluate again) when it is missing or damaged."""
    try:
        return read_json_object(path)
    except ValueError:
        return None


def _mean_adv_std(run: Path) -> float:
    rows = read_rows(run / "metrics.jsonl", log=lambda msg: None)
    values = [r["adv/std"] for r in rows if "adv/std" in r]
    return statistics.fmean(values) if values else float("nan")


def arm_table(
    results: dict[str, list[dict]], joint: Sequence[str], reward_names: Sequence[str], adv_scale: dict[str, list[float]]
) -> tuple[list[str], list[list[str]]]:
    """``{arm: [per-seed dicts of results.json + 'joint']}`` -> rows: mean ± sample std over seeds."""
    head = (
        ["arm", "seeds"]
        + [label for _, label, _, _ in METRICS]
        + (["joint success"] if joint else [])
        + [f"{n} mean" for n in reward_names]
        + ["adv std"]
    )
    body = []
    for arm, runs in results.items():
        row = [arm, str(len(runs))]
        for key, _, fmt, section in METRICS:
            row.append(_spread([r[section][key] for r in runs if r.get(section)], fmt))
        if joint:
            row.append(_spread([r["joint"] for r in runs], "{:.1%}"))
        row += [_spread([r["metrics"][f"reward/{n}/mean"] for r in runs], "{:.3f}") for n in reward_names]
        row.append(_spread(adv_scale.get(arm, []), "{:.2f}"))
        body.append(row)
    return head, body


def paired_differences(results: dict[str, list[dict]], key: str = "joint") -> dict[str, dict]:
    """GDPO minus each other arm, seed by seed: mean, standard error and the 95% t interval."""
    if "gdpo" not in results:
        return {}
    out = {}
    for arm, runs in results.items():
        n = min(len(runs), len(results["gdpo"]))
        if arm == "gdpo" or n < 2:
            continue
        diffs = [results["gdpo"][i][key] - runs[i][key] for i in range(n)]
        mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(n)
        t = T95[min(n - 1, len(T95)) - 1]
        out[arm] = {"seeds": n, "mean": mean, "se": se, "ci95": [mean - t * se, mean + t * se], "per_seed": diffs}
    return out


def compare(
    config: str | None,
    overrides: list[str],
    arms: list[Arm],
    seeds: int,
    out: str,
    samples_per_prompt: int = 4,
    joint: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict:
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt must be >= 1, got {samples_per_prompt}")
    import ray

    from gdpo.eval.evaluate import EvalEngine

    own_ray = not ray.is_initialized()  # an embedded Ray started by the first run is stopped at the end
    try:
        with EvalEngine() as engines:  # evaluations in a row share one engine
            return _compare(config, overrides, arms, seeds, out, samples_per_prompt, joint, log, engines)
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()


def _compare(config, overrides, arms, seeds, out, samples_per_prompt, joint, log, engines) -> dict:
    from gdpo.eval.evaluate import EvalSettings, evaluate_model
    from gdpo.policy import resolve_model_path
    from gdpo.eval.report import write_report
    from gdpo.trainer import train

    root = Path(out)

    def arm_config(arm: Arm, seed: int, extra: Sequence[str] = ()):
        name = f"{arm.name}-seed{seed}"
        return name, load_config(
            config,
            [*overrides, *arm.overrides, *extra, f"trainer.seed={seed}", f"trainer.output_dir={root / 'runs' / name}"],
        )

    base_cfg = arm_config(arms[0], 0)[1]  # every arm's config is validated before any work starts
    configs = {(arm.name, seed): arm_config(arm, seed) for arm in arms for seed in range(seeds)}
    rewards = [r.name for r in base_cfg.rewards.functions]
    unknown = [n for n in joint if n not in rewards]
    if unknown:
        raise ConfigError(f"--joint names {unknown}, not configured rewards (one of {rewards})")
    model_path = resolve_model_path(base_cfg.model.path, base_cfg.sft, log, what="config key 'model.path' =")
    started = time.time()

    def evaluate_once(name: str, model: str, base: str | None, cfg, run: Path | None = None) -> tuple[dict, list[dict]]:
        """Evaluate unless ``evals/NAME`` holds this very evaluation: the same settings, config and run."""
        target = root / "evals" / name
        settings = EvalSettings(
            model=model,
            data=base_cfg.data.eval,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=base_cfg.rollout.max_new_tokens,
            seed=base_cfg.data.eval_seed,
            base=base,
        )
        source = {
            "settings": asdict(settings),
            "config": to_dict(cfg),
            "run": json.loads((run / "run.json").read_text())["run_id"] if run else None,
        }
        if not (target / "results.json").is_file() or _stored(target / "source.json") != json.loads(json.dumps(source)):
            log(f"[compare] evaluating {name}")
            evaluate_model(settings, cfg, str(target), log, engines)
            atomic_write_text(target / "source.json", json.dumps(source, indent=1))
        samples = [json.loads(line) for line in (target / "samples.jsonl").read_text().splitlines() if line.strip()]
        return json.loads((target / "results.json").read_text()), samples

    _, base_samples = evaluate_once("base", model_path, None, base_cfg)
    weights = {}
    for arm in arms:
        if arm.matched_weights:
            weights[arm.name] = matched_weights(base_samples, configs[(arm.name, 0)][1])
            extra = [f"rewards.functions.{k}.weight={w:.6g}" for k, w in enumerate(weights[arm.name])]
            log(f"[compare] {arm.name}: reward weights {dict(zip(rewards, weights[arm.name]))} (1/spread on the base)")
            for seed in range(seeds):
                configs[(arm.name, seed)] = arm_config(arm, seed, extra)
    engines.close()  # training needs the memory; the final policies share a new engine afterwards
    for seed in range(seeds):  # seed-major: an interrupted comparison still holds paired seeds
        for arm in arms:
            name, cfg = configs[(arm.name, seed)]
            log(f"[compare] training {name} ({cfg.trainer.steps} steps)")
            train(cfg, log)  # a finished run returns at once; a run of another config is refused, naming the keys
    results: dict[str, list[dict]] = {arm.name: [] for arm in arms}
    adv_scale: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for seed in range(seeds):
        for arm in arms:
            name, cfg = configs[(arm.name, seed)]
            run = Path(cfg.trainer.output_dir)
            res, samples = evaluate_once(name, str(run / "final"), str(root / "evals" / "base"), cfg, run)
            results[arm.name].append({**res, "joint": joint_success(samples, joint) if joint else float("nan")})
            adv_scale[arm.name].append(_mean_adv_std(run))
    head, body = arm_table(results, joint, rewards, adv_scale)
    paired = paired_differences(results) if joint else {}
    note = (
        f"{seeds} paired seed(s) per arm, the same policy, rewards and held-out problems (data.eval_seed "
        f"{base_cfg.data.eval_seed}); each final policy sampled {samples_per_prompt}x per prompt (temperature "
        f"{base_cfg.rollout.temperature}); mean ± sample standard deviation over seeds; AES against the base "
        "policy (O1-Pruner: a=1, b=3, g=5)"
        + (f"; joint success: {' and '.join(joint)} all reach 1" if joint else "")
        + "; adv std: the mean over steps of the advantages' standard deviation."
    )
    if paired:
        note += (
            " Joint success, GDPO minus: "
            + "; ".join(
                f"{arm} {100 * d['mean']:+.1f} pt (95% CI {100 * d['ci95'][0]:+.1f} .. {100 * d['ci95'][1]:+.1f})"
                for arm, d in paired.items()
            )
            + "."
        )
    plans = [n for seed in range(seeds) for arm in arms for n in [f"{arm.name}-seed{seed}"]]
    dirs = (
        [str(root / "evals" / "base")]
        + [str(root / "evals" / n) for n in plans]
        + [str(root / "runs" / n) for n in plans]
    )
    write_report(
        dirs,
        str(root),
        title="Estimators compared: " + ", ".join(a.name for a in arms),
        tables=[("Estimators", head, body, note)],
    )
    summary = {
        "table": {"head": head, "body": body},
        "arms": [a.__dict__ for a in arms],
        "seeds": seeds,
        "joint": list(joint),
        "matched_weights": weights,
        "paired_differences": paired,
        "seconds": time.time() - started,
        "per_run": {
            f"{arm}-seed{s}": {**r["metrics"], "joint": r["joint"]}
            for arm, runs in results.items()
            for s, r in enumerate(runs)
        },
    }
    atomic_write_text(root / "compare.json", json.dumps(summary, indent=2) + "\n")
    return summary
