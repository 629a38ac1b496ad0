"""How a policy version travels between processes and hosts: the broadcast communicators (gloo on CPUs,
vLLM's NCCL on GPUs, each a group of its own beside any torch.distributed world) and the node-local
weight files (private directories under ``/dev/shm`` or ``GDPO_NODE_LOCAL_DIR``, checked by sha256 and
version). The protocol that runs over them is ``gdpo.weight_sync``."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from gdpo.records import SyncGroup

log = logging.getLogger(__name__)


class SyncError(RuntimeError):
    """A transfer that must not be loaded (wrong version or manifest, corrupt bytes) or a failed group."""


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
        """Destroy the communicator (NCCL's resources on this GPU); dropping it would leak one per group."""
        if self.comm is not None:
            self.comm.destroy()
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
