"""A partition worker's two kinds of housekeeping: messages to and from the other workers
(:class:`Mailbox`) and which of its partitions stay in memory (:class:`Resident`).

Messages never pass through the driver: a worker sends each message to the worker hosting its
destination partition (``deliver``, which on Ray runs on its own thread while the receiver
computes), waits for the receipts before its step returns, and the driver's barrier between steps
makes every message of step t available at step t+1.

A worker hosts its share of the partitions and parks those that do not fit its memory budget
(``select.worker_memory_mb``) on node-local disk between uses (pickled; loaded again when it is
their turn: the "spill"). Node-local, not the workdir: the parked state changes every round and is
worthless once the stage ends, while the durable input (the shuffle files) is in the workdir, so a
lost worker costs a rerun of the stage from those files, never lost data.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np


class Mailbox:
    """Messages keyed by (kind, round, destination partition); ``exchange`` counts the seconds
    spent sending and waiting for receipts since the last :meth:`reset`."""

    def __init__(self, host_id: int, host_of):
        self.host_id = host_id
        self.host_of = host_of  # destination partition -> its worker
        self.inbox: dict[tuple, list] = defaultdict(list)
        self.lock = threading.Lock()
        self.peers: list | None = None
        self.remote = False
        self.acks: list = []
        self.exchange = 0.0

    def set_peers(self, peers: list, remote: bool) -> None:
        self.peers, self.remote = peers, remote

    def deliver(self, kind: str, rnd: int, dst: int, src: int, payload) -> None:
        with self.lock:
            self.inbox[(kind, rnd, dst)].append((src, payload))

    def send(self, kind: str, rnd: int, dst: int, src: int, payload) -> None:
        t0 = time.perf_counter()
        host = self.host_of[dst]
        if host == self.host_id:
            self.deliver(kind, rnd, dst, src, payload)
        elif not self.remote:
            self.peers[host].deliver(kind, rnd, dst, src, payload)
        else:
            self.acks.append(self.peers[host].deliver.remote(kind, rnd, dst, src, payload))
        self.exchange += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait for the receipts of the messages sent (Ray): the step's messages are delivered."""
        t0 = time.perf_counter()
        if self.acks:
            import ray

            ray.get(self.acks)
            self.acks = []
        self.exchange += time.perf_counter() - t0

    def take(self, kind: str, rnd: int, dst: int) -> list:
        """The messages for partition ``dst``, by sender."""
        with self.lock:
            got = self.inbox.pop((kind, rnd, dst), [])
        return sorted(got, key=lambda m: m[0])

    def reset(self) -> None:
        self.exchange = 0.0


def nbytes(obj, seen=None) -> int:
    """Bytes of the numpy (and pyarrow) arrays an object holds (through nested plain objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None else 0
    if type(obj).__module__.startswith("pyarrow"):  # a pool's uids (pyarrow strings)
        return int(getattr(obj, "nbytes", 0))
    if isinstance(obj, dict):
        return sum(nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return nbytes(vars(obj), seen)
    return 0


class Resident:
    """A worker's partitions (any object per partition id): in memory up to ``limit`` bytes, the
    others parked in ``spill_dir``."""

    def __init__(self, pids: list[int], limit: int | None, spill_dir: str):
        self.pids = pids
        self.limit = limit
        self.spill_dir = spill_dir
        self.parts: dict[int, Any] = {}
        self.parked: dict[int, str] = {}
        self.spilled_bytes = 0

    def get(self, pid: int):
        if pid not in self.parts and pid in self.parked:
            with open(self.parked.pop(pid), "rb") as fh:
                self.parts[pid] = pickle.load(fh)
        return self.parts.get(pid)

    def set(self, pid: int, value) -> None:
        self.parts[pid] = value

    def release(self, pid: int) -> None:
        """After using partition pid: park it when the resident partitions exceed the budget (the
        ones used earlier in a step stay resident, so each step loads only the overflow)."""
        if self.limit is None or len(self.parts) <= 1 or self.resident_bytes() <= self.limit:
            return
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, f"part-{pid:05d}.pkl")
        with open(path, "wb") as fh:
            pickle.dump(self.parts.pop(pid), fh, protocol=5)
        self.spilled_bytes += os.path.getsize(path)
        self.parked[pid] = path

    def step(self, fn: Callable[[int, Any], tuple[Any, Any]]) -> dict[int, Any]:
        """``fn(pid, held) -> (held next, report)`` for every partition in turn (loaded back when
        parked, released after its use); the reports."""
        out = {}
        for pid in self.pids:
            held, out[pid] = fn(pid, self.get(pid))
            self.parts[pid] = held
            self.release(pid)
        return out

    def resident_bytes(self) -> int:
        return sum(nbytes(p) for p in self.parts.values())

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


__all__ = ["Mailbox", "Resident", "nbytes"]
