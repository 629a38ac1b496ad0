"""Experiment trackers for real, offline: TensorBoard, W&B (offline mode) and MLflow (a SQLite store)."""

import sys
from types import SimpleNamespace

import pytest

from gdpo.config import ConfigError, load_config
from gdpo.trackers import TrackerError, check_installed, open_trackers
from tests.helpers.tracker_files import mlflow_metric, tensorboard_scalars, wandb_offline


def _cfg(out, **kw):
    t = dict(
        loggers=("tensorboard", "wandb", "mlflow"),
        run_name=None,
        output_dir=str(out),
        wandb_project="gdpo-test",
        wandb_mode="offline",
        mlflow_tracking_uri=None,
        mlflow_experiment="gdpo-test",
    )
    return SimpleNamespace(trainer=SimpleNamespace(**{**t, **kw}))


def test_every_tracker_gets_every_row_and_the_config_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    config = {"algorithm": {"estimator": "gdpo"}, "trainer": {"steps": 3}}
    trackers = open_trackers(_cfg(out), out, config, log=lambda m: None)
    assert [t.name for t in trackers] == ["tensorboard", "wandb", "mlflow"]
    for step in (1, 2):
        for t in trackers:
            row = {"step": step, "reward/accuracy/mean": 0.25 * step, "time/update": 1.5, "eval/pass@4": 0.5}
            t.log({**row, "note": "text", "x": float("nan")})
    for t in trackers:
        t.close()
    ids = {f: (out / f).read_text() for f in ("wandb_run_id", "mlflow_run_id")}

    resumed = open_trackers(_cfg(out), out, config, initial=2, log=lambda m: None)  # a resume after step 2
    for t in resumed:
        t.log({"step": 3, "reward/accuracy/mean": 0.75})
        t.close()
    assert {f: (out / f).read_text() for f in ids} == ids  # the same W&B and MLflow runs

    want = {1: 0.25, 2: 0.5, 3: 0.75}
    assert tensorboard_scalars(out)["reward/accuracy/mean"] == want
    assert mlflow_metric(out, "reward/accuracy/mean") == want and mlflow_metric(out, "time/update") == {1: 1.5, 2: 1.5}
    assert mlflow_metric(out, "eval/pass_at_4") == {1: 0.5, 2: 0.5}  # MLflow takes no '@' in a name
    assert tensorboard_scalars(out)["eval/pass@4"] == {1: 0.5, 2: 0.5}
    history, wb_config = wandb_offline(out)
    assert [(h["_step"], h["reward/accuracy/mean"]) for h in history] == [(3, 0.75)]  # the resumed offline run
    history, _ = wandb_offline_first(out)
    assert [(h["_step"], h["reward/accuracy/mean"]) for h in history] == [(1, 0.25), (2, 0.5)]
    assert all("note" not in h and "x" not in h for h in history)  # text and NaN are not scalars
    assert wb_config["algorithm"] == {"estimator": "gdpo"}

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(ids["mlflow_run_id"].strip())
    assert run.data.params["algorithm.estimator"] == "gdpo" and run.info.status == "FINISHED"


def wandb_offline_first(out):
    """The first of the offline runs (a resumed offline run writes a second directory)."""
    import shutil

    runs = sorted((out / "wandb").glob("offline-run-*"))
    keep = out / "first"
    (keep / "wandb").mkdir(parents=True)
    shutil.copytree(runs[0], keep / "wandb" / runs[0].name)
    return wandb_offline(keep)


def test_a_tracker_that_cannot_start_is_one_error_naming_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "a_file").write_text("")
    bad = _cfg(out, loggers=("tensorboard", "mlflow"), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'a_file' / 'x.db'}")
    with pytest.raises(TrackerError, match=r"trainer.loggers: mlflow did not start at sqlite:///.*a_file/x.db"):
        open_trackers(bad, out, {}, log=lambda m: None)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    online = _cfg(out, loggers=("wandb",), wandb_mode="online")
    with pytest.raises(TrackerError, match="wandb did not start .*trainer.wandb_mode=offline logs without a server"):
        open_trackers(online, out, {}, log=lambda m: None)


def test_a_tracker_whose_package_is_missing_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(TrackerError, match=r"trainer.loggers has mlflow, .*pip install 'gdpo\[mlflow\]'"):
        check_installed(("tensorboard", "mlflow"))


def test_unknown_or_repeated_trackers_are_config_errors():
    with pytest.raises(ConfigError, match="trainer.loggers.*unknown tracker 'neptune'"):
        load_config(None, ["trainer.loggers=[tensorboard,neptune]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(None, ["trainer.loggers=[wandb,wandb]"])
    assert load_config(None, []).trainer.loggers == ("tensorboard",)


def test_gdpo_train_stops_before_ray_when_a_tracker_cannot_start(tmp_path, capsys):
    import ray

    from gdpo.cli import main

    (tmp_path / "a_file").write_text("")
    args = [
        "train",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.loggers=[mlflow]",
        f"trainer.mlflow_tracking_uri=sqlite:///{tmp_path / 'a_file' / 'x.db'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gdpo train: error: trainer.loggers: mlflow did not start" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_a_tracker_failing_mid_run_is_warned_about_and_dropped(tmp_path):
    from gdpo.metrics import MetricsLogger

    class Broken:
        name = "mlflow"

        def log(self, row):
            raise ConnectionError("the tracking server went away")

        def close(self):
            pass

    class Kept:
        name = "tensorboard"

        def __init__(self):
            self.rows = []

        def log(self, row):
            self.rows.append(row["step"])

        def close(self):
            pass

    said = []
    kept = Kept()
    logger = MetricsLogger(tmp_path, 3, log=said.append, trackers=[Broken(), kept])
    for step in (1, 2):
        logger.log({"step": step, "loss": 0.1})
    logger.close()
    assert kept.rows == [1, 2] and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(said) == 1 and "tracker mlflow failed at step 1 (ConnectionError" in said[0]
