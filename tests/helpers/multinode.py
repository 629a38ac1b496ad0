"""Two Ray hosts on one machine, started as a user starts a cluster (``ray start``).

Host A is the head, at this machine's node IP. Host B joins it from its own mount namespace with a
private tmpfs on /dev/shm and another node IP (127.0.0.2): like a second machine, it cannot see a
file A writes to /dev/shm (or anything a process there writes to its /dev/shm: Ray's object store,
vLLM's shared memory, weight files). Everything else on the filesystem is shared, as a cluster's
shared ``trainer.output_dir`` would be. Needs root (or user namespaces) for ``unshare -m``.

Custom resources let tests place roles: A has ``gdpo_learner_host`` (learners that must survive
losing B), both hosts one ``gdpo_learner_slot`` (a learner on each) and ``gdpo_rollout_slot``s
(A two, B one). ``reserve_a_slot`` holds one of A's rollout slots so that a PACK placement puts one
engine on each host; ``release_a_slot`` frees it, so that an engine from a lost B can move to A.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_RESOURCES = {"gdpo_learner_host": 1, "gdpo_learner_slot": 1, "gdpo_rollout_slot": 2, "gdpo_host_a": 1}
B_RESOURCES = {"gdpo_learner_slot": 1, "gdpo_rollout_slot": 1}


def can_unshare() -> str:
    """'' where a private /dev/shm can be made here, else the reason it cannot."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
    )
    return (
        "" if probe.returncode == 0 else f"unshare -m with a private /dev/shm is not permitted: {probe.stderr.strip()}"
    )


def _free_port() -> int:
    from gdpo.sync_transport import free_port

    return free_port("127.0.0.1")


class TwoHosts:
    def __init__(self, tmp: Path):
        import ray

        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        # Ray 2.6x guards the cluster and its job API with a token; one machine's hosts share the default
        # one (~/.ray/auth_token, made below if missing: `ray start` does not make it), which this process's Ray
        # picks up too
        self.env.update(
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            RAY_AUTH_MODE="token",
            VLLM_CPU_KVCACHE_SPACE="1",
            TOKENIZERS_PARALLELISM="false",
            # a lost host is declared dead within seconds, not the default half minute
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            RAY_health_check_initial_delay_ms="1000",
        )
        self.ip_a = ray.util.get_node_ip_address()
        self.ip_b = "127.0.0.2" if self.ip_a != "127.0.0.2" else "127.0.0.3"
        token = self._ray("get-auth-token", "--generate")  # the default token, made if this machine has none yet
        if token.returncode != 0:
            raise RuntimeError(f"ray get-auth-token --generate failed: {token.stderr[-2000:]}")
        self.gcs = f"{self.ip_a}:{_free_port()}"
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        head = self._ray(
            "start",
            "--head",
            f"--node-ip-address={self.ip_a}",
            f"--port={self.gcs.split(':')[1]}",
            "--num-cpus=4",
            f"--resources={json.dumps(HEAD_RESOURCES)}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
            "--disable-usage-stats",
        )
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed: {head.stderr[-2000:]}")
        self.b_log = open(tmp / "host_b.log", "w")
        self.b = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "$0" "$@"',
                RAY,
                "start",
                f"--address={self.gcs}",
                f"--node-ip-address={self.ip_b}",
                "--num-cpus=3",
                f"--resources={json.dumps(B_RESOURCES)}",
                "--block",
                "--disable-usage-stats",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=self.b_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # "auto" (this machine's newest cluster: the head just started) is the connection on which Ray picks up
        # the default token itself; an explicit address would need RAY_AUTH_MODE=token before Ray was imported
        ray.init(address="auto", log_to_driver=True)
        if ray.get_runtime_context().gcs_address != self.gcs:
            raise RuntimeError(f"joined {ray.get_runtime_context().gcs_address}, not the head at {self.gcs}")
        self._wait_hosts(2)
        self.node_a, self.node_b = (self._node_id(ip) for ip in (self.ip_a, self.ip_b))
        self.reserve_a_slot()

    def _ray(self, *args, timeout=300):
        return subprocess.run([RAY, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def _wait_hosts(self, n: int, timeout: float = 120) -> None:
        import ray

        deadline = time.time() + timeout
        while len([x for x in ray.nodes() if x["Alive"]]) != n:
            if time.time() > deadline:
                raise RuntimeError(
                    f"the cluster did not reach {n} live hosts in {timeout}s (host B log: "
                    f"{Path(self.b_log.name).read_text()[-2000:]})"
                )
            time.sleep(0.5)

    def _node_id(self, ip: str) -> str:
        import ray

        return next(x["NodeID"] for x in ray.nodes() if x["Alive"] and x["NodeManagerAddress"] == ip)

    def reserve_a_slot(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.blocker = placement_group([{"gdpo_rollout_slot": 1, "gdpo_host_a": 0.01}], strategy="STRICT_PACK")
        ray.get(self.blocker.ready(), timeout=60)

    def release_a_slot(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.blocker)

    def b_processes(self) -> list[int]:
        """Every process of host B: those in its mount namespace."""
        try:
            ns = os.readlink(f"/proc/{self.b.pid}/ns/mnt")
        except OSError:
            return []
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                    out.append(int(pid))
            except OSError:
                pass
        return out

    def lose_b(self) -> None:
        """Host B fails: every process on it is killed at once, as when a machine goes down."""
        for pid in self.b_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._wait_hosts(1)

    def close(self) -> None:
        import ray

        ray.shutdown()
        for pid in self.b_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._ray("stop", "--force")
        self.b_log.close()
