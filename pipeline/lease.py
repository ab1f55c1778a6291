"""One job per work directory: a lease with a heartbeat, on a local path or on S3.

Two jobs on one workdir would both embed every shard and both write every output shard. The job
runner therefore takes ``WORKDIR/_LEASE.json`` before it writes anything and keeps it fresh with a
heartbeat until it ends, also when it fails::

    lease = acquire(store, workdir, {"command": "d2prune run job.yaml"})   # LeaseHeldError (exit 5)
    try: ... finally: lease.release()

A job stopped by SIGTERM or SIGINT releases its lease on the way out (the ``finally`` above, and
:func:`release_all` for whatever the signal interrupted), so the next run starts at once.

The record names its holder (host, pid, Ray job id when there is one, since when, its command),
so the refusal says who to wait for; ``d2prune lease CONFIG`` prints it (:func:`holder`).

**When is a lease free?** When there is none, when its heartbeat is older than the timeout the
holder wrote into it (a job that died without releasing: SIGKILL, a lost node), or when the holder
ran on this very machine and its process is gone (same host, boot and pid namespace, and no
process with that pid and start time): a job killed a minute ago is taken over at once by a rerun
on the same machine, and after ``timeout_s`` from anywhere.

**Why two jobs racing for a free lease cannot both win.**

* Local paths (and NFS): the read-decide-write runs under an exclusive ``flock`` on
  ``WORKDIR/_LEASE.lock``, and the record is replaced atomically (rename). Only one process is
  inside at a time, and it sees what the previous one wrote.
* Object stores: every write is conditional. Creating the lease uses ``If-None-Match: *`` and
  taking over a stale one uses ``If-Match: <ETag of the stale record it read>``, so when two jobs
  race, S3 applies at most one of the writes and the other gets 412 Precondition Failed (AWS S3
  since 2024, MinIO, R2; moto in the tests). Heartbeats use ``If-Match`` with the ETag of our own
  last write, so a job that lost its lease (it stalled past the timeout and was taken over) finds
  out at its next heartbeat instead of overwriting the new holder.
* Belt and braces, for stores that accept the conditional headers but do not enforce them (or
  where they are disabled, ``conditional=False``): after writing, the job waits ``settle_s`` and
  reads the record back; it holds the lease only if the record still carries its own random token.
  With read-after-write consistency (S3's since 2020) this is safe on its own provided each racer
  completes its write within ``settle_s / 2`` of starting the read it decided on, which
  :func:`acquire` checks (and refuses otherwise): a racer whose write lands after our read-back
  must have started its read after our write was visible, and so saw our fresh lease and backed off;
  a racer whose write lands before our read-back is what the read-back sees.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import LeaseHeldError
from .storage import Store, is_local, join

log = logging.getLogger(__name__)

LEASE = "_LEASE.json"
LOCK = "_LEASE.lock"
TIMEOUT_S = 300.0  # a holder whose heartbeat is older than this is dead (minutes of clock skew are fine)
SETTLE_S = 2.0  # object stores: wait before reading our write back (see the module docstring)

__all__ = ["LEASE", "Lease", "LeaseHeldError", "LeaseLostError", "acquire", "describe", "holder", "release_all"]


class LeaseLostError(RuntimeError):
    """Our lease was taken over by another job (ours had stalled past its timeout): stop writing."""


# -- who we are ------------------------------------------------------------------------------------

def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.readline().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
    pid, it names one process for as long as the machine is up (pids are reused, this pair is not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _machine() -> dict[str, Any]:
    """What makes a pid meaningful: host name, boot, pid namespace (containers share host names)."""
    return {"host": socket.gethostname(), "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": _pid_namespace()}


def _ray_job_id() -> str | None:
    """The Ray job this process belongs to: the submission id of a ``ray job submit`` entrypoint,
    else the driver's job id once Ray is initialised."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
        if meta.get("job_submission_id"):
            return str(meta["job_submission_id"])
    except ValueError:
        pass
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is not None and ray.is_initialized():
        try:
            return ray.get_runtime_context().get_job_id()
        except Exception:  # noqa: BLE001 - the id is informative only
            return None
    return None


# -- the record ------------------------------------------------------------------------------------

def _is_live(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the job that wrote `record` may still be running (module docstring)."""
    now = time.time() if now is None else now
    if now - float(record.get("heartbeat_at", 0)) > float(record.get("timeout_s", TIMEOUT_S)):
        return False
    here = _machine()
    same_machine = all(record.get(k) == here[k] and here[k] is not None for k in ("host", "boot_id", "pid_namespace"))
    if same_machine and record.get("pid_start") is not None:
        return _process_start(int(record["pid"])) == record["pid_start"]
    return True


def describe(record: dict[str, Any]) -> str:
    """One line naming a lease holder."""
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(record.get("started_at", 0))))
    beat = time.time() - float(record.get("heartbeat_at", 0))
    ray_job = f", Ray job {record['ray_job_id']}" if record.get("ray_job_id") else ""
    command = f", running `{record['command']}`" if record.get("command") else ""
    return (f"host {record.get('host')}, pid {record.get('pid')}{ray_job}, since {since}{command} "
            f"(last heartbeat {beat:.0f} s ago, taken over after {float(record.get('timeout_s', TIMEOUT_S)):.0f} s "
            "without one)")


# -- storage access ----------------------------------------------------------------------------------

class _PreconditionFailed(Exception):
    """A conditional write found the record changed (another job wrote it)."""


class _Backend:
    """Read and conditionally write the lease record of one workdir."""

    def __init__(self, store: Store, workdir: str, conditional: bool = True):
        self.store, self.workdir = store, workdir
        self.url = join(workdir, LEASE)
        self.local = is_local(workdir)
        self.conditional = conditional

    # local: an flock serialises every read-decide-write
    @contextmanager
    def critical(self) -> Iterator[None]:
        if not self.local:
            yield
            return
        directory = self.store.path(self.workdir)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(record, version): the version is the ETag on object stores (None locally)."""
        if self.local:
            try:
                return json.loads(self.store.read_bytes(self.url)), None
            except FileNotFoundError:
                return None, None
            except ValueError:  # a torn or foreign file: treat as no lease (we hold the flock)
                return None, None
        from fsspec.asyn import sync

        fs = self.store.fs(self.url)
        bucket, key, _ = fs.split_path(self.store.path(self.url))
        try:
            # one GET gives the body and the ETag of the same version (an If-Match on a separately
            # read ETag could overwrite a newer, live record)
            data, etag = sync(fs.loop, _get_object, fs, bucket, key)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError:
            return None, etag

    def write(self, record: dict[str, Any], expect: str | None, exists: bool) -> str | None:
        """Write `record`; on object stores only if the stored version is still `expect` (or, when
        `exists` is False, only if there is none). Returns the new version."""
        data = json.dumps(record, sort_keys=True).encode()
        if self.local:
            self.store.write_bytes(self.url, data)
            return None
        fs = self.store.fs(self.url)
        bucket, key, _ = fs.split_path(self.store.path(self.url))
        condition: dict[str, str] = {}
        if self.conditional:
            condition = {"IfMatch": expect} if exists and expect else {} if exists else {"IfNoneMatch": "*"}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, OSError) as err:
            if _is_precondition_failure(err):
                raise _PreconditionFailed(str(err)) from None
            raise
        return response.get("ETag")

    def delete(self, expect: str | None) -> None:
        if self.local:
            self.store.rm(self.url)
            return
        fs = self.store.fs(self.url)
        bucket, key, _ = fs.split_path(self.store.path(self.url))
        condition = {"IfMatch": expect} if self.conditional and expect else {}
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, **condition)
        except (FileNotFoundError, FileExistsError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _is_precondition_failure(err):
                return  # gone, or no longer ours: nothing of ours to delete
            raise


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str | None]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        return await body.read(), response.get("ETag")
    finally:
        body.close()


def _is_precondition_failure(err: BaseException) -> bool:
    if isinstance(err, FileExistsError):  # s3fs's translation of If-None-Match failures
        return True
    text = f"{err} {err.__cause__ or ''}"
    return "PreconditionFailed" in text or "Precondition Failed" in text or "412" in text \
        or "ConditionalRequestConflict" in text


# -- the lease ---------------------------------------------------------------------------------------

@dataclass
class Lease:
    """A held lease. ``renew()`` refreshes the heartbeat (the background thread calls it every
    ``heartbeat_s``); ``check()`` raises LeaseLostError once a heartbeat found it taken over;
    ``release()`` stops the heartbeat and removes the record (idempotent)."""

    backend: _Backend
    record: dict[str, Any]
    version: str | None
    heartbeat_s: float
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def token(self) -> str:
        return self.record["token"]

    def start_heartbeat(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="d2prune-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; the timeout is long
                log.warning("lease heartbeat on %s failed (%s: %s); retrying in %.0f s", self.backend.url,
                            type(err).__name__, err, self.heartbeat_s)

    def renew(self) -> None:
        """Write a fresh heartbeat; LeaseLostError when another job holds the lease now."""
        with self._lock, self.backend.critical():
            if self.lost:
                raise LeaseLostError(self.lost)
            record = dict(self.record, heartbeat_at=time.time())
            record["ray_job_id"] = record.get("ray_job_id") or _ray_job_id()
            if self.backend.local or not self.backend.conditional:
                current, _ = self.backend.read()
                if current is None or current.get("token") != self.token:
                    self._lose(current)
            try:
                self.version = self.backend.write(record, self.version, exists=True)
            except _PreconditionFailed:
                self._lose(self.backend.read()[0])
            self.record = record

    def _lose(self, current: dict[str, Any] | None) -> None:
        who = describe(current) if current else "nobody (the record was removed)"
        self.lost = f"the lease on {self.backend.workdir} was taken over by {who}: this job stops writing"
        log.error("%s", self.lost)
        raise LeaseLostError(self.lost)

    def check(self) -> None:
        if self.lost:
            raise LeaseLostError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock, self.backend.critical():
            if not self.lost:
                current, version = self.backend.read()
                if current is not None and current.get("token") == self.token:
                    self.backend.delete(version)
                self.lost = "released"
        with _HELD_LOCK:  # only once released (an interrupted release is retried by release_all)
            _HELD.pop(id(self), None)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[int, Lease] = {}  # the leases this process holds (released ones leave)
_HELD_LOCK = threading.Lock()


def release_all() -> list[str]:
    """Release every lease this process still holds (the job was stopped by a signal: whatever
    the stop interrupted, the next run must not wait out the takeover timeout); the workdirs.
    Best effort: a lease that cannot be released is logged (a rerun on this machine takes it over
    at once, elsewhere after its timeout)."""
    with _HELD_LOCK:
        held = list(_HELD.values())
    released = []
    for lease in held:
        try:
            lease.release()
            released.append(lease.backend.workdir)
        except Exception as err:  # noqa: BLE001 - stopping must go on
            log.warning("could not release the lease on %s: %s: %s", lease.backend.workdir, type(err).__name__, err)
    return released


def holder(store: Store, workdir: str) -> dict[str, Any] | None:
    """The live holder's record, or None when the lease is free (no record, or a stale one)."""
    record, _ = _Backend(store, workdir).read()
    return record if record is not None and _is_live(record) else None


def acquire(store: Store, workdir: str, owner_info: dict[str, Any] | None = None, timeout_s: float = TIMEOUT_S,
            heartbeat_s: float | None = None, settle_s: float = SETTLE_S, conditional: bool = True,
            heartbeat: bool = True) -> Lease:
    """Take the workdir's lease (module docstring) and start its heartbeat; LeaseHeldError naming
    the holder when another live job has it. `owner_info` is added to the record (e.g. the command)."""
    backend = _Backend(store, workdir, conditional)
    me = _machine()
    now = time.time()
    record = {**(owner_info or {}), **me, "token": secrets.token_hex(16), "pid": os.getpid(),
              "pid_start": _process_start(os.getpid()), "ray_job_id": _ray_job_id(), "started_at": now,
              "heartbeat_at": now, "timeout_s": float(timeout_s)}
    with backend.critical():
        if not backend.local:
            backend.read()  # connects (seconds, the first time): not part of the timed window below
        started = time.monotonic()
        current, version = backend.read()
        if current is not None and _is_live(current):
            raise LeaseHeldError(f"workdir {workdir} is in use by another job: {describe(current)}")
        if current is not None:
            log.warning("taking over the stale lease on %s (%s)", workdir, describe(current))
        try:
            version = backend.write(record, version, exists=current is not None or version is not None)
        except _PreconditionFailed:
            winner, _ = backend.read()
            who = describe(winner) if winner else "another job (it has released it since; rerun)"
            raise LeaseHeldError(f"workdir {workdir} was taken by another job at the same time: {who}") from None
        window = time.monotonic() - started
    if not backend.local:
        if window > settle_s / 2:
            raise LeaseHeldError(
                f"taking the lease on {workdir} took {window:.1f} s (more than {settle_s / 2:.1f} s): another job may "
                "have taken it at the same time; rerun (the record left behind is ours and is taken over at once "
                "by a rerun on this machine)")
        time.sleep(settle_s)
        readback, version = backend.read()
        if readback is None or readback.get("token") != record["token"]:
            who = describe(readback) if readback else "nobody (the record vanished)"
            raise LeaseHeldError(f"workdir {workdir} was taken by another job at the same time: {who}")
    lease = Lease(backend, record, version, heartbeat_s or max(0.5, timeout_s / 10))
    with _HELD_LOCK:
        _HELD[id(lease)] = lease
    log.info("holding the lease on %s (heartbeat every %.0f s, taken over after %.0f s without one)", workdir,
             lease.heartbeat_s, timeout_s)
    return lease.start_heartbeat() if heartbeat else lease
