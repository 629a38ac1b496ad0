"""The rollout engine's process layout on CPU: vLLM's engine core and worker run in the calling process
(``rollout.in_process``, default on CPU), with ``rollout.cpu_threads`` torch threads. The other layout
(separate processes, the GPU default) is the engine of tests/gdpo/test_weight_sync.py."""

import os
import threading

import pytest
import torch

from gdpo import rollout
from gdpo.config import load_config
from gdpo.policy import resolve_model_path

pytestmark = pytest.mark.e2e


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.add(int(pid))
    return out


def test_an_in_process_engine_starts_serves_from_a_thread_and_leaves_nothing_behind():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(2)  # the engine must set its own count, whatever the process had
    cfg = load_config(None, ["rollout.num_workers=2"])
    path = resolve_model_path(cfg.model.path, cfg.sft, log=lambda m: None)
    threads = torch.get_num_threads()
    before = _children()
    got = {}

    def run():  # a thread that is not the main one, as a Ray actor's task or `gdpo compare`'s evaluation
        try:
            llm = rollout.make_engine(str(path), cfg)
            got["client"] = type(llm.llm_engine.engine_core).__name__
            got["threads"] = torch.get_num_threads()
            got["children"] = _children() - before
            got["batch"] = rollout.generate(llm, ["Compute 3+4-2\n"], 2, max_new_tokens=16, temperature=1.0, seed=1)
            rollout.close_engine(llm)
        except Exception as err:  # noqa: BLE001 - reported below
            got["error"] = err

    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(timeout=300)
        assert not worker.is_alive() and "error" not in got, got.get("error")
        assert got["client"] == "InprocClient" and got["children"] == set()  # no engine-core or worker process
        assert got["threads"] == max(1, (os.cpu_count() or 1) // 2)  # the machine's cores / rollout.num_workers
        assert len(got["batch"].completion_ids) == 2 and all(got["batch"].completion_ids)
        assert not torch.distributed.is_initialized()  # vLLM's world of one is gone: a learner can start here
        torch.set_num_threads(3)  # vLLM's worker replaces it with a no-op in its process: restored for the caller
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
