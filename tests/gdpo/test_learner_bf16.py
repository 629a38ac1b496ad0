"""A bf16 policy under real DeepSpeed (gloo, one rank): the base stays bf16, DoRA's adapters stay fp32, so
the first weights the sync sends are the base's exactly (DeepSpeed's bf16 mode rounded the magnitude and
moved every row by up to 0.2% before any learning), and an update trains them."""

import pytest
import torch
import torch.multiprocessing as mp

from gdpo import sync_transport

pytestmark = pytest.mark.e2e


def _worker(rank, port, model_path, out):
    from gdpo import dora, learner
    from gdpo.config import load_config
    from tests.gdpo.test_learner_zero import _fixed_batch

    cfg = load_config(None, ["model.dtype=bfloat16", "learner.lr=1e-2"])
    learner.init_distributed(0, 1, "127.0.0.1", port, backend="gloo")
    model, tok = learner.build_policy(model_path, cfg)
    engine = learner.make_engine(model, cfg)
    layers = dict(dora.dora_layers(model))
    start = {n: (layer.merged_weight() - layer.base_layer.weight).abs().max().item() for n, layer in layers.items()}
    batch = _fixed_batch(tok)
    tokens = float(batch.loss_mask[:, 1:].sum())
    learner.train_step(engine, batch, cfg, global_tokens=tokens, global_seqs=float(len(batch)), world_size=1)
    moved = max((layer.merged_weight() - layer.base_layer.weight).abs().max().item() for layer in layers.values())
    dtypes = {
        "base": {str(layer.base_layer.weight.dtype) for layer in layers.values()},
        "adapter": {str(p.dtype) for p in engine.module.parameters() if p.requires_grad},
    }
    torch.save({"start": start, "moved": moved, "dtypes": dtypes}, out)


def test_bf16_policy_syncs_the_base_exactly_before_learning_and_trains_fp32_adapters(tmp_path):
    from tests.helpers.chat_model import build_chat_model

    path = str(build_chat_model(tmp_path / "m"))
    port = sync_transport.free_port("127.0.0.1")
    mp.start_processes(_worker, args=(port, path, str(tmp_path / "r.pt")), nprocs=1, join=True, start_method="spawn")
    r = torch.load(tmp_path / "r.pt")
    assert r["dtypes"] == {"base": {"torch.bfloat16"}, "adapter": {"torch.float32"}}
    assert max(r["start"].values()) == 0.0, r["start"]  # W' = W0 exactly at B = 0
    assert r["moved"] > 0  # the update trained the adapters
