"""The driver's weight-sync bookkeeping (actors/sync.py) when an engine dies mid-sync: which engines
are re-sent the version and over which transport. Small Ray actors stand in for the learner and the
engines (the protocol itself is tested on real vLLM and DeepSpeed in tests/actors/test_two_hosts.py);
what is under test here is the retry logic, with real Ray calls, deaths and timeouts."""

import os

import pytest

from gdpo.records import WeightUpdate

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Learner:
    """Learner rank 0 on node "A": records what it was asked to publish."""

    def __init__(self):
        self.calls, self.group = [], None

    def node(self):
        return "A", "127.0.0.1"

    def sync_endpoint(self):
        return "127.0.0.1", 1

    def open_sync_group(self, spec):
        self.group = spec.tag

    def close_sync_group(self):
        self.group = None

    def publish(self, version, to_file, broadcast, resend=False):
        self.calls.append((version, to_file, broadcast, self.group))
        return WeightUpdate(version=version, num_bytes=1, path="/dev/shm/w" if to_file else None)

    def log(self):
        return self.calls


@ray.remote(num_cpus=0)
class Engine:
    def __init__(self, node, dies_on_receive=False):
        self.where, self.dies, self.received = node, dies_on_receive, []

    def node(self):
        return self.where

    def sync_open(self, spec, rank_offset):
        return [rank_offset]

    def receive_weights(self, version):
        if self.dies:
            os._exit(1)  # the process is gone, as when its host goes down
        self.received.append(version)
        return version

    def versions(self):
        return self.received


@pytest.mark.parametrize("new_node, transport", [("A", "file"), ("C", "collective")])
def test_an_engine_that_dies_in_the_sync_is_replaced_and_sent_the_version(local_ray, new_node, transport):
    """Engine 1 (node B, on the broadcast) dies receiving version 2; its replacement starts on
    ``new_node``. The retry must send version 2 to it: through the file on learner 0's node (A), else
    over a new broadcast group. (The replacement moving to A used to fail the sync: the first
    attempt's failure was carried into the retry, which then sent nothing.)"""
    from actors.sync import EngineSync
    from gdpo.config import load_config

    cfg = load_config(None, ["cluster.sync_timeout_s=30"])
    learner = Learner.remote()
    rollouts = [Engine.remote("A"), Engine.remote("B", dies_on_receive=True)]
    sync = EngineSync(cfg, [learner], manifest=[], run_id="t", backend="gloo", workers_per_engine=1, log=print)
    for i, r in enumerate(rollouts):
        sync.place(i, r, shares_learner0_device=False)
    assert (sync.file_engines(), sync.members()) == ([0], [1])

    def replace(i):
        rollouts[i] = Engine.remote(new_node)
        sync.place(i, rollouts[i], shares_learner0_device=False)

    update = sync.publish(2, rollouts, replace)

    assert update.version == 2
    assert sync.transport[1] == transport
    calls = ray.get(learner.log.remote())
    assert calls[-1][:2] == (2, True)  # the retry published version 2, with the file for engine 0
    assert calls[-1][2] == (transport == "collective")  # and broadcast it only where an engine is on the group
    assert ray.get(rollouts[1].versions.remote()) == ([2] if transport == "collective" else [])
