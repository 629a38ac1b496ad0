"""A run's directory on disk, and what a resume may trust of it.

``trainer.output_dir`` holds ``run.json`` (the run's id), ``config.json``, ``metrics.jsonl``,
``summary.json``, ``checkpoints/step-NNNNNN/`` and ``final/``. One directory holds one run: a
directory that holds another run (or anything else) is refused before any work starts, never
overwritten.

A checkpoint holds what cannot be rebuilt: each learner's DeepSpeed state of the trainable (adapter)
parameters with their optimizer and scheduler state (``deepspeed/``; the frozen base model is
reloaded from ``model.path``), the adapter in peft format (``adapter/``), the driver's RNG state
(``rng.json``), the run's config and position (``config.json``, ``trainer_state.json``), and, written
last, ``manifest.json``: each file's size and sha256. It is written under a temporary name, fsynced,
and renamed into place. A resume takes the newest checkpoint of this run whose manifest verifies,
falling back to an older one (the reason is logged), and compares the checkpoint's config with the
current one: keys that change what the run computes are refused unless ``trainer.force_resume``.

Security: DeepSpeed loads its files with ``torch.load(weights_only=False)``, i.e. unpickles them:
resuming runs any code that whoever can write the directory put there. The run directory is created
mode 0700; the checksums catch damage (a torn or truncated file), not an attacker who can rewrite
the manifest too. Nothing else here unpickles (``rng.json`` is JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gdpo.config import Config, ConfigError, to_dict
from gdpo.fileio import atomic_write_text, fsync_dir, fsync_tree, read_json_object

MANIFEST = "manifest.json"
# Keys a resume may change without changing what the run computes: how long it runs, how often it
# evaluates and saves, and how the work is placed and sized on the machines.
RESUME_SAFE = (
    "trainer.steps",
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.resume",
    "trainer.force_resume",
    "trainer.output_dir",
    "rollout.num_workers",
    "rollout.gpu_memory_utilization",
    "rollout.kv_cache_gib",
    "rollout.cpu_reserved_cores",
    "rollout.in_process",
    "rollout.cpu_threads",
    "rollout.enforce_eager",
    "rollout.sleep_level",
    "rollout.tensor_parallel_size",
    "rollout.max_model_len",
    "rewards.num_workers",
    "rewards.verifier_processes",
    "learner.cpu_threads",
    "learner.sync_bucket_mb",
    "learner.micro_batch_per_worker",
    "sft.cache_dir",
    "sft.threads",
    "cluster.",
)


# ----------------------------------------------------------------------------- files


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """fsync every file under ``directory``, then write ``manifest.json`` (relative path -> size and
    sha256) and fsync it and the directory: the checkpoint's mark of completeness."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    fsync_tree(directory)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify_checkpoint(directory: Path) -> Optional[str]:
    """None when every file the manifest lists is there with its size and checksum, else what is wrong."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json (incomplete, or written by a gdpo before manifests)"
    except (ValueError, KeyError, TypeError) as err:
        return f"manifest.json unreadable ({err})"
    for rel, meta in entries.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    for rel in ("trainer_state.json", "config.json", "rng.json"):
        if rel not in entries:
            return f"{rel} is not in the manifest"
    return None


# ----------------------------------------------------------------------------- RNG (no pickle)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ----------------------------------------------------------------------------- config changes


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"x": 2}]}`` -> ``{"a.b": 1, "l.0.x": 2}`` (the override syntax's keys)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not out and prefix:
        out[prefix] = tree  # an empty list or mapping is a value too
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every key whose value differs (a key only one side has: None)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def unsafe_changes(changes: dict[str, tuple[Any, Any]], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The changes that alter what the run computes. ``trainer.steps`` is safe unless a cosine schedule
    spans it (the remaining learning rates would change)."""

    def safe(key: str) -> bool:
        if key == "trainer.steps":
            return cfg.learner.lr_schedule == "constant"
        return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE)

    return {k: v for k, v in changes.items() if not safe(k)}


# ----------------------------------------------------------------------------- the run directory


@dataclass
class RunPlan:
    """What ``open_run`` found: where the run starts from."""

    out: Path
    run_id: str
    checkpoint: Optional[Path] = None  # the newest intact checkpoint of this run; None = from step 0
    summary: dict = field(default_factory=dict)  # summary.json so far (the baseline survives a restart)
    finished: bool = False  # summary.json has the final evaluation at trainer.steps: nothing to do


def _describe(out: Path) -> str:
    names = sorted(p.name for p in out.iterdir())
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def open_run(cfg: Config, log: Callable[[str], None] = print) -> RunPlan:
    """Check ``trainer.output_dir`` before any worker starts; create it (0700) for a new run.

    Refused with a ``ConfigError`` (nothing is written): a non-empty directory that holds no gdpo run;
    an existing run with ``trainer.resume=never``; a finished run whose checkpoints are gone and whose
    ``trainer.steps`` grew; a checkpoint past ``trainer.steps``; a config that differs from the
    checkpoint's in keys that change what the run computes (unless ``trainer.force_resume``)."""
    out = Path(cfg.trainer.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"trainer.output_dir: {out} is a file, not a directory")
    if not out.exists() or not any(out.iterdir()):
        return _new_run(out, cfg)
    run_file = out / "run.json"
    if not run_file.is_file() and (out / "config.json").is_file():
        raise ConfigError(
            f"trainer.output_dir: {out} holds a run written by an older gdpo (no run.json, "
            "checkpoints without manifests) that cannot be resumed safely; choose a new directory"
        )
    if not run_file.is_file():
        raise ConfigError(
            f"trainer.output_dir: {out} is not empty ({_describe(out)}) and holds no gdpo run "
            "(no run.json); choose a new or empty directory"
        )
    if cfg.trainer.resume == "never":
        raise ConfigError(
            f"trainer.output_dir: {out} holds a run already; continue it with trainer.resume=auto, "
            "or choose a new directory (nothing was changed)"
        )
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"trainer.output_dir: {run_file} is unreadable ({err}); the directory cannot be resumed "
            "safely, choose a new one"
        ) from None
    for stale in (out / "checkpoints").glob(".tmp-*"):  # a save that was killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    summary = _read_summary(out / "summary.json", log)
    checkpoint = newest_checkpoint(out, run_id, log)
    if checkpoint is None and run_checkpoints(out, run_id):
        raise ConfigError(
            f"trainer.output_dir: none of {out}'s checkpoints is intact (reasons above); the run "
            "cannot be resumed. Choose a new directory"
        )
    if checkpoint is None and "final" not in summary:
        # nothing trained is kept: the run starts again from step 0, with this config
        if config_changes(_read_config(out / "config.json"), to_dict(cfg)):
            log(f"{out}: no checkpoint yet; starting the run again from step 0 with the changed config")
            summary = {}
        return RunPlan(out, run_id, None, summary)
    if "baseline" not in summary:
        raise ConfigError(
            f"trainer.output_dir: {out}/summary.json has no baseline, and the run has trained since; "
            "the baseline cannot be measured on a trained policy. Choose a new directory"
        )
    stored = checkpoint / "config.json" if checkpoint else out / "config.json"
    _check_changes(_read_config(stored), cfg, log)
    plan = RunPlan(out, run_id, checkpoint, summary)
    if "final" in summary and summary.get("steps") == cfg.trainer.steps and (out / "final").is_dir():
        plan.finished = True
        return plan
    if checkpoint is None and summary.get("steps"):
        raise ConfigError(
            f"trainer.output_dir: {out} holds a finished run of {summary['steps']} steps whose "
            "checkpoints are gone; it cannot be continued to trainer.steps="
            f"{cfg.trainer.steps}. Choose a new directory"
        )
    if checkpoint is not None:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        if step > cfg.trainer.steps:
            raise ConfigError(f"trainer.steps={cfg.trainer.steps}, but {out}'s newest checkpoint is at step {step}")
    summary.pop("final", None)
    return plan


def _new_run(out: Path, cfg: Config) -> RunPlan:
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_id = uuid.uuid4().hex
    atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    atomic_write_text(out / "run.json", json.dumps({"run_id": run_id}, indent=2))  # last: marks a run
    return RunPlan(out, run_id)


def _read_summary(path: Path, log: Callable[[str], None]) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log(f"warning: {path} is unreadable; the baseline is measured again")
        return {}


def _read_config(stored: Path) -> dict:
    try:
        return read_json_object(stored)
    except ValueError as err:
        raise ConfigError(f"trainer.output_dir: cannot read the run's config ({err}); choose a new directory") from None


def _check_changes(old: dict, cfg: Config, log: Callable[[str], None]) -> None:
    changes = config_changes(old, to_dict(cfg))
    unsafe = unsafe_changes(changes, cfg)
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in unsafe.items()))
    if unsafe and not cfg.trainer.force_resume:
        raise ConfigError(
            f"resuming {cfg.trainer.output_dir} with a changed config: {listed}. These change what "
            "the run computes; restore them, use a new trainer.output_dir, or set "
            "trainer.force_resume=true (the checkpoint's optimizer and scheduler state are kept)"
        )
    if unsafe:
        log(f"warning: trainer.force_resume: resuming with changed {listed}")
    safe = {k: v for k, v in changes.items() if k not in unsafe}
    if safe:
        log("resuming with " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in safe.items()))


def checkpoint_step(directory: Path) -> int:
    return int(directory.name.split("-")[1])


def run_checkpoints(out: Path, run_id: str) -> list[Path]:
    """This run's committed checkpoints, oldest first (by step, not name)."""
    found = []
    for d in (out / "checkpoints").glob("step-*"):
        try:
            state = json.loads((d / "trainer_state.json").read_text())
            if state.get("run_id") == run_id:
                found.append(d)
        except (OSError, ValueError):
            found.append(d)  # damaged: ``newest_checkpoint`` says why it is skipped
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(out: Path, run_id: str, log: Callable[[str], None] = print) -> Optional[Path]:
    for ckpt in reversed(run_checkpoints(out, run_id)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def commit_checkpoint(tmp: Path, state: dict, cfg: Config, run_id: str) -> Path:
    """Complete the checkpoint the learners wrote into ``tmp``: driver files, manifest, fsync, rename."""
    atomic_write_text(tmp / "rng.json", json.dumps(rng_state()))
    atomic_write_text(tmp / "config.json", json.dumps(to_dict(cfg), indent=2))
    atomic_write_text(tmp / "trainer_state.json", json.dumps({**state, "run_id": run_id}, indent=2))
    write_manifest(tmp)
    final = tmp.parent / f"step-{state['step']:06d}"
    if final.exists():  # the same step saved again (a resume redid it): swap, then delete the old one
        old = tmp.parent / f".tmp-old-{final.name}-{uuid.uuid4().hex[:6]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def prune_checkpoints(out: Path, run_id: str, keep: int, log: Callable[[str], None] = print) -> None:
    """Delete all but this run's ``keep`` newest checkpoints; a failed delete is logged, not hidden."""
    for old in run_checkpoints(out, run_id)[:-keep]:
        try:
            shutil.rmtree(old)
        except OSError as err:
            log(f"warning: could not delete old checkpoint {old}: {err}")


def new_checkpoint_dir(out: Path, step: int) -> Path:
    root = out / "checkpoints"
    root.mkdir(exist_ok=True, mode=0o700)
    tmp = root / f".tmp-step-{step:06d}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    return tmp
