"""Experiment trackers (``trainer.loggers``): TensorBoard (the default), Weights & Biases and MLflow.

Each gets every row ``metrics.jsonl`` gets (every reward component, stage times, the sync, the held-out
evaluations), as scalars at the row's step, and the resolved config once. They start in the driver
before Ray does (:func:`open_trackers`), so a tracker that cannot start (its package missing, W&B
without credentials online, an MLflow store that refuses) is one error naming ``trainer.loggers``
instead of a crash after the cluster came up. A resumed run continues the same W&B / MLflow run (its
id is kept in the output directory) and TensorBoard drops the events a resume redoes.

Offline use: ``trainer.wandb_mode=offline`` writes the W&B run under ``output_dir/wandb`` (``wandb sync``
uploads it later); MLflow's default store is a local SQLite file, ``output_dir/mlflow.db``
(``mlflow ui --backend-store-uri sqlite:///output_dir/mlflow.db``).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from gdpo.structured import ConfigError

__all__ = ["LOGGERS", "TrackerError", "open_trackers", "scalars", "mlflow_key"]

LOGGERS = ("tensorboard", "wandb", "mlflow")
_EXTRA = {"wandb": "wandb", "mlflow": "mlflow"}


class TrackerError(ConfigError):
    """A tracker named in ``trainer.loggers`` could not start; the message says which and why."""


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers, ``step`` left out (it is the x axis)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, out: Path, initial: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackerError(f"trainer.loggers: tensorboard cannot start ({err}); pip install tensorboard") from None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=initial + 1 if initial else None)

    def log_config(self, config: dict) -> None:
        import json

        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, out: Path, t, run_name: str, config: dict):
        import wandb

        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(
                project=t.wandb_project,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(out),
                mode=t.wandb_mode,
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as err:  # wandb raises its own types (UsageError, CommError, AuthenticationError)
            hint = "; trainer.wandb_mode=offline logs without a server" if t.wandb_mode == "online" else ""
            raise TrackerError(f"trainer.loggers: wandb did not start ({type(err).__name__}: {err}){hint}") from None
        id_file.write_text(run_id + "\n")

    def log_config(self, config: dict) -> None:  # given to wandb.init
        pass

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def mlflow_key(key: str) -> str:
    """MLflow's metric names take letters, digits and ``_ - . : / `` and spaces: ``eval/pass@4`` is
    logged as ``eval/pass_at_4``, any other character as ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", "_at_"))


class MLflowTracker:
    name = "mlflow"

    def __init__(self, out: Path, t, run_name: str):
        from mlflow.tracking import MlflowClient

        self.uri = t.mlflow_tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        id_file = out / "mlflow_run_id"
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(t.mlflow_experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(t.mlflow_experiment)
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as err:  # MlflowException, connection errors
            raise TrackerError(
                f"trainer.loggers: mlflow did not start at {self.uri} ({type(err).__name__}: {err}); "
                "trainer.mlflow_tracking_uri names the store (unset: a SQLite store, output_dir/mlflow.db)"
            ) from None
        id_file.write_text(self.run_id + "\n")

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, row["step"]) for k, v in scalars(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def check_installed(loggers) -> None:
    """Each tracker's package importable (before anything starts); a missing one names its extra."""
    for name in loggers:
        if name not in LOGGERS:
            raise TrackerError(f"trainer.loggers: unknown tracker {name!r}; expected some of {', '.join(LOGGERS)}")
        if name in _EXTRA:
            try:
                __import__(_EXTRA[name])
            except ImportError as err:
                raise TrackerError(
                    f"trainer.loggers has {name}, but it cannot be imported ({err}): pip install 'gdpo[{name}]'"
                ) from None


def open_trackers(
    cfg, out: Path, config: dict, initial: int = 0, run_name: Optional[str] = None, log: Callable[[str], None] = print
) -> list:
    """Start every tracker in ``cfg.trainer.loggers`` for the run in ``out`` (resuming at step
    ``initial``) and log the resolved config; one that fails closes those started before it."""
    t = cfg.trainer
    check_installed(t.loggers)
    name = run_name or t.run_name or Path(t.output_dir).resolve().name
    started: list = []
    try:
        for kind in t.loggers:
            if kind == "tensorboard":
                tracker = TensorBoardTracker(out, initial)
            elif kind == "wandb":
                tracker = WandbTracker(out, t, name, config)
            else:
                tracker = MLflowTracker(out, t, name)
            started.append(tracker)
            if not initial:
                tracker.log_config(config)
    except BaseException:
        for tracker in started:
            tracker.close()
        raise
    if started:
        log(f"trackers: {', '.join(tr.name for tr in started)}")
    return started
