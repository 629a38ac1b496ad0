"""The learner's model on a device its batches are not on: the driver builds every ``TrainBatch`` on its
CPU, the learner's model lives on a GPU. Under PyTorch's fake tensor mode the model sits on another device
(``meta``: this CPU-only build cannot index fake ``cuda`` tensors) and any op that meets a CPU tensor and a
model tensor raises ``FakeTensorDeviceMismatchError``, as CUDA would."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gdpo import learner, learner_sync
from gdpo.config import load_config
from tests.gdpo.test_learner_zero import _fixed_batch
from tests.helpers.chat_model import build_chat_model

DEVICE = torch.device("meta")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_chat_model(tmp_path_factory.mktemp("m") / "m"))


@pytest.fixture(params=[1024, 0], ids=["chunked-logprobs", "full-logits"])
def policy(model_path, request):
    cfg = load_config(
        None,
        [
            "learner.micro_batch_per_worker=3",
            "algorithm.kl_coef=0.05",
            f"learner.logprob_chunk_tokens={request.param}",
            "rollout.temperature=0.7",  # the sampler's processing (temperature, nucleus) runs on the device too
            "rollout.top_p=0.9",
        ],
    )
    model, tok = learner.build_policy(model_path, cfg)
    batch = _fixed_batch(tok)  # on the CPU, as the driver builds it
    return cfg, model, batch


def _on_device(model, mode):
    model.set_attn_implementation("eager")  # sdpa's mask shortcut reads a value (.item()), which no fake has
    with mode:
        return model.to_empty(device=DEVICE)


def test_update_moves_each_micro_batch_to_the_models_device(policy):
    cfg, model, batch = policy
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    engine = learner.PlainEngine(_on_device(model, mode), cfg)
    tokens = float(batch.loss_mask[:, 1:].sum())
    sums, on_device = learner.accumulate_gradients(  # host work stays real; the model's ops run fake
        engine, batch, cfg, global_tokens=tokens, global_seqs=float(len(batch)), world_size=1
    )
    assert on_device.device == DEVICE and on_device.shape == (len(learner._DEVICE_SUMS),)
    assert all(p.grad is not None and p.grad.device == DEVICE for p in engine.params)
    assert sums.tokens == tokens and sums.forward_tokens == float(batch.attention_mask.sum())  # host counts
    assert batch.input_ids.device.type == "cpu"  # the driver's batch is left where it was


def test_logprob_passes_run_on_the_models_device_and_return_to_the_batchs(policy):
    cfg, model, batch = policy
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    on_device = _on_device(model, mode)
    out = learner.attach_logprobs(on_device, batch, cfg)  # kl_coef > 0: the reference pass (adapters off)
    assert out.ref_logprobs.device.type == "cpu"
    assert out.ref_logprobs.shape == (len(batch), batch.input_ids.shape[1] - 1)
    assert learner.sequence_logprobs(on_device, batch, micro=2).device.type == "cpu"


def test_plain_engine_step_on_cpu_reports_the_clipped_norm(policy):
    cfg, model, batch = policy
    engine = learner.PlainEngine(model, cfg)
    tokens = float(batch.loss_mask[:, 1:].sum())
    sums = learner.train_step(engine, batch, cfg, global_tokens=tokens, global_seqs=float(len(batch)), world_size=1)
    assert isinstance(sums.grad_norm, float) and sums.grad_norm > 0
    assert isinstance(sums.loss, float) and sums.entropy_tokens > 0 and sums.tokens == tokens


@pytest.mark.parametrize(
    "sleep_level, device, released", [(1, "cuda", 1), (2, "cuda", 1), (0, "cuda", 0), (1, "cpu", 0)]
)
def test_the_update_hands_freed_gpu_memory_back_before_sleeping_engines_wake(
    monkeypatch, sleep_level, device, released
):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    cfg = load_config(None, [f"rollout.sleep_level={sleep_level}"])
    model = torch.nn.Module()
    with FakeTensorMode():  # allocated, not moved or initialized: a fake "cuda" parameter on this CPU
        model.weight = torch.nn.Parameter(torch.empty(2, 2, device=device))
    learner.release_cached_memory(model, cfg)
    assert len(calls) == released


def test_publish_broadcasts_from_the_models_device(policy):
    from gdpo import weight_sync

    cfg, model, _ = policy
    on_device = _on_device(model, FakeTensorMode(allow_non_fake_inputs=True))
    sent = []

    class Recording:  # the broadcast group's rank 0 end: what NCCL would be handed
        def broadcast(self, tensor, src=0):
            sent.append(tensor.device)

    names = weight_sync.sync_module_names(on_device, cfg.learner.target_modules)
    msg = learner_sync.publish_weights(on_device, names, 1, comm=Recording(), bucket_mb=1)
    assert msg.broadcast and msg.num_bytes > 0 and msg.path is None
    assert len(sent) >= 4 and set(sent) == {DEVICE}  # header, sizes, then each bucket and its checksum


def test_an_adapter_sync_broadcasts_from_the_models_device(model_path):
    """``learner.adapter=lora``: the adapter's tensors go out from the device the LoRA layers live on."""
    cfg = load_config(None, ["learner.adapter=lora"])
    model, _ = learner.build_policy(model_path, cfg)
    on_device = _on_device(model, FakeTensorMode(allow_non_fake_inputs=True))
    sent = []

    class Recording:
        def broadcast(self, tensor, src=0):
            sent.append(tensor.device)

    msg = learner_sync.publish_weights(on_device, [], 1, comm=Recording(), bucket_mb=1, adapter=True)
    assert msg.adapter and msg.broadcast and msg.path is None
    assert all(".lora_A." in n or ".lora_B." in n for n in msg.names) and msg.names
    assert len(sent) >= 4 and set(sent) == {DEVICE}
