"""Read back what the trackers wrote, from their own files: TensorBoard events, the MLflow store, and a
W&B offline run (its ``.wandb`` file: a LevelDB-style log of protobuf records, which wandb 0.31 no longer
reads from Python)."""

import glob
import struct
from pathlib import Path


def tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def mlflow_metric(out: Path, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def wandb_offline(out: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the newest offline run under ``out/wandb``."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    path = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))[-1]
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "run":
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
    return history, config
