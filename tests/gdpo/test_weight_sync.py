"""The real weight path into vLLM: DoRA learner -> merged weights -> file or gloo broadcast -> reload_weights."""

import os
from pathlib import Path
import threading

import pytest
import torch

from gdpo import learner, learner_sync, rollout, sync_transport, weight_sync
from gdpo.config import load_config
from gdpo.logprob_head import Sampling
from gdpo.policy import resolve_model_path
from gdpo.records import SyncGroup, TrainBatch
from gdpo.weight_sync import SyncError


def _perturbed_policy(path, cfg, seed):
    model, tok = learner.build_policy(path, cfg)
    torch.manual_seed(seed)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)  # a policy clearly different from the base
    return model, tok


def _learner_logprobs(model, batch, pad_id, sampling=Sampling()):
    tb = TrainBatch.from_rollouts(batch, torch.zeros(len(batch)), pad_id)
    lp = learner.sequence_logprobs(model, tb, 8, sampling=sampling)  # [N, L-1]
    return [lp[i][tb.loss_mask[i, 1:] > 0] for i in range(len(batch))]


def _worst(engine_lp, learner_lp):
    return max((torch.tensor(e) - l).abs().max().item() for e, l in zip(engine_lp, learner_lp))


class _Background(threading.Thread):
    """Run one engine call while this thread plays learner rank 0 (both sides block until the other acts)."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self.error = err

    def get(self):
        self.join(120)
        assert not self.is_alive(), "the engine call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def _broadcast(llm, tensors, version, *, expect=None, corrupt_call=None, adapter_config=None):
    """Learner 0's side here, the engine's in vLLM's worker: open a group, send ``version`` (the engine expects
    ``expect``, default the same; ``adapter_config``: an adapter sync), close. Returns what the engine's
    receive returned or raised."""
    listen = sync_transport.listen_socket("127.0.0.1")
    spec = SyncGroup(
        "gloo",
        "127.0.0.1",
        listen.getsockname()[1],
        2,
        f"e2e-{version}-{expect}",
        60.0,
        64 << 10,
        weight_sync.manifest_of(tensors),
        adapter_config,
    )
    opened = _Background(weight_sync.engine_open, llm, spec, 1)
    comm = sync_transport.open_comm(spec, 0, "cpu", listen)
    assert opened.get() == [1]
    received = _Background(weight_sync.engine_receive, llm, expect if expect is not None else version)
    sender = comm
    if corrupt_call is not None:
        from tests.gdpo.test_weight_sync_protocol import _Corrupting

        sender = _Corrupting(comm, corrupt_call)
    weight_sync.publish(tensors, version, 64 << 10, comm=sender)
    try:
        return received.get()
    except Exception as err:  # noqa: BLE001 - the caller checks it
        return err
    finally:
        weight_sync.engine_close(llm)
        comm.close()


@pytest.fixture(scope="module")
def engine():
    """One engine for this module's tests (each ends with the engine back on the base checkpoint). It runs
    in processes of its own (``rollout.in_process=false``, the GPU default): every other engine in the
    suite is in-process, so this module keeps the weight sync checked across vLLM's process boundary."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = load_config(None, ["rollout.in_process=false"])
    path = resolve_model_path(cfg.model.path, cfg.sft, log=lambda m: None)
    llm = rollout.make_engine(path, cfg)
    yield llm, cfg, path
    rollout.close_engine(llm)


@pytest.mark.e2e
def test_rollout_engine_matches_learner_after_a_file_or_broadcast_sync(engine, tmp_path):
    llm, cfg, path = engine
    engine_cfg = llm.llm_engine.vllm_config.model_config
    assert engine_cfg.enforce_eager and engine_cfg.max_model_len == 256  # CPU: eager; the model's whole context
    assert type(llm.llm_engine.engine_core).__name__ == "SyncMPClient"  # the engine core in its own process
    batch = rollout.generate(llm, ["Compute 3+4-2\n", "Compute 9-1+5\n"], 4, max_new_tokens=64, temperature=1.0, seed=3)
    assert batch.group_ids == [0] * 4 + [1] * 4 and len(batch.sampling_logprobs[0]) == len(batch.completion_ids[0])

    model, tok = _perturbed_policy(path, cfg, 0)
    names = weight_sync.sync_module_names(model, cfg.learner.target_modules)
    learner_lp = _learner_logprobs(model, batch, tok.pad_token_id)
    stale = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    msg = learner_sync.publish_weights(model, names, 1, directory=str(tmp_path))
    with pytest.raises(rollout.StalePolicyError, match="holds policy version 0, the driver expects 1"):
        rollout.generate_checked(llm, 1, ["Compute 1+1\n"], 2, max_new_tokens=8, temperature=1.0)
    bad = type(msg)(**{**msg.__dict__, "checksum": "0" * 64})
    with pytest.raises(Exception, match="corrupt"):
        weight_sync.engine_load_file(llm, bad)
    assert rollout.engine_version(llm) == 0  # refused before anything was loaded
    weight_sync.engine_load_file(llm, msg)
    assert rollout.engine_version(llm) == 1
    fresh = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(fresh, learner_lp) < 1e-3, _worst(fresh, learner_lp)
    assert _worst(stale, learner_lp) > 1e-2  # the check can fail: before the sync the engine disagrees

    # the broadcast path: the same engine-side code a remote engine runs, here over loopback gloo
    model2, _ = _perturbed_policy(path, cfg, 1)
    tensors = weight_sync.sync_tensors(model2, names)
    learner_lp2 = _learner_logprobs(model2, batch, tok.pad_token_id)
    refused = _broadcast(llm, tensors, 2, expect=3)
    assert isinstance(refused, SyncError) and "expected policy version 3" in str(refused)
    assert rollout.engine_version(llm) == 1  # nothing loaded: still the intact version 1
    assert _worst(rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids), learner_lp) < 1e-3

    torn = _broadcast(llm, tensors, 2, corrupt_call=2 + 2 * 3)  # bucket 3 damaged in flight
    assert isinstance(torn, SyncError) and "bucket 3 of" in str(torn)
    assert rollout.engine_version(llm) == weight_sync.TORN
    with pytest.raises(rollout.StalePolicyError, match="torn policy"):
        rollout.generate_checked(llm, 2, ["Compute 1+1\n"], 2, max_new_tokens=8, temperature=1.0)

    assert _broadcast(llm, tensors, 2) == 2
    assert rollout.engine_version(llm) == 2
    after = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(after, learner_lp2) < 1e-3, _worst(after, learner_lp2)
    assert _worst(after, learner_lp) > 1e-2

    # a whole checkpoint from its directory (evaluation reuses one engine across checkpoints): the base again
    with pytest.raises(SyncError, match=r"empty holds no \*\.safetensors weight files"):
        weight_sync.engine_load_checkpoint(llm, str((tmp_path / "empty").mkdir() or tmp_path / "empty"))
    assert weight_sync.engine_load_checkpoint(llm, path) == 0 and rollout.engine_version(llm) == 0
    base_lp = _learner_logprobs(learner.build_policy(path, cfg)[0], batch, tok.pad_token_id)
    back = rollout.sequence_logprobs(llm, batch.prompt_ids, batch.completion_ids)
    assert _worst(back, base_lp) < 1e-3, _worst(back, base_lp)
    assert _worst(back, learner_lp2) > 1e-2


@pytest.mark.e2e
def test_after_a_sync_cached_prompt_blocks_are_not_reused(engine, tmp_path):
    """A prompt longer than one KV block is cached by vLLM's prefix cache; after a sync its continuation
    must come from the new weights (the sampler's log-probs equal the learner's), not the old KV."""
    llm, cfg, path = engine
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.enable_prefix_caching
    prompt = "Compute " + "+".join(str(d) for d in [3, 4, 2, 7, 1, 9, 3, 2, 8, 5] * 9) + "\n"
    assert len(llm.get_tokenizer().encode(prompt)) > cache.block_size + 8  # at least one full, cacheable block
    rollout.generate(llm, [prompt], 2, max_new_tokens=16, temperature=1.0, seed=1)  # caches the prompt's blocks

    model, tok = _perturbed_policy(path, cfg, 0)
    assert (
        _broadcast(
            llm, weight_sync.sync_tensors(model, weight_sync.sync_module_names(model, cfg.learner.target_modules)), 1
        )
        == 1
    )
    batch = rollout.generate(llm, [prompt], 2, max_new_tokens=16, temperature=1.0, seed=1)
    worst = _worst(batch.sampling_logprobs, _learner_logprobs(model, batch, tok.pad_token_id))
    assert worst < 1e-3, worst
    weight_sync.engine_load_checkpoint(llm, path)  # the base again, for the module's next test


# ----------------------------------------------------------------------------- node-local weight files


def test_weight_dirs_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    monkeypatch.setenv("GDPO_NODE_LOCAL_DIR", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    for name, owner in (
        ("dead", f"{host} {dead_pid}"),
        ("live", f"{host} {os.getpid()}"),
        ("elsewhere", f"other-host {dead_pid}"),
    ):
        d = tmp_path / f"gdpo-weights-{name}-x"
        d.mkdir()
        (d / "owner").write_text(owner)
        (d / "policy-v3.safetensors").write_bytes(b"0" * 100)
    fresh = sync_transport.make_weights_dir("run1")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "gdpo-weights-dead-x" not in left
    assert {"gdpo-weights-live-x", "gdpo-weights-elsewhere-x"} <= set(left)
    assert (os.stat(fresh).st_mode & 0o777) == 0o700
    assert (Path(fresh) / "owner").read_text() == f"{host} {os.getpid()}"


def test_a_full_node_local_dir_is_a_named_error_before_writing(tmp_path):
    with pytest.raises(weight_sync.SyncError, match="GDPO_NODE_LOCAL_DIR.*--shm-size"):
        sync_transport.check_free_space(str(tmp_path), 1 << 60)


@pytest.mark.e2e
@pytest.mark.parametrize("chunk", [1024, 0])
def test_sampler_and_learner_log_probs_are_of_one_processed_distribution(engine, chunk):
    """At temperature 0.7 and top-p 0.9 the engine reports the log-probs of the distribution it sampled from,
    and the learner (chunked head or full logits) computes the same ones; the raw policy's differ."""
    llm, cfg, path = engine
    prompts = ["Compute 3+4-2\n", "Compute 9-1+5\n", "Compute 8-3-1\n"]
    batch = rollout.generate(llm, prompts, 4, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=11)
    model, tok = learner.build_policy(path, load_config(None, [f"learner.logprob_chunk_tokens={chunk}"]))
    assert rollout.engine_version(llm) == 0  # the base, which the fresh adapters reproduce
    same = _learner_logprobs(model, batch, tok.pad_token_id, Sampling(0.7, 0.9))
    raw = _learner_logprobs(model, batch, tok.pad_token_id)
    assert _worst(batch.sampling_logprobs, same) < 1e-4, _worst(batch.sampling_logprobs, same)
    assert _worst(batch.sampling_logprobs, raw) > 0.05  # the learner's raw policy is another distribution
