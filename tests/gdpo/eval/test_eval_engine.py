"""``EvalEngine``'s choice between loading a checkpoint into the running engine and starting another.

The engine here is a recording fake; that a checkpoint loaded into a real engine serves its own weights
is checked in tests/gdpo/test_weight_sync.py (log-probs against the learner's)."""

import json

import pytest

from gdpo import rollout, weight_sync
from gdpo.config import load_config
from gdpo.eval.evaluate import EvalEngine


def _model(root, name, hidden=64, tokenizer='{"v": 1}', dtype="float32"):
    d = root / name
    d.mkdir()
    conf = {"_name_or_path": str(d), "hidden_size": hidden, "torch_dtype": dtype, "transformers_version": "x"}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "tokenizer.json").write_text(tokenizer)
    return str(d)


@pytest.fixture
def calls(monkeypatch):
    log = []

    def make_engine(model_dir, cfg, seed=0, lora_rank=0):
        log.append(("start", model_dir, lora_rank))
        return object()

    monkeypatch.setattr(rollout, "make_engine", make_engine)
    monkeypatch.setattr(weight_sync, "engine_load_checkpoint", lambda llm, d: log.append(("load", d)) or 0)
    monkeypatch.setattr(rollout, "close_engine", lambda llm: log.append(("close",)))
    return log


def test_checkpoints_of_one_architecture_share_one_engine(tmp_path, calls):
    cfg = load_config()
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b", dtype="bfloat16")  # dtype: the engine's, from the config
    other = _model(tmp_path, "wide", hidden=128)
    retok = _model(tmp_path, "retok", tokenizer='{"v": 2}')
    with EvalEngine() as engines:
        first = engines.serve(a, cfg)
        assert engines.serve(b, cfg) is first and engines.serve(b, cfg) is first
        assert engines.serve(a, cfg) is first
        engines.serve(other, cfg)  # another architecture
        engines.serve(retok, cfg)  # another tokenizer
        engines.serve(retok, load_config(overrides=["rollout.max_model_len=200"]))  # other engine settings
        engines.serve(retok, load_config(overrides=["rollout.max_model_len=200"]), lora_rank=16)  # needs LoRA
        engines.serve(retok, load_config(overrides=["rollout.max_model_len=200"]), lora_rank=8)  # 16 serves 8
    assert calls == [
        ("start", a, 0),
        ("load", b),
        ("load", a),
        ("close",),
        ("start", other, 0),
        ("close",),
        ("start", retok, 0),
        ("close",),
        ("start", retok, 0),
        ("close",),
        ("start", retok, 16),
        ("close",),
    ]
    assert engines.started == 5 and engines.llm is None


def test_each_adapter_directory_gets_its_own_lora_id(tmp_path):
    import os

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
    first = rollout.lora_id(str(one))
    assert rollout.lora_id(str(one)) == first and rollout.lora_id(str(two)) != first
    st = os.stat(one / "adapter_model.safetensors")
    os.utime(one / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten
    assert rollout.lora_id(str(one)) not in (first, rollout.lora_id(str(two)))
