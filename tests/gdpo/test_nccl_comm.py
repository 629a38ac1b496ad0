"""``NcclComm`` (the GPU broadcast) gives NCCL's resources back when its group closes: every engine
replacement or catch-up opens a new group, and a dropped communicator stays allocated on learner 0's GPU
and on the engine's. vLLM's communicator needs a GPU, so it is replaced here by a recorder of the calls."""

import torch

from gdpo import sync_transport
from gdpo.records import SyncGroup


class _Communicator:
    made: list = []

    def __init__(self, group, device):
        self.group, self.device, self.destroyed = group, device, 0
        self.disabled, self.available = False, True
        _Communicator.made.append(self)

    def destroy(self):
        self.destroyed += 1


def test_closing_an_nccl_group_destroys_its_communicator(monkeypatch):
    import vllm.distributed.device_communicators.pynccl as pynccl
    import vllm.distributed.utils as vutils

    monkeypatch.setattr(pynccl, "PyNcclCommunicator", _Communicator)
    monkeypatch.setattr(vutils.StatelessProcessGroup, "create", staticmethod(lambda **kw: kw))
    spec = SyncGroup("nccl", "127.0.0.1", 1, 2, "t", 5.0, 1 << 20, [])
    comm = sync_transport.open_comm(spec, 0, torch.device("cpu"))
    made = _Communicator.made[-1]
    comm.close()
    comm.close()  # twice (a group closed by the learner and again at shutdown): destroyed once
    assert made.destroyed == 1 and comm.comm is None
