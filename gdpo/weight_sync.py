"""The learner -> rollout-engine weight sync: what is sent, how it travels, how an engine loads it.

A sync publishes policy version ``v``: the merged weights ``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_c``
of every adapted linear layer and of its stack mates (vLLM loads q/k/v and gate/up as one stacked
tensor and reloads a stacked layer whole), in checkpoint format, computed one tensor at a time on
learner rank 0. Two transports carry it, chosen per engine by where the engine runs
(:func:`choose_transports`):

- **file**: learner 0 streams a safetensors file into a private directory under the node-local
  scratch root (:func:`node_local_dir`, ``/dev/shm`` by default), hashing it as it writes; an engine
  checks the sha256 and the version in the file's header, then reads it memory-mapped. Only engines
  on learner 0's node can read it. It is the only choice for an engine that shares learner 0's GPU
  (NCCL refuses two ranks on one device).
- **collective**: learner 0 broadcasts to a process group of itself (rank 0) and every worker of
  every collective engine (engine ``i``'s workers at ``rank_offset_i + worker rank``): gloo on CPU,
  NCCL on GPUs (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``). Both backends run the
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
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch

from gdpo import dora
from gdpo.records import SyncGroup, WeightUpdate

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SyncError(RuntimeError):
    """A transfer that must not be loaded (wrong version or manifest, corrupt bytes) or a failed group."""


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


# ----------------------------------------------------------------------------- communicators


class Comm(Protocol):
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...

    def close(self) -> None: ...


class GlooComm:
    """A gloo group of its own (TCPStore + ProcessGroupGloo), beside any default torch.distributed
    world the process already has (DeepSpeed's, vLLM's). Every call fails after ``timeout_s``."""

    def __init__(self, spec: SyncGroup, rank: int, listen_fd: Optional[int] = None):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=spec.timeout_s)
        extra = {"master_listen_fd": listen_fd} if listen_fd is not None else {}
        self.store = dist.TCPStore(spec.host, spec.port, spec.world_size, rank == 0, timeout=timeout, **extra)
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(spec.tag, self.store), rank, spec.world_size, timeout)
        self.rank = rank

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()

    def close(self) -> None:
        self.group = self.store = None


class NcclComm:
    """vLLM's NCCL communicator over a stateless group (no global torch.distributed state). NCCL has
    no per-call deadline: a peer that dies leaves this rank waiting, which the driver's
    ``cluster.sync_timeout_s`` turns into an error."""

    def __init__(self, spec: SyncGroup, rank: int, device: torch.device, listen_sock: Optional[socket.socket] = None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(
            host=spec.host,
            port=spec.port,
            rank=rank,
            world_size=spec.world_size,
            store_timeout=int(spec.timeout_s),
            listen_socket=listen_sock,
        )
        self.device = torch.device(device)
        self.comm = PyNcclCommunicator(group, device=self.device)
        if self.comm.disabled or not self.comm.available:  # its broadcast would silently do nothing
            raise SyncError(
                f"NCCL is not usable on {self.device} (VLLM_DISABLE_PYNCCL set, or libnccl not found): "
                "set cluster.weight_sync=file, or fix the NCCL install"
            )

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        stream = torch.cuda.current_stream(self.device)
        self.comm.broadcast(tensor, src=src, stream=stream)
        stream.synchronize()  # the buffer is refilled or checked right after

    def close(self) -> None:
        self.comm = None


def open_comm(spec: SyncGroup, rank: int, device, listen: Optional[socket.socket] = None) -> Comm:
    """Join the group as ``rank`` (rank 0 hosts the store on ``listen``, a socket it already bound).
    Blocks until every rank has joined, or fails after ``spec.timeout_s``."""
    try:
        if spec.backend == "nccl":
            return NcclComm(spec, rank, device, listen)
        return GlooComm(spec, rank, listen.detach() if listen is not None else None)
    except SyncError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with where and who
        raise SyncError(
            f"rank {rank} could not join the weight-sync group {spec.tag} at {spec.host}:{spec.port} "
            f"({spec.backend}, world {spec.world_size}) within {spec.timeout_s:.0f}s: {err}"
        ) from err


def listen_socket(host: str) -> socket.socket:
    """A listening socket on ``host`` at a free port, kept open for the group's store (no race for the port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def free_port(host: str) -> int:
    """A port free on ``host`` now (for rendezvous that cannot take a socket, e.g. DeepSpeed's)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
) -> tuple[Optional[str], str, int]:
    """Rank 0's side of a sync: each tensor computed once (the DoRA merge), then written to
    ``directory/policy-v{version}.safetensors`` (atomically; older versions removed) and/or broadcast
    over ``comm``. Returns (file path or None, its sha256 or "", payload bytes)."""
    if directory is None and comm is None:
        raise ValueError("publish needs a directory, a group, or both")
    final = tmp = None
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        final = Path(directory) / f"policy-v{version}.safetensors"
        tmp = final.with_suffix(".tmp")
    if final is not None:
        check_free_space(directory, sum(t.nbytes for t in tensors) + (1 << 20))
    writer = _FileWriter(tensors, str(tmp), {"policy_version": str(version)}, bucket_bytes) if final else None
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
    os.replace(tmp, final)
    for old in Path(directory).glob("policy-v*.safetensors"):
        if old != final:
            old.unlink(missing_ok=True)
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


# ----------------------------------------------------------------------------- file transfer


def node_local_dir() -> str:
    """Scratch root on this node for weight files: ``GDPO_NODE_LOCAL_DIR``, else /dev/shm.
    Resolved by the process that uses it, never handed across nodes."""
    return os.environ.get("GDPO_NODE_LOCAL_DIR") or "/dev/shm"


def make_weights_dir(run_id: str) -> str:
    """A new directory only this user can read, under :func:`node_local_dir` (mkdtemp: never an
    existing directory or a planted symlink), marked with its owner (host and pid) so that a later
    run can remove it if this process dies without cleaning up (SIGKILL, OOM, a lost head)."""
    remove_stale_weight_dirs(node_local_dir())
    path = tempfile.mkdtemp(prefix=f"gdpo-weights-{run_id}-", dir=node_local_dir())
    Path(path, "owner").write_text(f"{socket.gethostname()} {os.getpid()}")
    return path


def remove_stale_weight_dirs(root: str) -> list[str]:
    """Delete this user's ``gdpo-weights-*`` directories under ``root`` whose owner process, on this
    host, is gone; a weight file of a 1.5B model is gigabytes of RAM in /dev/shm. Returns them."""
    removed = []
    for d in Path(root).glob("gdpo-weights-*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            host, pid = (d / "owner").read_text().split()
        except (OSError, ValueError):
            continue  # being created, or not ours to judge
        if host != socket.gethostname() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
        log.warning("removed %s: left by process %s, which is gone", d, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def check_free_space(directory: str, need_bytes: int) -> None:
    """A version is written whole before the previous one is removed: the directory's file system
    must have room for it (Docker gives /dev/shm 64 MiB unless --shm-size says more)."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise SyncError(
            f"{directory} has {free / 2**20:.0f} MiB free; a policy version needs "
            f"{need_bytes / 2**20:.0f} MiB. Set GDPO_NODE_LOCAL_DIR to a larger node-local directory "
            "(a RAM-backed one is fastest), or give the container a larger /dev/shm (--shm-size)"
        )


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_file(f, path: str, version: int, checksum: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of an opened (memory-mapped) weight file, after checking its hash and version."""
    got = file_sha256(path)
    if got != checksum:
        raise SyncError(
            f"weight file {path} for policy version {version} is corrupt: "
            f"sha256 {got[:12]} != published {checksum[:12]}"
        )
    held = (f.metadata() or {}).get("policy_version")
    if held != str(version):
        raise SyncError(f"weight file {path} holds policy version {held}, expected {version}")
    return ((k, f.get_tensor(k)) for k in f.keys())


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


def engine_load_file(llm, update: WeightUpdate) -> int:
    """Load a published weight file into every worker of a ``vllm.LLM`` (file transport)."""
    if update.path is None:
        raise SyncError(f"policy version {update.version} was not written to a file (collective-only sync)")
    return _settled(llm, _rpc(llm, "gdpo_load_file", update.path, update.version, update.checksum), update.version)


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
