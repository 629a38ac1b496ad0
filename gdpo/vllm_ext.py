"""vLLM worker extension: load a published policy version into the running engine.

Mixed into vLLM's worker class (``LLM(..., worker_extension_cls="gdpo.vllm_ext.WeightSyncExtension")``)
and called with ``llm.collective_rpc("gdpo_load_weights", args=(path, version, checksum))``.
Weights travel as a safetensors file (tensors passed as RPC arguments arrive mangled on the CPU
backend) and go through ``reload_weights``, which re-runs the backend's post-load processing; a
plain ``model.load_weights`` leaves the CPU engine silently on the old weights.
"""
from __future__ import annotations

import hashlib
import logging

# A sync sends only the adapted layers; vLLM warns about every layer it did not receive (norms,
# embeddings) on each reload. Those keep their tensors by design, so the warnings are noise.
_QUIET = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class WeightSyncExtension:
    gdpo_policy_version: int = 0

    def gdpo_load_weights(self, path: str, version: int, checksum: str) -> int:
        from safetensors import safe_open

        got = file_sha256(path)
        if got != checksum:
            raise RuntimeError(f"weight file {path} for policy version {version} is corrupt: "
                               f"sha256 {got[:12]} != published {checksum[:12]}")
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
        with safe_open(path, framework="pt") as f:  # memory-mapped: one tensor at a time, no full copy
            self.reload_weights(weights_iterator=((k, f.get_tensor(k)) for k in f.keys()), is_checkpoint_format=True)
        self.gdpo_policy_version = version
        return version

    def gdpo_policy_version_now(self) -> int:
        return self.gdpo_policy_version
