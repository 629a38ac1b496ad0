"""A process pool for math-verify with a per-item timeout that survives hung items.

math-verify's own timeouts use ``signal.alarm``, which works only in a process's main thread;
reward workers call it from Ray actor threads. So every check runs in a spawned worker process
(whose main thread may use signals), and the parent watches each worker: a worker that makes no
progress for ``timeout_s`` is killed, its current item scores None, the rest of its chunk goes back
to the queue, and a fresh worker replaces it. "spawn" (not fork) keeps this safe from any thread,
from a Ray actor, and from a guarded script.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

Item = tuple[str, str]  # (gold, prediction)


def _worker_main(
    conn: Connection,
    check: Callable[[str, str, float], Optional[bool]],
    timeout_s: float,
    warmup: Optional[Item] = None,
) -> None:
    if warmup is not None:  # imports and first-use set-up (math-verify's grammar) before "ready", not in an item
        try:
            check(*warmup, timeout_s)
        except Exception:  # noqa: BLE001 - a warm-up failure shows again, per item, where it is reported
            pass
    conn.send("ready")  # start-up (interpreter, imports) must not count against an item's timeout
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for idx, gold, pred in chunk:
            try:
                result = check(gold, pred, timeout_s)
            except Exception:  # a check that crashes cannot score this item; the item says so (None)
                result = None
            conn.send((idx, result))


class _Worker:
    def __init__(self, ctx, check, timeout_s: float, warmup: Optional[Item] = None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, check, timeout_s, warmup), daemon=True)
        self.proc.start()
        child.close()
        self.pending: deque[tuple[int, str, str]] = deque()
        self.last_progress = time.monotonic()

    def wait_ready(self, startup_timeout_s: float = 120.0) -> None:
        if not self.conn.poll(startup_timeout_s) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"verifier worker process did not start within {startup_timeout_s:.0f}s")

    def give(self, chunk: list[tuple[int, str, str]]) -> None:
        self.pending.extend(chunk)
        self.last_progress = time.monotonic()
        self.conn.send(chunk)

    def kill(self) -> None:
        try:
            self.conn.close()
        finally:
            self.proc.kill()
            self.proc.join(timeout=5)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


class VerifierPool:
    """Run ``check(gold, pred, timeout_s) -> bool | None`` over many items in worker processes.

    ``check`` must be a module-level function (it is pickled into spawned processes). ``warmup``: an
    item each new worker checks before it reports ready, so that what a first check loads (imports,
    grammars) never counts against an item's timeout (under CPU load it can take longer than that).
    """

    def __init__(
        self,
        check: Callable[[str, str, float], Optional[bool]],
        processes: int = 2,
        timeout_s: float = 10.0,
        warmup: Optional[Item] = None,
    ):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.check, self.processes, self.timeout_s, self.warmup = check, processes, timeout_s, warmup
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.killed_workers = 0  # how many hung workers were replaced (a metric)

    def map(self, items: Sequence[Item]) -> list[Optional[bool]]:
        with self._lock:
            return self._map(items)

    def start(self) -> None:
        """Start the worker processes now (else the first ``map`` does)."""
        with self._lock:
            self._fill()

    def _fill(self) -> None:
        if len(self._workers) < self.processes:
            fresh = [
                _Worker(self._ctx, self.check, self.timeout_s, self.warmup)
                for _ in range(self.processes - len(self._workers))
            ]
            for w in fresh:  # started together, waited for together
                w.wait_ready()
            self._workers += fresh

    def _map(self, items: Sequence[Item]) -> list[Optional[bool]]:
        results: list[Optional[bool]] = [None] * len(items)
        if not items:
            return results
        self._fill()
        chunk = max(1, min(32, len(items) // (4 * self.processes)))
        queue = deque((i, g, p) for i, (g, p) in enumerate(items))
        done = 0
        while done < len(items):
            for w in self._workers:
                if not w.pending and queue:
                    w.give([queue.popleft() for _ in range(min(chunk, len(queue)))])
            busy = [w for w in self._workers if w.pending]
            ready = wait([w.conn for w in busy], timeout=min(1.0, self.timeout_s))
            now = time.monotonic()
            for w in list(busy):
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            idx, result = w.conn.recv()
                            w.pending.popleft()
                            results[idx] = result
                            done += 1
                            w.last_progress = now
                    except (EOFError, OSError):
                        pass  # the worker died; handled below as a hang
                if w.pending and (now - w.last_progress > self.timeout_s or not w.proc.is_alive()):
                    hung = w.pending.popleft()  # scores None: it hung or crashed its process
                    queue.extendleft(reversed(w.pending))
                    w.pending.clear()
                    w.kill()
                    self.killed_workers += 1
                    self._workers[self._workers.index(w)] = self._start_worker()
                    results[hung[0]] = None
                    done += 1
        return results

    def _start_worker(self) -> _Worker:
        w = _Worker(self._ctx, self.check, self.timeout_s, self.warmup)
        w.wait_ready()
        return w

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.close()
            self._workers.clear()


_POOLS: dict[tuple, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(check: Callable, processes: int, timeout_s: float, warmup: Optional[Item] = None) -> VerifierPool:
    """One pool per (check, processes, timeout) in this process, closed at exit."""
    key = (check.__module__, check.__qualname__, processes, timeout_s)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = VerifierPool(check, processes, timeout_s, warmup)
        return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
