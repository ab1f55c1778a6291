"""Clean up an embedded local Ray whose driver died without shutting it down (SIGKILL, OOM kill).

An embedded Ray (``ray.init()`` without an address) fate-shares its raylet and GCS with the driver
(they get SIGKILL when it dies), but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive it: they notice the raylet is gone and call ``sys.exit`` from an
asyncio task, which leaves their non-daemon threads running (measured with Ray 2.60: both still
alive minutes after the driver's SIGKILL, re-parented to init, ~200 MB RSS between them). Every
killed job would leak two processes.

So after starting an embedded Ray the driver starts this watchdog (:func:`start`): a small process
in its own session that holds the read end of a pipe whose write end only the driver has. When
the driver dies, however it dies, the kernel closes the write end and the watchdog's read returns.
It then waits a few seconds for Ray's own clean-up and ends what is left of *that* Ray instance:
the processes whose environment names the instance's raylet (``RAY_RAYLET_PID=<pid>``, set by
the raylet for the workers it starts) or its node (``RAY_NODE_ID=<id>``: the agents have only
that) and that started after that raylet (so a reused pid can
never match), owned by the same user. SIGTERM first, SIGKILL after a grace period. On a normal
exit Ray has already shut everything down and the watchdog finds nothing to do.

A driver stopped by SIGTERM or SIGINT (:func:`pipeline.runtime.finish_stop`) hands its embedded Ray
to the watchdog: it writes the (pid, start) of its node's processes (:func:`stop_message`) and ends
itself; the watchdog then ends them at once (:func:`end_now`), and everything the raylet started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

GRACE_S = 3.0


def _stat_field(pid: int, index: int) -> int | None:
    """Field `index` of /proc/PID/stat, counted from the one after the command name (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[index])


def _start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/PID/stat field 22)."""
    return _stat_field(pid, 19)


def _parent(pid: int) -> int | None:
    return _stat_field(pid, 1)


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _parent(int(name)) == pid]


def instance_processes(raylet_pid: int, raylet_start: int, node_id: str | None = None) -> list[int]:
    """Live processes of this user started by the Ray instance whose raylet is `raylet_pid` (started
    at `raylet_start`; its node `node_id`), the raylet included: its children (the agents: Ray 2.60
    starts them with neither ``RAY_RAYLET_PID`` nor, in some set-ups, ``RAY_NODE_ID`` in their
    environment, and they ignore SIGTERM) and whatever names the raylet or the node in its
    environment (the workers)."""
    markers = {f"RAY_RAYLET_PID={raylet_pid}".encode()}
    if node_id:
        markers.add(f"RAY_NODE_ID={node_id}".encode())
    uid = os.getuid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            start = _start_ticks(pid)
            if start is None or start < raylet_start:
                continue
            if pid == raylet_pid or _parent(pid) == raylet_pid:
                found.append(pid)
                continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if markers.intersection(fh.read().split(b"\0")):
                    found.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def reap(raylet_pid: int, raylet_start: int, grace_s: float = GRACE_S, node_id: str | None = None) -> list[int]:
    """End what is left of the Ray instance (module docstring); returns the pids signalled."""
    time.sleep(grace_s)  # Ray's own fate-sharing first
    return end_instance(raylet_pid, raylet_start, grace_s, node_id)


def end_instance(raylet_pid: int, raylet_start: int, grace_s: float = GRACE_S, node_id: str | None = None) -> list[int]:
    """SIGTERM to every process of the Ray instance, SIGKILL to those left after `grace_s`; the pids
    signalled."""
    left = instance_processes(raylet_pid, raylet_start, node_id)
    if not left:
        return []
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and instance_processes(raylet_pid, raylet_start, node_id):
        time.sleep(0.2)
    _signal_all(instance_processes(raylet_pid, raylet_start, node_id), signal.SIGKILL)
    return left


def start(raylet_pid: int, node_id: str | None = None) -> subprocess.Popen | None:
    """Start the watchdog for the embedded Ray whose raylet is `raylet_pid` (on node `node_id`;
    Linux only; None elsewhere or when the raylet cannot be identified). The returned process
    object must be kept: its stdin pipe is what tells the watchdog that this driver is alive."""
    raylet_start = _start_ticks(raylet_pid)
    if raylet_start is None or not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen(
        # the file itself (stdlib imports only), -P: without its folder on sys.path
        [sys.executable, "-P", os.path.abspath(__file__), str(raylet_pid), str(raylet_start)]
        + ([node_id] if node_id else []),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: a ^C or group kill spares it
        close_fds=True,
    )


def stop_message(processes: list[tuple[int, int]]) -> bytes:
    """What a driver stopped by SIGTERM/SIGINT writes to its watchdog just before it ends itself: the
    (pid, start) of the processes its embedded Ray's node started (GCS, raylet, monitors), which
    the watchdog ends as soon as the driver is gone, without waiting for fate-sharing."""
    return ("stop " + " ".join(f"{pid}:{start}" for pid, start in processes) + "\n").encode()


def _parse_stop(data: bytes) -> list[tuple[int, int]] | None:
    for line in data.splitlines():
        if line.startswith(b"stop"):
            pairs = [item.split(b":") for item in line.split()[1:]]
            return [(int(pid), int(start)) for pid, start in pairs]
    return None


def end_now(processes: list[tuple[int, int]], raylet_pid: int, raylet_start: int, grace_s: float = GRACE_S,
            node_id: str | None = None) -> None:
    """End a stopped driver's embedded Ray at once: SIGTERM to the node's own processes (each only
    if it is still the process the driver named: same pid and start), then the instance's
    (:func:`end_instance`: workers, agents; SIGKILL after `grace_s`), then SIGKILL to node
    processes still there."""
    def alive() -> list[int]:
        return [pid for pid, start in processes if _start_ticks(pid) == start]

    _signal_all(alive(), signal.SIGTERM)
    end_instance(raylet_pid, raylet_start, grace_s, node_id)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    _signal_all(alive(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    raylet_pid, raylet_start = int(argv[0]), int(argv[1])
    node_id = argv[2] if len(argv) > 2 else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    received = b""
    while True:  # b"" once the driver (the only writer) is gone
        chunk = sys.stdin.buffer.read1(65536)
        if not chunk:
            break
        received = (received + chunk)[-65536:]
    stop = _parse_stop(received)
    if stop is not None:  # the driver was stopped by a signal and asked for its Ray to end now
        end_now(stop, raylet_pid, raylet_start, node_id=node_id)
    else:
        reap(raylet_pid, raylet_start, node_id=node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
