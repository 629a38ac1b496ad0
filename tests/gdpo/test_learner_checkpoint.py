"""Learner checkpoints under real DeepSpeed (gloo, 1 rank, ZeRO-2 and ZeRO-3): only the trainable state
is saved, and a learner built afresh (other adapter initialization) continues bit for bit."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from gdpo import sync_transport
from tests.gdpo.test_learner_zero import _fixed_batch

pytestmark = pytest.mark.e2e


def _worker(rank, port, stage, model_path, out_dir):
    from gdpo import learner
    from gdpo.config import load_config

    def build(seed):
        cfg = load_config(
            None,
            [
                f"learner.zero_stage={stage}",
                "learner.lr=1e-2",
                "learner.micro_batch_per_worker=4",
                f"trainer.seed={seed}",
            ],
        )
        model, tok = learner.build_policy(model_path, cfg)
        return cfg, model, tok, learner.make_engine(model, cfg)

    def step(cfg, model, engine, batch):
        batch = learner.attach_logprobs(model, batch, cfg)
        learner.train_step(
            engine, batch, cfg, global_tokens=float(batch.loss_mask[:, 1:].sum()), global_seqs=8.0, world_size=1
        )

    def adapters(model):
        with learner.gathered(model, stage):
            return {k: v.detach().clone() for k, v in learner.adapter_state(model).items()}

    torch.manual_seed(0)
    learner.init_distributed(rank, 1, "127.0.0.1", port, backend="gloo")
    cfg, model, tok, engine = build(seed=0)
    batch = _fixed_batch(tok)
    step(cfg, model, engine, batch)
    ckpt = os.path.join(out_dir, "ckpt")
    learner.save_checkpoint(engine, model, ckpt, rank=0, zero_stage=stage)
    saved = adapters(model)
    step(cfg, model, engine, batch)  # the straight run's second step
    straight = adapters(model)

    cfg2, model2, _, engine2 = build(seed=1)  # different A init: only a real load makes them equal
    fresh = adapters(model2)
    learner.load_checkpoint(engine2, ckpt)
    loaded = adapters(model2)
    step(cfg2, model2, engine2, batch)  # needs the optimizer's moments and step count to match
    resumed = adapters(model2)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    frozen_bytes = (
        sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if not p.requires_grad) * 4
    )
    torch.save(
        {
            "saved": saved,
            "straight": straight,
            "fresh": fresh,
            "loaded": loaded,
            "resumed": resumed,
            "trainable": trainable,
            "frozen_bytes": frozen_bytes,
        },
        os.path.join(out_dir, "result.pt"),
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_holds_the_trainable_state_and_a_fresh_learner_continues(tmp_path, stage):
    from gdpo.config import load_config
    from gdpo.policy import resolve_model_path

    path = resolve_model_path(load_config().model.path, load_config().sft, log=lambda m: None)
    port = sync_transport.free_port("127.0.0.1")
    mp.start_processes(_worker, args=(port, stage, path, str(tmp_path)), nprocs=1, join=True, start_method="spawn")
    res = torch.load(tmp_path / "result.pt")
    keys = sorted(res["saved"])
    assert keys and all(not torch.equal(res["fresh"][k], res["saved"][k]) for k in keys if "lora_A" in k)
    for k in keys:
        assert torch.equal(res["loaded"][k], res["saved"][k]), k
        assert torch.equal(res["resumed"][k], res["straight"][k]), k
    assert any(not torch.equal(res["straight"][k], res["saved"][k]) for k in keys)  # step 2 moved them

    ds_files = list((tmp_path / "ckpt" / "deepspeed").rglob("*.pt"))
    total = sum(f.stat().st_size for f in ds_files)
    assert total < 0.5 * res["frozen_bytes"], (total, res["frozen_bytes"])  # the base model is not in it
    module = torch.load(next(f for f in ds_files if "model_states" in f.name), weights_only=False)["module"]
    assert set(module) <= set(res["trainable"]), sorted(set(module) - set(res["trainable"]))[:3]
