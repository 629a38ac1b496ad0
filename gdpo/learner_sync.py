"""Learner rank 0's side of a weight sync: what a version is (merged weights, or the LoRA adapter alone),
its manifest, and publishing it (``gdpo.weight_sync`` holds the protocol, ``actors/sync.py`` the driver's
side). Every rank calls these: under ZeRO-3 gathering the parameters is collective."""

from __future__ import annotations

import json
from typing import Optional

from gdpo import dora, weight_sync
from gdpo.learner import device_of, gathered
from gdpo.records import WeightUpdate


def sync_payload(model, module_names: list[str], adapter: bool = False) -> list[weight_sync.SyncTensor]:
    """What a sync sends: the merged weights of ``module_names``, or with ``adapter`` the LoRA adapter alone
    in the engine's dtype (call under ``gathered`` for ZeRO-3)."""
    if adapter:
        return weight_sync.adapter_tensors(model, model.get_input_embeddings().weight.dtype)
    return weight_sync.sync_tensors(model, module_names)


def sync_manifest(
    model, module_names: list[str], zero_stage: int = 2, adapter: bool = False
) -> tuple[list, Optional[str]]:
    """The sync's tensor manifest (names, dtypes, full shapes) and, for an adapter sync, the adapter's
    config (JSON) that engines on the broadcast write beside what they receive. Collective under ZeRO-3."""
    with gathered(model, zero_stage):
        manifest = weight_sync.manifest_of(sync_payload(model, module_names, adapter))
    return manifest, json.dumps(dora.peft_config(model), sort_keys=True) if adapter else None


def publish_weights(
    model,
    module_names: list[str],
    version: int,
    *,
    rank: int = 0,
    zero_stage: int = 2,
    bucket_mb: int = 32,
    directory: Optional[str] = None,
    comm=None,
    adapter: bool = False,
) -> WeightUpdate | None:
    """Publish the merged weights (``adapter``: the LoRA adapter alone) as ``version``: rank 0 writes the file
    into ``directory`` and/or broadcasts over ``comm`` (``gdpo.weight_sync.publish``). Every rank must call
    it (under ZeRO-3 gathering the parameters is collective); the others return None."""
    with gathered(model, zero_stage):
        if rank != 0:
            return None
        tensors = sync_payload(model, module_names, adapter)
        path, digest, size = weight_sync.publish(
            tensors,
            version,
            bucket_mb << 20,
            directory=directory,
            comm=comm,
            device=device_of(model),
            adapter_config=dora.peft_config(model) if adapter else None,
        )
    return WeightUpdate(
        version=version,
        num_bytes=size,
        names=[t.name for t in tensors],
        path=path,
        checksum=digest,
        broadcast=comm is not None,
        adapter=adapter,
    )
