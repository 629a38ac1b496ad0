"""The weight-sync protocol without vLLM: buckets, checksums, transports, the weight file, and the
broadcast between real processes over gloo (each receiver also holding its own default
torch.distributed world, as DeepSpeed and vLLM processes do)."""

import dataclasses
import hashlib
import multiprocessing as mp
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gdpo import sync_transport, weight_sync
from gdpo.records import SyncGroup
from gdpo.weight_sync import SyncError, SyncTensor
from tests.gdpo.test_learner_sync import _adapted_lm

NAMES = ("q_proj", "v_proj", "down_proj")


def _tensors(model):
    return weight_sync.sync_tensors(model, weight_sync.sync_module_names(model, NAMES))


# ----------------------------------------------------------------------------- pure pieces


def test_plan_is_deterministic_aligned_and_sends_an_oversize_tensor_alone():
    man = [("a", "float32", [3]), ("b", "bfloat16", [5]), ("c", "float32", [1000]), ("d", "float32", [2])]
    buckets = weight_sync.plan(man, 64)
    assert buckets == weight_sync.plan(man, 64)
    assert [[e[0] for e in b.entries] for b in buckets] == [[0, 1], [2], [3]]  # c (4000 B) > 64 B: alone
    assert buckets[0].entries == ((0, 0, 12), (1, 16, 10))  # b starts at a 16-byte boundary
    assert all(b.size % weight_sync.WIRE_ALIGN == 0 and b.size >= b.entries[-1][1] + b.entries[-1][2] for b in buckets)
    assert len(weight_sync.plan(man, 1)) == 4 and len(weight_sync.plan(man, 1 << 20)) == 1


def test_bucket_checksum_sees_a_flipped_byte_and_moved_words():
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (3 * 4096,), dtype=torch.uint8, generator=g)
    ref = weight_sync.bucket_checksum(buf)
    flipped = buf.clone()
    flipped[5000] ^= 1
    words = buf.clone().view(torch.int64)
    words[[7, 1000]] = words[[1000, 7]]  # two words swapped: the plain sum cannot see it
    rows = buf.clone().view(torch.int64).view(-1, 512)
    rows[[0, 2]] = rows[[2, 0]]  # two rows swapped
    assert not torch.equal(weight_sync.bucket_checksum(flipped), ref)
    assert weight_sync.bucket_checksum(words.view(torch.uint8))[0] == ref[0]
    assert not torch.equal(weight_sync.bucket_checksum(words.view(torch.uint8)), ref)
    assert not torch.equal(weight_sync.bucket_checksum(rows.view(-1).view(torch.uint8)), ref)


def test_fingerprint_changes_with_any_name_dtype_or_shape():
    man = weight_sync.manifest_of(_tensors(_adapted_lm()))
    prints = {weight_sync.fingerprint(man)}
    for k, value in ((0, "other.weight"), (1, "bfloat16"), (2, [1, 2])):
        changed = [list(e) for e in man]
        changed[3][k] = value
        prints.add(weight_sync.fingerprint(changed))
    assert len(prints) == 4 and all(0 <= p < 2**63 for p in prints)
    assert weight_sync.fingerprint([list(e) for e in man]) == weight_sync.fingerprint(man)  # JSON round trip


def test_transports_by_node_and_mode():
    nodes, shared = ["A", "B", "A"], [True, False, False]
    assert weight_sync.choose_transports("auto", "A", nodes, shared) == ["file", "collective", "file"]
    assert weight_sync.choose_transports("collective", "A", nodes, shared) == ["file", "collective", "collective"]
    assert weight_sync.choose_transports("file", "A", ["A", "A"], [False, False]) == ["file", "file"]
    with pytest.raises(SyncError, match="rollout worker 1 runs on node B.*cluster.weight_sync=auto"):
        weight_sync.choose_transports("file", "A", nodes, shared)


@pytest.mark.parametrize("bucket_bytes", [1, 5000, 1 << 24])
def test_weight_file_is_a_safetensors_file_of_the_merged_weights(tmp_path, bucket_bytes):
    model = _adapted_lm()
    names = weight_sync.sync_module_names(model, NAMES)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "down_proj"}  # k: stack mate
    path, digest, size = weight_sync.publish(_tensors(model), 3, bucket_bytes, directory=str(tmp_path))
    data = open(path, "rb").read()
    assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    expected = weight_sync.merged_weights(model, names)
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.base_layer.weight
    )  # merged, not the base
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"policy_version": "3"}
        assert sorted(k for k, _ in sync_transport.read_file(f, path, 3, digest)) == sorted(expected)
        with pytest.raises(SyncError, match="holds policy version 3, expected 4"):
            sync_transport.read_file(f, path, 4, digest)
        with pytest.raises(SyncError, match="corrupt"):
            sync_transport.read_file(f, path, 3, "0" * 64)


def test_publish_replaces_the_previous_version_and_weights_dirs_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("GDPO_NODE_LOCAL_DIR", str(tmp_path))
    directory = sync_transport.make_weights_dir("run1")
    assert os.path.dirname(directory) == str(tmp_path) and os.stat(directory).st_mode & 0o077 == 0
    assert sync_transport.make_weights_dir("run1") != directory  # never an existing (or planted) directory
    model = _adapted_lm(dtype=torch.bfloat16)
    tensors = weight_sync.sync_tensors(model, weight_sync.sync_module_names(model, ("q_proj",)))
    first = weight_sync.publish(tensors, 1, 1 << 20, directory=directory)
    second = weight_sync.publish(tensors, 2, 1 << 20, directory=directory)
    assert sorted(os.listdir(directory)) == ["owner", "policy-v2.safetensors"]  # owner: host and pid
    assert second[2] == os.path.getsize(second[0]) and second[1] != first[1]  # the header carries the version
    assert len(tensors) == 12  # q and its stack mates k, v: weight + bias, 2 layers
    assert load_file(second[0])["model.layers.1.self_attn.k_proj.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- over gloo, between processes


def _receiver(inbox, outbox) -> None:
    import torch.distributed as dist

    # this process's own default world (DeepSpeed's or vLLM's in real use); the sync group is beside it
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{sync_transport.free_port('127.0.0.1')}", rank=0, world_size=1
    )
    while (job := inbox.get()) is not None:
        spec = SyncGroup(**job["spec"])
        comm = sync_transport.open_comm(spec, job["rank"], "cpu")
        got = []
        try:
            incoming = weight_sync.receive(
                comm, job.get("manifest", spec.manifest), job["version"], spec.bucket_bytes, "cpu"
            )
            if job.get("fail") == "die":
                next(iter(incoming))  # the header and the first bucket arrived; then the process is gone
                os._exit(1)
            if job.get("fail") == "stall":
                time.sleep(120)  # alive, holding its connection, reading nothing
            got = [(name, t.clone()) for name, t in incoming]
            incoming.check()
            outbox.put(("ok", got))
        except SyncError as err:
            outbox.put(("refused", str(err), [n for n, _ in got]))
        comm.close()


class _Corrupting:
    """The sender's comm with one broadcast's bytes damaged in flight (the sender's checksum is of the original)."""

    def __init__(self, inner, call: int):
        self.inner, self.call, self.n = inner, call, 0

    def broadcast(self, t, src=0):
        if self.n == self.call:
            t = t.clone()
            t[len(t) // 2] ^= 0x40
        self.n += 1
        self.inner.broadcast(t, src)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def receivers():
    ctx = mp.get_context("spawn")
    boxes = [(ctx.Queue(), ctx.Queue()) for _ in range(2)]
    procs = [ctx.Process(target=_receiver, args=box, daemon=True) for box in boxes]
    for p in procs:
        p.start()
    yield procs, boxes
    for p, (inbox, _) in zip(procs, boxes):
        if p.is_alive():
            inbox.put(None)
            p.join(10)
        if p.is_alive():
            p.kill()


def _round(receivers, tensors, version, bucket_bytes, *, timeout_s=60.0, jobs=None, sender=None, who=(0, 1)):
    """One version from this process (rank 0) to receivers ``who`` (``jobs[r]`` overrides what receiver r
    expects or makes it fail); returns (what publish returned or raised, the receivers' replies, seconds)."""
    procs, boxes = receivers
    jobs = jobs or {}
    listen = sync_transport.listen_socket("127.0.0.1")
    spec = SyncGroup(
        "gloo",
        "127.0.0.1",
        listen.getsockname()[1],
        1 + len(who),
        f"t{time.monotonic_ns()}",
        timeout_s,
        bucket_bytes,
        weight_sync.manifest_of(tensors),
    )
    for rank, r in enumerate(who, start=1):
        boxes[r][0].put({"spec": dataclasses.asdict(spec), "rank": rank, "version": version, **jobs.get(r, {})})
    comm = sync_transport.open_comm(spec, 0, "cpu", listen)
    t0 = time.monotonic()
    try:
        sent = weight_sync.publish(tensors, version, bucket_bytes, comm=sender(comm) if sender else comm)
    except SyncError as err:
        sent = err
    elapsed = time.monotonic() - t0
    comm.close()
    replies = [boxes[r][1].get(timeout=60) for r in who if not jobs.get(r, {}).get("fail")]
    return sent, replies, elapsed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_broadcast_is_bit_exact_for_any_bucket_size(receivers, dtype):
    model = _adapted_lm(seed=1, dtype=dtype)
    tensors = _tensors(model)
    expected = weight_sync.merged_weights(model, weight_sync.sync_module_names(model, NAMES))
    for bucket_bytes in (1, 5000, 1 << 24):
        sent, replies, _ = _round(receivers, tensors, 7, bucket_bytes)
        assert sent[2] == sum(t.nbytes for t in tensors)
        for status, got in replies:
            assert status == "ok"
            assert [n for n, _ in got] == [t.name for t in tensors]  # send order
            for name, t in got:
                assert t.dtype == dtype and torch.equal(t, expected[name]), (bucket_bytes, name)


def test_a_tensor_larger_than_a_tens_of_mib_bucket(receivers):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(2560, 4096, generator=g)  # 40 MiB, over the 32 MiB bucket
    small = torch.randn(7, 3, generator=g).to(torch.bfloat16)
    tensors = [
        SyncTensor("small.weight", (7, 3), torch.bfloat16, lambda: small),
        SyncTensor("big.weight", tuple(big.shape), torch.float32, lambda: big),
        SyncTensor("tail.bias", (7,), torch.bfloat16, lambda: small[:, 0].contiguous()),
    ]
    sent, replies, _ = _round(receivers, tensors, 1, 32 << 20)
    for status, got in replies:
        assert status == "ok"
        got = dict(got)
        assert torch.equal(got["big.weight"], big) and torch.equal(got["small.weight"], small)
        assert torch.equal(got["tail.bias"], small[:, 0])


def test_a_stale_version_or_another_manifest_is_refused_before_anything_is_loaded(receivers):
    tensors = _tensors(_adapted_lm(seed=3))
    other = [list(e) for e in weight_sync.manifest_of(tensors)]
    other[0][2] = [1, 1]
    sent, replies, _ = _round(receivers, tensors, 5, 5000, jobs={0: {"version": 6}, 1: {"manifest": other}})
    assert sent[2] > 0  # the sender finished: refusing receivers drain the version in step
    (status0, message0, loaded0), (status1, message1, loaded1) = replies
    assert status0 == "refused" and "expected policy version 6, the sender sent version 5" in message0
    assert status1 == "refused" and "manifest differs" in message1
    assert loaded0 == loaded1 == [] and "nothing was loaded" in message0
    sent, replies, _ = _round(receivers, tensors, 6, 5000)  # and the next version arrives whole
    assert [status for status, _ in replies] == ["ok", "ok"]


@pytest.mark.parametrize("bucket", [0, 2])
def test_a_corrupt_bucket_is_refused_and_nothing_after_it_loads(receivers, bucket):
    model = _adapted_lm(seed=4)
    tensors = _tensors(model)
    per_bucket = [len(b.entries) for b in weight_sync.plan(weight_sync.manifest_of(tensors), 5000)]
    sent, replies, _ = _round(receivers, tensors, 9, 5000, sender=lambda c: _Corrupting(c, 2 + 2 * bucket))
    assert sent[2] > 0
    for status, message, loaded in replies:
        assert status == "refused" and f"bucket {bucket} of" in message and "corrupt" in message
        assert len(loaded) == sum(per_bucket[:bucket])  # buckets before the damaged one, none from it on
    sent, replies, _ = _round(receivers, tensors, 10, 5000)  # the group is still in step for the next version
    assert all(status == "ok" for status, _ in replies)


@pytest.mark.parametrize("fail", ["die", "stall"])
def test_a_receiver_that_dies_or_stalls_fails_the_sender_within_the_timeout(receivers, fail):
    model = _adapted_lm(seed=5)
    tensors = _tensors(model)
    procs, _ = receivers
    victim = 1 if fail == "die" else 0
    # 1-byte buckets: many small broadcasts, so the sender is mid-stream when the receiver goes
    sent, _, elapsed = _round(receivers, tensors, 11, 1, timeout_s=8.0, jobs={victim: {"fail": fail}}, who=(victim,))
    assert isinstance(sent, SyncError), sent
    assert "broadcast of policy version 11 failed" in str(sent) and "receiver left the group" in str(sent)
    assert elapsed < 8.0 + 10, elapsed
    if fail == "stall":
        procs[victim].kill()
    procs[victim].join(10)
    assert not procs[victim].is_alive()
