"""vLLM worker extension: the engine end of the weight sync (``gdpo.weight_sync`` holds the protocol).

Mixed into vLLM's worker class (``LLM(..., worker_extension_cls="gdpo.vllm_ext.WeightSyncExtension")``)
and called through ``llm.collective_rpc``; method names carry a ``gdpo_`` prefix because vLLM
refuses an extension attribute that its worker already has. Only metadata crosses the RPC (tensors
passed as RPC arguments arrive mangled on the CPU backend): the weights come from a file or from
the broadcast group.
"""

from __future__ import annotations

from gdpo import sync_transport, weight_sync
from gdpo.records import SyncGroup


class WeightSyncExtension:
    gdpo_policy_version: int = 0
    gdpo_policy_adapter: str | None = None  # the adapter directory of the policy LoRA this worker serves
    _gdpo_group = None  # (comm, spec) while this worker is in a broadcast group
    _gdpo_lora_root: str | None = None  # where adapters that arrive over the broadcast are written

    def _gdpo_load(self, version: int, weights) -> int:
        """Load ``weights`` as ``version``. The reload always runs to its end; an ``Incoming`` stream that was
        cut raises afterwards, and the worker is then torn unless nothing went in."""
        held = self.gdpo_policy_version
        self.gdpo_policy_version = weight_sync.TORN
        weight_sync.load_into_worker(self, weights)
        if isinstance(weights, weight_sync.Incoming):
            try:
                weights.check()
            except weight_sync.SyncError:
                if weights.loaded == 0:  # every layer was put back as it was
                    self.gdpo_policy_version = held
                raise
        self._gdpo_drop_adapter()  # merged weights are the whole policy
        self.gdpo_policy_version = version
        return version

    def gdpo_load_file(self, path: str, version: int, checksum: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:  # memory-mapped: one tensor at a time, no full copy
            return self._gdpo_load(version, sync_transport.read_file(f, path, version, checksum))

    def gdpo_load_adapter(self, path: str, version: int, checksum: str) -> int:
        """A published adapter directory (file transport), checked, as the policy LoRA ``version``."""
        weight_sync.check_adapter_dir(path, version, checksum)
        return self._gdpo_add_adapter(path, version)

    def _gdpo_add_adapter(self, path: str, version: int) -> int:
        """vLLM loads and validates the adapter before it replaces the previous version under the policy's id
        (``load_inplace``): a refused adapter leaves the worker on the version it held, not torn."""
        from vllm.lora.request import LoRARequest

        self.add_lora(LoRARequest(weight_sync.POLICY_LORA_NAME, weight_sync.POLICY_LORA_ID, path, load_inplace=True))
        self.gdpo_policy_adapter, self.gdpo_policy_version = path, version
        return version

    def _gdpo_drop_adapter(self) -> None:
        if self.gdpo_policy_adapter is not None:
            self.remove_lora(weight_sync.POLICY_LORA_ID)
            self.gdpo_policy_adapter = None

    def gdpo_load_checkpoint(self, model_dir: str) -> int:
        """Every tensor of another checkpoint of this engine's architecture (its safetensors files, read
        memory-mapped one tensor at a time), as policy version 0: evaluation reuses one engine across
        checkpoints instead of starting one per checkpoint."""
        from pathlib import Path

        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise weight_sync.SyncError(f"{model_dir} holds no *.safetensors weight files")

        def tensors():
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)

        return self._gdpo_load(0, tensors())

    def gdpo_reload_base(self) -> None:
        """The base checkpoint from the model path; torn until a sync loads the policy over it."""
        self._gdpo_drop_adapter()
        self.gdpo_policy_version = weight_sync.TORN
        self.reload_weights()

    def gdpo_sync_open(self, group: dict, rank_offset: int) -> int:
        spec = SyncGroup(**group)  # a plain mapping over the RPC (its serializer takes no dataclasses)
        self.gdpo_sync_close()
        rank = rank_offset + self.rank  # self.rank: this worker's rank inside its engine (TP x PP)
        self._gdpo_group = (sync_transport.open_comm(spec, rank, self.device), spec)
        return rank

    def gdpo_sync_receive(self, version: int) -> int:
        if self._gdpo_group is None:
            raise weight_sync.SyncError("this engine worker is in no broadcast group (gdpo_sync_open first)")
        comm, spec = self._gdpo_group
        incoming = weight_sync.receive(comm, spec.manifest, version, spec.bucket_bytes, self.device)  # header checked
        if spec.adapter_config is None:
            return self._gdpo_load(version, incoming)
        tensors = dict(incoming)  # each bucket's buffer is fresh: no copy needed
        incoming.check()  # a cut or corrupt transfer: nothing is loaded, the held version stays
        if self._gdpo_lora_root is None:
            self._gdpo_lora_root = sync_transport.make_weights_dir(f"lora{self.rank}")
        path = weight_sync.write_adapter_dir(self._gdpo_lora_root, version, tensors, spec.adapter_config)
        self._gdpo_add_adapter(path, version)
        weight_sync.prune_adapter_dirs(self._gdpo_lora_root, keep=path)
        return version

    def gdpo_sync_close(self) -> None:
        if self._gdpo_group is not None:
            self._gdpo_group[0].close()
            self._gdpo_group = None

    def gdpo_policy_state(self) -> tuple[int, str | None]:
        """(policy version, the policy adapter's directory or None when the weights are the policy)."""
        return self.gdpo_policy_version, self.gdpo_policy_adapter
