"""The driver's side of the weight sync (the protocol is ``gdpo/weight_sync.py``): which engine takes
which transport, the broadcast group's epochs, catching up a replaced engine, deadlines.

The broadcast group holds learner rank 0 and every engine on the collective transport. It is
(re)opened before a sync whenever it is stale: at start, after an engine of it was replaced, after
a catch-up. A replaced engine catches up before it samples: from the current file if it is on
learner 0's node, else through a group of just learner 0 and itself. Every wait has the deadline
``cluster.sync_timeout_s``; the gloo group's own calls share it, so a dead or hung receiver fails
the sender first, with the receiver named.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import ray
from ray.exceptions import GetTimeoutError

from gdpo import weight_sync
from gdpo.config import Config
from gdpo.records import SyncGroup, WeightUpdate
from gdpo.weight_sync import SyncError

_TIMED_OUT = "timed out"


class LearnerFailed(RuntimeError):
    """A learner died or hung: its optimizer state is gone; resume from the last checkpoint."""


def learner_failed(what: str) -> LearnerFailed:
    return LearnerFailed(
        f"{what}; its optimizer state is lost. Restart with trainer.resume=auto to continue from the last checkpoint"
    )


class EngineSync:
    def __init__(
        self,
        cfg: Config,
        learners: list,
        manifest: list,
        run_id: str,
        backend: str,
        workers_per_engine: int,
        log: Callable[[str], None],
        adapter_config: Optional[str] = None,
    ):
        self.cfg, self.learners, self.manifest, self.run_id, self.log = cfg, learners, manifest, run_id, log
        self.adapter_config = adapter_config  # an adapter sync: the config the engines on the broadcast write
        self.backend, self.workers_per_engine = backend, workers_per_engine
        self.timeout_s = cfg.cluster.sync_timeout_s
        self.learner0_node, self.learner0_ip = ray.get(learners[0].node.remote(), timeout=self.timeout_s)
        self.transport: dict[int, str] = {}  # engine index -> "file" | "collective"
        self.nodes: dict[int, str] = {}
        self.stale, self.epoch = True, 0

    # ------------------------------------------------------------------ placement
    def place(self, i: int, actor, shares_learner0_device: bool) -> str:
        """Choose engine i's transport from the node it runs on (raises for ``file`` on another node)."""
        node = ray.get(actor.node.remote(), timeout=max(self.timeout_s, 600))  # waits for the engine to start
        self.nodes[i] = node
        self.transport[i] = weight_sync.choose_transports(
            self.cfg.cluster.weight_sync, self.learner0_node, [node], [shares_learner0_device]
        )[0]
        if self.transport[i] == "collective":
            self.stale = True
        return self.transport[i]

    def members(self) -> list[int]:
        return sorted(i for i, t in self.transport.items() if t == "collective")

    def file_engines(self) -> list[int]:
        return sorted(i for i, t in self.transport.items() if t == "file")

    # ------------------------------------------------------------------ syncing
    def publish(self, version: int, rollouts: list, replace: Callable[[int], object]) -> WeightUpdate:
        """Learners publish ``version``; engines on the broadcast receive it. An engine that dies or hangs
        is replaced (``replace(i)``, no catch-up: the retry sends it this version) and the sync retried once."""
        for attempt in range(2):
            failed: dict[int, str] = {}  # this attempt's: an engine replaced onto learner 0's node left the group
            members = self.members()
            if members and self.stale:
                failed = self._open(members, rollouts)
                self.stale = bool(failed)
            if not failed:
                to_file = bool(self.file_engines())
                refs = {
                    ("learner", j): w.publish.remote(version, to_file, bool(members))
                    for j, w in enumerate(self.learners)
                }
                refs.update({("engine", i): rollouts[i].receive_weights.remote(version) for i in members})
                out = self._settle(refs, f"the weight sync of policy version {version}")
                failed = {i: err for (kind, i), (ok, err) in out.items() if kind == "engine" and not ok}
                learner_err = next((err for (kind, _), (ok, err) in out.items() if kind == "learner" and not ok), None)
                if learner_err is not None and not failed:
                    raise SyncError(f"learner rank 0 could not publish policy version {version}: {learner_err}")
                if not failed:
                    return out[("learner", 0)][1]
            self.stale = True
            if attempt == 1:
                break
            for i, err in failed.items():
                self.log(
                    f"rollout worker {i} (node {self.nodes.get(i, '?')[:12]}) failed the weight sync of "
                    f"version {version} ({err}); replacing it and sending the version again"
                )
                if err != "error":  # died or hung: a new engine; one that raised keeps its place and is re-sent
                    replace(i)
        raise SyncError(
            f"the weight sync of policy version {version} failed twice; rollout workers "
            f"{sorted(failed)}: {failed}. Check the network between the nodes (GLOO_SOCKET_IFNAME / "
            f"NCCL_SOCKET_IFNAME) or raise cluster.sync_timeout_s ({self.timeout_s:g}s)"
        )

    def catch_up(self, i: int, actor, version: int, update: Optional[WeightUpdate]) -> None:
        """Bring a new engine to ``version`` before it samples: learners re-send what they published."""
        if self.transport[i] == "file":
            if update is None or update.path is None:  # only broadcast so far: write the file now
                refs = [w.publish.remote(version, True, False, True) for w in self.learners]
                update = self._learner_results(refs, f"writing policy version {version} for rollout worker {i}")[0]
            ray.get(actor.load_file.remote(update), timeout=self.timeout_s)
            return
        failed = self._open([i], {i: actor})
        self.stale = True  # learner 0 left the main group for this one; the next sync rebuilds it
        if not failed:
            refs = {("learner", j): w.publish.remote(version, False, True, True) for j, w in enumerate(self.learners)}
            refs[("engine", i)] = actor.receive_weights.remote(version)
            out = self._settle(refs, f"the catch-up of rollout worker {i} to policy version {version}")
            failed = {key: err for key, (ok, err) in out.items() if not ok}
        if failed:
            raise SyncError(
                f"rollout worker {i} (node {self.nodes[i][:12]}) could not catch up on policy version "
                f"{version}: {failed}"
            )

    def close(self, rollouts: list) -> None:
        """Leave the groups and remove learner 0's weight files (best effort: the run is ending)."""
        refs = [self.learners[0].shutdown_sync.remote()] + [rollouts[i].sync_close.remote() for i in self.members()]
        ray.wait(refs, num_returns=len(refs), timeout=30)

    # ------------------------------------------------------------------ groups and deadlines
    def _open(self, members: list[int], rollouts) -> dict[int, str]:
        """A new group of learner 0 and ``members``; returns the engines that failed to join."""
        self.epoch += 1
        ip, port = ray.get(self.learners[0].sync_endpoint.remote(), timeout=self.timeout_s)
        spec = SyncGroup(
            backend=self.backend,
            host=ip,
            port=port,
            world_size=1 + len(members) * self.workers_per_engine,
            tag=f"gdpo-sync-{self.run_id}-{self.epoch}",
            timeout_s=self.timeout_s,
            bucket_bytes=self.cfg.learner.sync_bucket_mb << 20,
            manifest=self.manifest,
            adapter_config=self.adapter_config,
        )
        refs = {("learner", 0): self.learners[0].open_sync_group.remote(spec)}
        refs.update(
            {
                ("engine", i): rollouts[i].sync_open.remote(spec, 1 + k * self.workers_per_engine)
                for k, i in enumerate(members)
            }
        )
        out = self._settle(refs, f"opening weight-sync group {spec.tag} at {ip}:{port}")
        return {i: err for (kind, i), (ok, err) in out.items() if kind == "engine" and not ok}

    def _settle(self, refs: dict, what: str) -> dict:
        """Wait for every call until the deadline: ``{key: (True, result) | (False, "died" | "hung" | "error")}``.
        A failed engine or learner 0 makes learner 0 leave its group at once, so peers still waiting on it
        fail now rather than at their own deadline. A learner that died or hung raises LearnerFailed."""
        deadline = time.monotonic() + self.timeout_s + 30  # the group's own deadline fires first
        pending = {ref: key for key, ref in refs.items()}
        out, told = {}, False
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                key = pending.pop(ref)
                try:
                    out[key] = (True, ray.get(ref))
                except Exception as err:  # noqa: BLE001 - classified and reported below
                    kind = "died" if _died(err) else "error"
                    if key[0] == "learner" and kind == "died":
                        raise learner_failed(f"learner {key[1]} died during {what}") from err
                    self.log(f"{what}: {key[0]} {key[1]} {kind}: {_short(err)}")
                    out[key] = (False, kind)
                    if not told:
                        self.learners[0].close_sync_group.remote()
                        told = True
        for ref, key in pending.items():
            if key[0] == "learner":
                raise learner_failed(
                    f"learner {key[1]} did not finish {what} within cluster.sync_timeout_s="
                    f"{self.timeout_s:g}s (a receiver that died under NCCL leaves the sender waiting)"
                )
            out[key] = (False, "hung")  # the caller replaces it (killing the hung actor first)
        return out

    def _learner_results(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError as err:
            raise learner_failed(f"the learners did not finish {what} within {self.timeout_s:g}s") from err
        except Exception as err:
            if _died(err):
                raise learner_failed(f"a learner died while {what}") from err
            raise


def _died(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1][:300] if text else type(err).__name__
