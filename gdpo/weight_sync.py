"""The learner -> rollout-engine weight sync: what is sent, how it travels, how an engine loads it.

A sync publishes policy version ``v``: the merged weights ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_c``
of every adapted linear layer and of its stack mates (vLLM loads q/k/v and gate/up as one stacked
tensor and reloads a stacked layer whole), in checkpoint format, computed one tensor at a time on
learner rank 0. Two transports carry it, chosen per engine by where the engine runs
(:func:`choose_transports`):

- **file**: learner 0 streams a safetensors file into a private directory under the node-local
  scratch root (``gdpo.sync_transport.node_local_dir``, ``/dev/shm`` by default), hashing it as it writes; an engine
  checks the sha256 and the version in the file's header, then reads it memory-mapped. Only engines
  on learner 0's node can read it. It is the only choice for an engine that shares learner 0's GPU
  (NCCL refuses two ranks on one device).
- **collective**: learner 0 broadcasts to a process group of itself (rank 0) and every worker of
  every collective engine (engine ``i``'s workers at ``rank_offset_i + worker rank``): gloo on CPU,
  NCCL on GPUs (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``; both in
  ``gdpo.sync_transport``). Both backends run the
  same :func:`send` / :func:`receive`, so the CPU tests exercise the GPU path's protocol.

Wire protocol of one version (int64 tensors unless noted):

    header    [MAGIC, PROTOCOL, version, manifest fingerprint, n_buckets]
    sizes     [n_buckets]       bytes of each bucket on the wire (multiples of ``WIRE_ALIGN``)
    n times:  uint8 [size]      the bucket's tensors, each at a 16-byte aligned offset, zero padded
              [3]               ``bucket_checksum`` of those bytes

The manifest (name, dtype, shape of every tensor, in send order) is fixed for a run; both ends get
it when the group opens and cut it into buckets the same way (:func:`plan`): greedily, a tensor
larger than a bucket travelling alone. A receiver that meets the wrong version, another manifest or
a bucket whose checksum does not match yields nothing more, drains the rest of the version (so the
sender never blocks on it) and raises: an engine never loads a stale or corrupt tensor. Tensors of
buckets before a corrupt one have been loaded by then, so the engine is marked torn (version -1)
and refuses to sample until a full version arrives. The checksum guards against desynchronised or
damaged transfers inside the cluster, not against an attacker on the cluster's network.

Engines load through vLLM's layerwise ``reload_weights`` (a plain ``model.load_weights`` leaves the
CPU backend's packed kernels on the old weights) and then drop their prefix cache, whose blocks hold
keys and values the old weights computed.

**Adapter sync** (``learner.adapter=lora``, ``learner.sync_as`` auto or adapter): a version is the
plain LoRA adapter alone, ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` of every adapted layer
under peft's names, in the engine's dtype (:func:`adapter_tensors`): ``r (in + out)`` numbers per layer
instead of the merged layers' ``in x out`` and their stack mates'. Both transports and the wire
protocol are the same; the file is a peft adapter directory, ``policy-v{version}.lora/``, whose
weights' header carries the version and a copy of ``adapter_config.json`` (checked against the file
beside it: the checksum covers the config too). An engine on the broadcast writes what it received,
after every bucket's checksum matched, into a peft directory of its own under the node-local root.
Either way the engine, started with LoRA enabled at the learner's rank, loads it with vLLM's own
adapter loader under one id (``POLICY_LORA_ID``, ``load_inplace``), which validates the adapter
before it replaces the previous version: a refused or damaged adapter leaves the engine whole on the
version it held (never torn). Rollouts and evaluations then sample through that LoRA on the base
weights (``gdpo.rollout.policy_lora``). vLLM keys prefix-cache blocks on the LoRA's name and path,
and each version has its own directory; the cache is dropped after each version all the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from gdpo import dora
from gdpo.records import SyncGroup, WeightUpdate
from gdpo.sync_transport import Comm, SyncError, check_free_space, file_sha256

log = logging.getLogger(__name__)

MAGIC = 0x6764706F  # "gdpo"
PROTOCOL = 1
WIRE_ALIGN = 4096  # bucket sizes on the wire: whole rows of the checksum's [R, 512] int64 view
TENSOR_ALIGN = 16  # each tensor's offset inside a bucket (so any dtype view of it is aligned)
TORN = -1  # the version an engine reports after a partial load

# vLLM loads these projections as one stacked tensor; they must be sent together
STACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# A sync sends only the adapted layers; vLLM warns about every layer it did not receive (norms,
# embeddings) on each reload. Those keep their tensors by design, so the warnings are noise.
_QUIET = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")

ADAPTER_WEIGHTS = dora.WEIGHTS_NAME  # an adapter version: a peft adapter directory
ADAPTER_CONFIG = dora.CONFIG_NAME
POLICY_LORA_ID = 1 << 30  # the engines' LoRA id of the policy: each version replaces the last under it
POLICY_LORA_NAME = "gdpo-policy"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ----------------------------------------------------------------------------- what is sent


@dataclass(frozen=True)
class SyncTensor:
    name: str  # checkpoint-format name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]  # computes this one tensor (the DoRA merge) when called

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def sync_module_names(model, target_modules: tuple[str, ...]) -> list[str]:
    """HF names of the linear modules whose weights a sync must send: adapted ones and their stack mates."""
    wanted = set(target_modules)
    for group in STACKED:
        if wanted & set(group):
            wanted |= set(group)
    # by module type, not weight shape: ZeRO-3 leaves each rank a flat [0] placeholder
    return [
        n
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in wanted and isinstance(m, (torch.nn.Linear, dora.DoraLinear))
    ]


def sync_tensors(model, module_names: list[str]) -> list[SyncTensor]:
    """The tensors a sync sends, in send order (each layer's tensors together)."""
    out = []
    for name in module_names:
        mod = model.get_submodule(name)
        base = getattr(mod, "base_layer", mod)
        make = (lambda m=mod: m.merged_weight()) if isinstance(mod, dora.DoraLinear) else (lambda b=base: b.weight)
        out.append(SyncTensor(f"{name}.weight", tuple(base.weight.shape), base.weight.dtype, make))
        if base.bias is not None:  # unchanged, but vLLM reloads a stacked module whole
            out.append(SyncTensor(f"{name}.bias", tuple(base.bias.shape), base.bias.dtype, lambda b=base: b.bias))
    return out


@torch.no_grad()
def merged_weights(model, module_names: list[str]) -> dict[str, torch.Tensor]:
    """Checkpoint-format ``{name.weight: W'}`` of the given modules, DoRA merged as merge_dora does."""
    return {t.name: t.make().clone() for t in sync_tensors(model, module_names)}


def adapter_tensors(model, dtype: torch.dtype) -> list[SyncTensor]:
    """An adapter sync's tensors: each plain LoRA layer's ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``
    under peft's names (``base_model.model.<layer>.lora_A.weight``), in ``dtype``, the engine's (vLLM
    casts a LoRA to the model's dtype when it loads one)."""
    out = []
    for name, layer in dora.dora_layers(model):
        if layer.use_dora:
            raise ValueError(f"{name} is a DoRA layer: vLLM serves plain LoRA only, so DoRA syncs merged weights")
        for part in ("lora_A", "lora_B"):
            p = getattr(layer, part)
            out.append(SyncTensor(f"{dora.PREFIX}{name}.{part}.weight", tuple(p.shape), dtype, lambda p=p: p))
    return out


def _raw(t: SyncTensor) -> torch.Tensor:
    """The tensor's bytes, ``[nbytes]`` uint8 (on the tensor's device)."""
    return t.make().detach().to(t.dtype).contiguous().reshape(-1).view(torch.uint8)


Manifest = list  # [(name, dtype name, [shape])] in send order: JSON-able, the same on both ends


def manifest_of(tensors: list[SyncTensor]) -> Manifest:
    return [(t.name, str(t.dtype).removeprefix("torch."), list(t.shape)) for t in tensors]


def fingerprint(manifest: Manifest) -> int:
    """63 bits of the manifest's sha256 (fits an int64 header slot)."""
    digest = hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _nbytes(entry) -> int:
    _, dtype, shape = entry
    return math.prod(shape) * _DTYPES[dtype].itemsize


def _up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Bucket:
    entries: tuple[tuple[int, int, int], ...]  # (manifest index, byte offset in the bucket, bytes)
    size: int  # bytes on the wire, a multiple of WIRE_ALIGN


def plan(manifest: Manifest, bucket_bytes: int) -> list[Bucket]:
    """Cut the manifest into buckets of at most ``bucket_bytes`` (before padding); a tensor larger
    than a bucket travels alone. Deterministic, so sender and receivers agree without talking."""
    buckets, cur, fill = [], [], 0
    for i, entry in enumerate(manifest):
        n = _nbytes(entry)
        off = _up(fill, TENSOR_ALIGN)
        if cur and off + n > bucket_bytes:
            buckets.append(Bucket(tuple(cur), _up(fill, WIRE_ALIGN)))
            cur, off = [], 0
        cur.append((i, off, n))
        fill = off + n
    if cur:
        buckets.append(Bucket(tuple(cur), _up(fill, WIRE_ALIGN)))
    return buckets


def bucket_checksum(buf: torch.Tensor) -> torch.Tensor:
    """``[size] uint8 -> [3] int64``: the sum of the bucket's int64 words and two position-weighted
    sums (by row and by column of its ``[size/4096, 512]`` view), so a changed, lost or moved word
    changes it. Native int64 reductions on the buffer's own device (two passes at memory speed);
    sums wrap modulo 2^64, which no order of summation changes."""
    words = buf.view(torch.int64).view(-1, WIRE_ALIGN // 8)  # [R, 512]
    rows = words.sum(dim=1)  # [R]
    cols = words.sum(dim=0)  # [512]
    r = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=buf.device)
    c = torch.arange(1, cols.numel() + 1, dtype=torch.int64, device=buf.device)
    return torch.stack([rows.sum(), (rows * r).sum(), (cols * c).sum()])


# ----------------------------------------------------------------------------- sending


class _Broadcaster:
    """Rank 0's end of one version: header and sizes at once, then each bucket as its last tensor arrives."""

    def __init__(self, comm: Comm, tensors: list[SyncTensor], version: int, bucket_bytes: int, device):
        man = manifest_of(tensors)
        self.comm, self.device, self.version, self.buckets = comm, device, version, plan(man, bucket_bytes)
        self.k = self.j = self.sent = 0  # bucket, entry within it, payload bytes
        self._send(torch.tensor([MAGIC, PROTOCOL, version, fingerprint(man), len(self.buckets)]).to(device))
        self._send(torch.tensor([b.size for b in self.buckets]).to(device))
        self.buf = torch.empty(max(b.size for b in self.buckets), dtype=torch.uint8, device=device)  # reused

    def _send(self, t: torch.Tensor) -> None:
        try:
            self.comm.broadcast(t, 0)
        except RuntimeError as err:  # gloo: a peer closed its connection, or the group's deadline passed
            raise SyncError(
                f"broadcast of policy version {self.version} failed at bucket {self.k} of "
                f"{len(self.buckets)}: a receiver left the group or stopped reading "
                f"({_first_line(err)})"
            ) from err

    def add(self, raw: torch.Tensor) -> None:
        b = self.buckets[self.k]
        view = self.buf[: b.size]
        if self.j == 0:
            view.zero_()
        _, off, n = b.entries[self.j]
        view[off : off + n] = raw.to(self.device)
        self.j, self.sent = self.j + 1, self.sent + n
        if self.j == len(b.entries):
            self._send(view)
            self._send(bucket_checksum(view))
            self.k, self.j = self.k + 1, 0


class _FileWriter:
    """A safetensors file streamed through one reused bucket, hashed as it is written (never read back).
    The header is known from the shapes, so no state-dict copy is ever made."""

    def __init__(self, tensors: list[SyncTensor], path: str, metadata: dict[str, str], bucket_bytes: int):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": _ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.size = len(head) + 8 + offset
        self.sha = hashlib.sha256()
        self.bucket = torch.empty(max(1, bucket_bytes), dtype=torch.uint8)
        self.fill = 0
        self.f = open(path, "wb")
        self._emit(len(head).to_bytes(8, "little") + head)

    def _emit(self, buf) -> None:
        self.sha.update(buf)
        self.f.write(buf)

    def add(self, raw: torch.Tensor) -> None:
        raw = raw.cpu()
        if self.fill + raw.numel() > self.bucket.numel() and self.fill:
            self._emit(self.bucket[: self.fill].numpy())
            self.fill = 0
        if raw.numel() > self.bucket.numel():  # a tensor larger than a bucket goes out on its own
            self._emit(raw.numpy())
            return
        self.bucket[self.fill : self.fill + raw.numel()] = raw
        self.fill += raw.numel()

    def finish(self) -> str:
        try:
            if self.fill:
                self._emit(self.bucket[: self.fill].numpy())
        finally:
            self.f.close()
        return self.sha.hexdigest()


@torch.no_grad()
def publish(
    tensors: list[SyncTensor],
    version: int,
    bucket_bytes: int,
    *,
    directory: Optional[str] = None,
    comm: Optional[Comm] = None,
    device="cpu",
    adapter_config: Optional[dict] = None,
) -> tuple[Optional[str], str, int]:
    """Rank 0's side of a sync: each tensor computed once (the DoRA merge), then written to
    ``directory/policy-v{version}.safetensors`` (atomically; older versions removed) and/or broadcast
    over ``comm``. With ``adapter_config`` (an adapter sync) the file is a peft adapter directory,
    ``directory/policy-v{version}.lora/``, whose weights' header also carries the config, so that the
    checksum covers it. Returns (file or adapter directory or None, the weights' sha256 or "", payload bytes)."""
    if directory is None and comm is None:
        raise ValueError("publish needs a directory, a group, or both")
    final = tmp = None
    meta = {"policy_version": str(version)}
    if adapter_config is not None:
        meta["adapter_config"] = json.dumps(adapter_config, sort_keys=True)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        check_free_space(directory, sum(t.nbytes for t in tensors) + (1 << 20))
        if adapter_config is None:
            final = Path(directory) / f"policy-v{version}.safetensors"
            tmp = final.with_suffix(".tmp")
        else:
            final = Path(directory) / f"policy-v{version}.lora"
            tmp = final.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / ADAPTER_CONFIG).write_text(meta["adapter_config"])
            tmp = tmp / ADAPTER_WEIGHTS
    writer = _FileWriter(tensors, str(tmp), meta, bucket_bytes) if final else None
    try:
        caster = _Broadcaster(comm, tensors, version, bucket_bytes, device) if comm is not None else None
        for t in tensors:
            raw = _raw(t)
            if caster is not None:
                caster.add(raw)
            if writer is not None:
                writer.add(raw)
    finally:
        digest = writer.finish() if writer is not None else ""
    if final is None:
        return None, "", caster.sent
    if adapter_config is not None:
        shutil.rmtree(final, ignore_errors=True)  # a re-sent version (an engine catching up) replaces itself
        tmp = tmp.parent
    os.replace(tmp, final)
    for old in Path(directory).glob("policy-v*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return str(final), digest, writer.size


def _bcast(comm: Comm, t: torch.Tensor, device) -> torch.Tensor:
    t = t.to(device)  # int64 control tensors: NCCL needs them on the device, gloo on the CPU
    comm.broadcast(t, 0)
    return t


def receive(comm: Comm, manifest: Manifest, version: int, bucket_bytes: int, device) -> "Incoming":
    """Read one version's header and check it before anything is loaded: a stale version, another
    manifest or another bucket plan is drained (the sender never blocks on this receiver) and
    refused with SyncError. Returns the stream of its tensors."""
    header = _bcast(comm, torch.empty(5, dtype=torch.int64), device).tolist()
    if header[:2] != [MAGIC, PROTOCOL]:  # nothing here says how much follows: no way to drain
        raise SyncError(f"weight transfer refused: the header {header} is not gdpo sync protocol {PROTOCOL}")
    sizes = _bcast(comm, torch.empty(header[4], dtype=torch.int64), device).tolist()
    buckets = plan(manifest, bucket_bytes)
    problem = None
    if header[2] != version:
        problem = f"expected policy version {version}, the sender sent version {header[2]}"
    elif header[3] != fingerprint(manifest):
        problem = f"the sender's tensor manifest differs from this receiver's (policy version {version})"
    elif sizes != [b.size for b in buckets]:
        problem = "bucket sizes differ from this receiver's plan (learner.sync_bucket_mb differs between the ends?)"
    if problem is not None:
        for size in sizes:
            _bcast(comm, torch.empty(size, dtype=torch.uint8), device)
            _bcast(comm, torch.empty(3, dtype=torch.int64), device)
        raise SyncError(f"weight transfer refused: {problem}; nothing was loaded")
    return Incoming(comm, manifest, version, buckets, device)


class Incoming:
    """The tensors of one accepted version, ``(name, tensor)`` in send order, each bucket yielded only
    after its checksum matched. It never raises into the loader (vLLM's layerwise reload must reach
    its end, or the model is left on the meta device): a corrupt bucket or a broken connection ends
    the stream early, and :meth:`check` raises afterwards. ``loaded`` counts the tensors yielded."""

    def __init__(self, comm: Comm, manifest: Manifest, version: int, buckets: list[Bucket], device):
        self.comm, self.manifest, self.version, self.buckets, self.device = comm, manifest, version, buckets, device
        self.loaded, self.problem = 0, None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        k = 0
        try:
            for k, b in enumerate(self.buckets):
                buf = torch.empty(b.size, dtype=torch.uint8, device=self.device)  # fresh: the reload keeps references
                self.comm.broadcast(buf, 0)
                check = _bcast(self.comm, torch.empty(3, dtype=torch.int64), self.device)
                if self.problem is not None:
                    continue  # draining: keep in step with the sender, load nothing more
                if not torch.equal(check, bucket_checksum(buf)):
                    self.problem = f"bucket {k} of {len(self.buckets)} arrived corrupt (checksum mismatch)"
                    continue
                for i, off, n in b.entries:
                    name, dtype, shape = self.manifest[i]
                    yield name, buf[off : off + n].view(_DTYPES[dtype]).view(shape)
                    self.loaded += 1
        except RuntimeError as err:  # the connection broke (sender gone, deadline passed): nothing more comes
            self.problem = f"the transfer broke off at bucket {k} of {len(self.buckets)} ({_first_line(err)})"

    def check(self) -> None:
        if self.problem is not None:
            raise SyncError(
                f"weight transfer of policy version {self.version} failed: {self.problem}; "
                + (f"{self.loaded} tensors of it were loaded before" if self.loaded else "nothing was loaded")
            )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ----------------------------------------------------------------------------- engine side


def load_into_worker(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Inside a vLLM worker: the layerwise reload, which re-runs the backend's post-load processing."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def _rpc(llm, method: str, *args) -> list:
    """``llm.collective_rpc`` with a worker's failure raised as SyncError carrying the worker's own message."""
    try:
        return llm.collective_rpc(method, args=args)
    except Exception as err:  # noqa: BLE001 - vLLM wraps the worker's exception in a plain one
        raise SyncError(f"{method} failed in the engine: {err}") from err


def _settled(llm, versions: list[int], version: int) -> int:
    if any(v != version for v in versions):
        raise SyncError(f"rollout engine workers report versions {versions}, expected {version}")
    # cached prefix blocks hold keys and values the old weights computed; a prompt that fills a block
    # would otherwise be continued from the old policy's KV
    if not llm.reset_prefix_cache():
        raise SyncError(f"rollout engine could not drop its prefix cache after loading policy version {version}")
    return version


def check_adapter_dir(path: str, version: int, checksum: str) -> None:
    """Before an engine loads a published adapter directory: the weights' sha256, the version in their
    header, and ``adapter_config.json`` against the copy in that header (so the checksum covers it)."""
    from safetensors import safe_open

    weights = Path(path) / ADAPTER_WEIGHTS
    got = file_sha256(str(weights))
    if got != checksum:
        raise SyncError(
            f"adapter file {weights} for policy version {version} is corrupt: sha256 {got[:12]} != "
            f"published {checksum[:12]}"
        )
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("policy_version") != str(version):
        raise SyncError(f"adapter {path} holds policy version {meta.get('policy_version')}, expected {version}")
    on_disk = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    if on_disk != json.loads(meta.get("adapter_config", "null")):
        raise SyncError(
            f"{Path(path) / ADAPTER_CONFIG} differs from the config published with policy version {version}"
        )


def write_adapter_dir(root: str, version: int, tensors: dict[str, torch.Tensor], config: str) -> str:
    """An adapter that arrived over the broadcast, written where vLLM loads LoRAs from (a peft directory,
    ``root/policy-v{version}.lora``). Returns the directory."""
    from safetensors.torch import save_file

    final = Path(root) / f"policy-v{version}.lora"
    tmp = final.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ADAPTER_CONFIG).write_text(config)
    meta = {"policy_version": str(version), "adapter_config": config}
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return str(final)


def prune_adapter_dirs(root: str, keep: str) -> None:
    """Remove the adapter directories under ``root`` other than ``keep`` (once ``keep`` is loaded: until then
    the version the engine holds keeps its files, which vLLM reads again if it ever evicts the adapter)."""
    for old in Path(root).glob("policy-v*.lora"):
        if str(old) != keep:
            shutil.rmtree(old, ignore_errors=True)


def engine_load_file(llm, update: WeightUpdate) -> int:
    """Load a published version into every worker of a ``vllm.LLM`` (file transport): merged weights
    through the layerwise reload, an adapter as the engine's policy LoRA."""
    if update.path is None:
        raise SyncError(f"policy version {update.version} was not written to a file (collective-only sync)")
    method = "gdpo_load_adapter" if update.adapter else "gdpo_load_file"
    return _settled(llm, _rpc(llm, method, update.path, update.version, update.checksum), update.version)


def engine_open(llm, spec: SyncGroup, rank_offset: int) -> list[int]:
    """Every worker of a ``vllm.LLM`` joins the broadcast group; returns their ranks in it."""
    return _rpc(llm, "gdpo_sync_open", dataclasses.asdict(spec), rank_offset)


def engine_receive(llm, version: int) -> int:
    """Receive one version over the engine's broadcast group (collective transport)."""
    return _settled(llm, _rpc(llm, "gdpo_sync_receive", version), version)


def engine_load_checkpoint(llm, model_dir: str) -> int:
    """Every worker loads the weights of another checkpoint of the engine's architecture (version 0)."""
    return _settled(llm, _rpc(llm, "gdpo_load_checkpoint", str(model_dir)), 0)


def engine_reload_base(llm) -> None:
    """Every worker reloads the model's own weights from its path (after a level-2 sleep dropped them)."""
    _rpc(llm, "gdpo_reload_base")


def engine_close(llm) -> None:
    _rpc(llm, "gdpo_sync_close")


# ----------------------------------------------------------------------------- who gets what


def choose_transports(
    mode: str, learner0_node: str, engine_nodes: list[str], shares_learner0_device: list[bool]
) -> list[str]:
    """Per engine, ``"file"`` or ``"collective"`` (``cluster.weight_sync``):

    - ``auto``: the file on learner 0's node, the broadcast everywhere else;
    - ``file``: the file for every engine; an engine on another node is an error;
    - ``collective``: the broadcast for every engine except one sharing learner 0's GPU.
    """
    out = []
    for i, (node, shared) in enumerate(zip(engine_nodes, shares_learner0_device)):
        local = node == learner0_node
        if mode == "file" and not local:
            raise SyncError(
                f"cluster.weight_sync=file, but rollout worker {i} runs on node {node[:12]}, not on "
                f"learner rank 0's node {learner0_node[:12]}: the weight file cannot reach it. Use "
                "cluster.weight_sync=auto (a collective broadcast to other nodes) or pin the rollouts "
                "to learner 0's node (cluster.rollout_resources)"
            )
        out.append("file" if shared or mode == "file" or (mode == "auto" and local) else "collective")
    return out
