"""The learner under real DeepSpeed (gloo, 2 ranks): one GDPO step gives the same policy with ZeRO-2 and ZeRO-3."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gdpo import sync_transport, weight_sync

pytestmark = pytest.mark.e2e


def _fixed_batch(tokenizer):
    from gdpo.records import RolloutBatch, TrainBatch

    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer.encode(f"Compute {a}+{b}-1\n") for a, b in [(3, 4), (9, 2), (5, 5), (1, 8)]]
    completions = [
        torch.randint(3, tokenizer.vocab_size, (int(n),), generator=g).tolist()
        for n in torch.randint(5, 20, (8,), generator=g)
    ]
    rb = RolloutBatch(
        prompt_ids=[prompts[i // 2] for i in range(8)],
        completion_ids=completions,
        completions=[""] * 8,
        finish_reasons=["stop"] * 8,
        sampling_logprobs=[[0.0] * len(c) for c in completions],
        group_ids=[i // 2 for i in range(8)],
        policy_version=0,
    )
    return TrainBatch.from_rollouts(rb, torch.randn(8, generator=g), tokenizer.pad_token_id)


def _worker(rank, world, port, stage, model_path, out_dir, adapter="dora"):
    from gdpo import learner, learner_sync
    from gdpo.config import load_config

    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            f"learner.adapter={adapter}",
            f"learner.zero_stage={stage}",
            f"learner.num_workers={world}",
            "learner.lr=1e-2",
            "learner.micro_batch_per_worker=2",
            "algorithm.kl_coef=0.05",
            # every tensor partitioned (the tiny policy's are all under DeepSpeed's default threshold): the
            # output layer gathered for the chunked log-probs, the adapters for the checksum
            "learner.zero3_param_persistence_threshold=0",
        ],
    )
    learner.init_distributed(rank, world, "127.0.0.1", port, backend="gloo")
    model, tok = learner.build_policy(model_path, cfg)
    engine = learner.make_engine(model, cfg)
    batch = _fixed_batch(tok)
    share = batch.slice(rank * 4, rank * 4 + 4)
    share = learner.attach_logprobs(model, share, cfg)
    tokens = float(batch.loss_mask[:, 1:].sum())
    before = learner.checksum_params(model, stage)  # collective under ZeRO-3
    sums = learner.train_step(engine, share, cfg, global_tokens=tokens, global_seqs=8.0, world_size=world)
    names = weight_sync.sync_module_names(model, cfg.learner.target_modules)
    msg = learner_sync.publish_weights(
        model, names, 1, rank=rank, zero_stage=stage, directory=out_dir, adapter=cfg.learner.syncs_adapter
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # rank 0's publish makes it; rank 1 may get here first
    Path(out_dir, f"checksums-{rank}").write_text(f"{before} {learner.checksum_params(model, stage)}")
    if rank == 0:
        torch.save({"grad_norm": sums.grad_norm, "path": msg.path}, os.path.join(out_dir, "result.pt"))


def _run(stage, model_path, out_dir, adapter="dora"):
    port = sync_transport.free_port("127.0.0.1")
    mp.start_processes(
        _worker, args=(2, port, stage, model_path, str(out_dir), adapter), nprocs=2, join=True, start_method="spawn"
    )

    res = torch.load(out_dir / "result.pt")
    # the adapter checksum (the cross-rank check) hashes whole tensors: equal on both ranks, moved by the step
    # (under ZeRO-3 a rank's own parameters are empty partitions, whose hash no step changes)
    (before0, after0), (before1, after1) = ((out_dir / f"checksums-{r}").read_text().split() for r in (0, 1))
    assert after0 == after1 and before0 == before1 and after0 != before0, stage
    path = Path(res["path"])
    return res["grad_norm"], load_file(str(path / weight_sync.ADAPTER_WEIGHTS if path.is_dir() else path))


def test_zero2_and_zero3_publish_the_same_policy(tmp_path):
    from gdpo.config import load_config
    from gdpo.policy import resolve_model_path

    path = resolve_model_path(load_config().model.path, load_config().sft, log=lambda m: None)
    norm2, w2 = _run(2, path, tmp_path / "z2")
    norm3, w3 = _run(3, path, tmp_path / "z3")
    assert sorted(w2) == sorted(w3) and len(w2) > 0
    base = load_file(str(next(Path(path).glob("*.safetensors"))))
    moved = max((w2[k] - base[k]).abs().max().item() for k in w2)
    worst = max((w2[k] - w3[k]).abs().max().item() for k in w2)
    print(
        f"ZeRO-2 vs ZeRO-3: max abs diff {worst:.2e}; the step moved weights by {moved:.2e}; "
        f"grad norms {norm2:.6f} / {norm3:.6f}"
    )
    assert moved > 1e-4, moved  # the step changed the policy, so agreement means something
    # The two stages sum gradients in different orders. Adam's first step is lr·g/(|g| + eps): for the few
    # adapter entries whose gradient is near zero, that order's last-bit noise moves the update by a share
    # of lr, and which entries those are depends on the CPU's float paths (AVX2-only EPYC: 81 of 1.05M merged
    # weights off by > 5e-6, worst 1.3e-5; AMX Xeon: worst < 1e-5). A real ZeRO-3 fault (a shard's gradient
    # lost, scaled or misplaced) moves most weights by a share of the step. So: the bulk agrees to 1e-6, and
    # no weight is off by 1% of the step's largest move.
    diffs = torch.cat([(w2[k] - w3[k]).abs().flatten() for k in w2])
    assert (diffs > 1e-6).float().mean().item() < 1e-3, int((diffs > 1e-6).sum())
    assert worst < 1e-2 * moved, (worst, moved)
    assert norm3 == pytest.approx(norm2, rel=1e-4)


def test_zero3_publishes_the_whole_lora_adapter(tmp_path):
    """An adapter sync under ZeRO-3 (every adapter tensor partitioned): rank 0 publishes each tensor whole,
    the same adapter ZeRO-2 publishes after the same step."""
    from gdpo.config import load_config
    from gdpo.policy import resolve_model_path

    path = resolve_model_path(load_config().model.path, load_config().sft, log=lambda m: None)
    norm2, a2 = _run(2, path, tmp_path / "z2", adapter="lora")
    norm3, a3 = _run(3, path, tmp_path / "z3", adapter="lora")
    assert sorted(a2) == sorted(a3) and all(".lora_A." in k or ".lora_B." in k for k in a2)
    assert all(a2[k].shape == a3[k].shape and a2[k].dim() == 2 for k in a2)  # whole, not [0] partitions
    assert max(a2[k].abs().max().item() for k in a2 if ".lora_B." in k) > 0  # the step moved B from 0
    # as for the merged weights above: the bulk agrees to 1e-6 (an entry whose gradient is near zero may take
    # another share of lr under the other summation order; a lost or misplaced shard moves whole rows)
    diffs = torch.cat([(a2[k] - a3[k]).abs().flatten() for k in a2])
    assert (diffs > 1e-6).float().mean().item() < 1e-3, int((diffs > 1e-6).sum())
    assert norm3 == pytest.approx(norm2, rel=1e-4)
