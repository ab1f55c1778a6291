"""Ray at the edges: start-up (the same code on a laptop and a cluster) and the one place the
stages ask Ray what they may use.

* :func:`init_ray`: an embedded local Ray, or the cluster at ``--address`` / ``RAY_ADDRESS`` /
  ``ray.address`` (in that order), saying in the log which settings are used and which ignored; a
  driver started in Ray's copy of the job's working dir leaves it first
  (:func:`leave_ray_working_dir_copy`: another node may replace that copy under it).
* :func:`resources`: CPUs and GPUs of the cluster and of its largest node (a one-worker step such
  as IVF training or the index merge takes a whole node's cores).
* :func:`task_cpus`: inside a task, the CPUs Ray reserved for it (threads to use, so concurrent
  tasks on a node do not oversubscribe its cores).
* :func:`as_completed`: results of tasks in completion order (drivers never rely on submission
  order for anything but scheduling; the stages' steps, :mod:`pipeline.steps`, collect their Ray
  tasks through it); each result is progress for the stall detector.
* :func:`on_every_node`: a small function once on every alive node (what the per-node checks and
  cleanups below are made of): :func:`check_cluster_paths` (local paths a multi-node cluster
  cannot see are refused before any work), :func:`unseen_paths`, :func:`clear_node_caches`.
* :func:`ship_file`: a driver-local file (a checkpoint) through the object store into each node's
  cache, for clusters whose nodes do not share the driver's filesystem.
* :func:`peak_rss_bytes`: this process's peak memory (what the stages report for their driver and
  workers).
* :func:`stop_signals`: SIGTERM and SIGINT (a preempted pod, a Slurm time limit, ``ray job stop``,
  ^C) stop the job the same way: the running stage is interrupted at once
  (:class:`~pipeline.errors.JobInterrupted`), the lease is released, an embedded Ray is shut down
  (a joined cluster is only disconnected from), one line on stderr, exit 128 + the signal (143, 130).

Why the handlers are installed again after every ``ray.init``: Ray replaces the driver's SIGTERM
handler twice on the way up, in Python (``sys.exit``; for an embedded Ray, a handler that drains the
node for up to 30 s and exits 1) and in C++ (the core worker installs absl's failure signal handler
for SIGTERM, which prints a stack through ``logging.cc`` and arms a 3 s ``alarm`` that ends the
process with SIGABRT, whatever Python is doing by then). Installing ours afterwards replaces both
(``signal.signal`` is a ``sigaction``) for SIGTERM only; absl keeps the real crash signals (SIGSEGV,
SIGABRT, ...).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn

from .config import JobConfig, RayConfig
from .errors import ConfigError, JobInterrupted
from .storage import Store, expand_urls, is_local, node_local_files
from .watchdog import beat

log = logging.getLogger(__name__)


def cluster_address(ray_cfg: RayConfig, address: str | None = None) -> tuple[str | None, str]:
    """The cluster to join and where that came from: ``--address``, then ``RAY_ADDRESS`` (what
    `ray job submit` and KubeRay set for the cluster the job was submitted to), then
    ``ray.address``; (None, ...) = an embedded local Ray."""
    if address:
        return address, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if ray_cfg.address:
        return ray_cfg.address, "ray.address in the config"
    return None, "no --address, RAY_ADDRESS or ray.address"


def init_ray(ray_cfg: RayConfig | None = None, address: str | None = None):
    """Join the cluster of :func:`cluster_address`, else start an embedded local Ray, and say in
    the log which ``ray`` settings are used and which are ignored. Idempotent: an already
    initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        return ray
    ray_cfg = ray_cfg or RayConfig()
    address, source = cluster_address(ray_cfg, address)
    local_only = {f"ray.{k}": getattr(ray_cfg, k) for k in ("num_cpus", "object_store_memory") if getattr(ray_cfg, k)}
    if address:
        leave_ray_working_dir_copy()
        with _ray_handlers_replaced():
            ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s (from %s): %s", address, source, describe_cluster())
        if ray_cfg.address and ray_cfg.address != address:
            log.info("ray.address=%s in the config is ignored: %s wins", ray_cfg.address, source)
        if local_only:
            log.info("%s ignored: they size an embedded local Ray; a cluster's nodes have their own "
                     "(ray start --num-cpus / --object-store-memory)",
                     ", ".join(f"{k}={v}" for k, v in local_only.items()))
    else:
        # address="local": always a new embedded Ray, never a `ray start` cluster that happens to
        # run on this machine (plain ray.init() would join it, and then refuse num_cpus)
        kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": True}
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_memory:
            kwargs["object_store_memory"] = ray_cfg.object_store_memory
        with _ray_handlers_replaced():
            ray.init(**kwargs)
        log.info("started an embedded local Ray (%s) with %s; used: %s", source, ray.cluster_resources(),
                 ", ".join(f"{k}={v}" for k, v in local_only.items()) or "the machine's defaults")
        _watch_embedded_ray()
    return ray


# where Ray unpacks a job's working dir on a node (``ray job submit --working-dir``): the driver's
# cwd, and every task's on that node
RAY_WORKING_DIR_COPIES = os.path.join("runtime_resources", "working_dir_files")


def leave_ray_working_dir_copy() -> str | None:
    """Move the driver out of Ray's unpacked copy of the job's working dir (its cwd under ``ray job
    submit --working-dir``) before the cluster runs any task, and return the directory left (None
    when the cwd is not such a copy).

    Why: Ray nodes that share a temp dir (several ``ray start`` on one machine take the head's) share
    that copy's path, and a node setting up the working dir for its first task of the job deletes it
    and unpacks it again (Ray's working-dir plugin unpacks with ``overwrite=True``). The driver's cwd
    is then a deleted directory: ``os.getcwd()`` fails, and torch's bundled oneMKL cannot resolve its
    own library and ends the process (``Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so``,
    exit 2 or 139). The job needs no cwd once its config is loaded (its relative paths are resolved
    by then), and the package stays importable through the copy's absolute path on ``sys.path``."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # already replaced under us: nothing left to lose
        cwd = None
    if cwd is not None and f"{os.sep}{RAY_WORKING_DIR_COPIES}{os.sep}" not in cwd:
        return None
    os.chdir(tempfile.gettempdir())
    log.debug("left Ray's copy of the working dir %s for %s (another node may replace it)", cwd, os.getcwd())
    return cwd or "(deleted)"


_WATCHDOGS: list = []  # kept for the driver's lifetime: their stdin pipes are the driver's heartbeat


def _watch_embedded_ray() -> None:
    """Start :mod:`pipeline.reaper` for the embedded Ray just started, so its agents do not outlive
    a driver killed without shutting Ray down."""
    from . import reaper

    try:
        import ray._private.ray_constants as ray_constants
        from ray._private import worker

        raylet = worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    except Exception as err:  # noqa: BLE001 - a private API: without it, no watchdog (logged)
        log.debug("no Ray watchdog: raylet pid unknown (%s)", err)
        return
    try:
        node_id = str(worker._global_node.node_id)
    except Exception:  # noqa: BLE001 - without it the agents are not found (pipeline.reaper)
        node_id = None
    watchdog = reaper.start(raylet, node_id)
    if watchdog is not None:
        _WATCHDOGS.append(watchdog)


def describe_cluster() -> str:
    """Nodes and resources now, for logs and the stall error ('' before Ray is started)."""
    import ray

    if not ray.is_initialized():
        return ""
    nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    total, free = ray.cluster_resources(), ray.available_resources()
    text = (f"{len(alive)} alive node(s) ({len(nodes) - len(alive)} lost), "
            f"CPU {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}")
    if total.get("GPU"):
        text += f", GPU {free.get('GPU', 0):g} free of {total.get('GPU', 0):g}"
    return text


@dataclass(frozen=True)
class Resources:
    cpus: float  # the whole cluster's, now
    gpus: float
    max_node_cpus: int  # the largest live node's (>= 1)
    # what the cluster's autoscaler may add up to (its node groups' max counts x resources: a
    # KubeRay GPU group at minReplicas 0); equal to the above without an autoscaler
    possible_cpus: float = 0.0
    possible_gpus: float = 0.0
    memory_per_cpu: float = 0.0  # bytes: the lowest of the live nodes' memory / CPUs (0 unknown)


def _autoscaler_maxima() -> dict[str, float]:
    """The autoscaler's declared maximum resources ({} without an autoscaler, or when this Ray
    cannot say: a private API, used only to not miss GPUs that are not up yet)."""
    try:
        from ray._private.state import state

        return {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception as err:  # noqa: BLE001 - optional knowledge; absent means "what is up now"
        log.debug("no autoscaler resource maxima: %s", err)
        return {}


def resources() -> Resources:
    """What the (initialised) cluster offers now, and what its autoscaler may add."""
    import ray

    total = ray.cluster_resources()
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = [r.get("CPU", 0) for r in alive]
    per_cpu = [r.get("memory", 0) / r["CPU"] for r in alive if r.get("CPU") and r.get("memory")]
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    maxima = _autoscaler_maxima()
    return Resources(cpus=cpus, gpus=gpus, max_node_cpus=max(1, int(max(node_cpus, default=1))),
                     possible_cpus=max(cpus, maxima.get("CPU", 0.0)), possible_gpus=max(gpus, maxima.get("GPU", 0.0)),
                     memory_per_cpu=min(per_cpu, default=0.0))


def task_cpus() -> int:
    """CPUs Ray reserved for the calling task or actor (>= 1); 1 outside Ray."""
    import ray

    if not ray.is_initialized():
        return 1
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(cpus))


def as_completed(refs: list) -> Iterator[Any]:
    """Results of Ray tasks in completion order."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        result = ray.get(ready[0])
        beat(f"the next of {len(refs)} Ray tasks ({len(refs) - len(pending)} done)")
        yield result


# -- once on every node ------------------------------------------------------------------------

def on_every_node(fn: Callable[..., Any], *args: Any, timeout_s: float = 300.0) -> dict[str, Any]:
    """``fn(*args)`` once on every alive node (a zero-CPU task pinned to the node, so it runs even on
    a head started with ``--num-cpus 0``): node IP and id -> result. A node that leaves meanwhile,
    or does not answer within `timeout_s`, is left out (and logged)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    nodes = {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in ray.nodes() if n.get("Alive")}
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args): node
            for node in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    results: dict[str, Any] = {}
    for ref in ready:
        try:
            results[nodes[refs[ref]]] = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # fn itself failed
        except ray.exceptions.RayError as err:  # the node died or left before it ran
            log.info("node %s left before running %s: %s", nodes[refs[ref]], fn.__name__, type(err).__name__)
    for ref in pending:
        log.warning("node %s did not run %s within %.0f s", nodes[refs[ref]], fn.__name__, timeout_s)
        ray.cancel(ref, force=True)
    return results


def _missing_here(files: dict[str, int], probes: dict[str, str]) -> list[str]:
    """Of `files` (path -> size) and `probes` (path -> content), those this node does not see as
    the driver wrote them."""
    missing = [p for p, size in files.items() if not (os.path.isfile(p) and os.path.getsize(p) == size)]
    for path, token in probes.items():
        try:
            with open(path) as fh:
                seen = fh.read() == token
        except OSError:
            seen = False
        if not seen:
            missing.append(path)
    return missing


def unseen_paths(files: dict[str, int], probes: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Path -> the nodes that do not see it as the driver does (same size; a probe file with the same
    content). Empty on an embedded or one-node Ray."""
    import ray

    if not ray.is_initialized() or len([n for n in ray.nodes() if n.get("Alive")]) < 2:
        return {}
    out: dict[str, list[str]] = {}
    for node, missing in on_every_node(_missing_here, files, probes or {}).items():
        for path in missing:
            out.setdefault(path, []).append(node)
    return out


def _local_inputs(cfg: JobConfig) -> list[tuple[str, str]]:
    """(field, path) of every local file the job reads on the workers."""
    specs = [("input.shards", cfg.input.shards), ("select.score_file", cfg.select.score_file)]
    if cfg.embed.encoder == "precomputed" and cfg.embed.precomputed is not None:
        specs += [("embed.precomputed.metadata", cfg.embed.precomputed.metadata),
                  ("embed.precomputed.embeddings", cfg.embed.precomputed.embeddings)]
    return [(field, url) for field, spec in specs if spec for url in expand_urls(spec) if is_local(url)]


def check_cluster_paths(cfg: JobConfig, store: Store, address: str | None = None) -> None:
    """On a multi-node cluster, every local path of the job must be the same file (inputs) or the
    same directory (``workdir``, ``output.url``: a probe file the driver writes must be readable
    from every node) on every node; otherwise ConfigError naming the path, before any work. (A
    local checkpoint is not checked here: the embed stage ships it to nodes that lack it.)"""
    inputs = [(f, p) for f, p in _local_inputs(cfg) if os.path.isfile(store.path(p))]
    outputs = [(f, p) for f, p in (("workdir", cfg.workdir), ("output.url", cfg.output.url)) if is_local(p)]
    if (not inputs and not outputs) or not cluster_address(cfg.ray, address)[0]:
        return
    init_ray(cfg.ray, address)
    named = {store.path(p): (field, p) for field, p in inputs}  # what a node reports -> what the user wrote
    probes: dict[str, str] = {}
    for field, directory in outputs:
        store.makedirs(directory)
        probe = os.path.join(store.path(directory), f".d2prune-visible-{uuid.uuid4().hex[:12]}")
        store.write_bytes(probe, probe.encode())
        probes[probe] = probe
        named[probe] = (field, directory)
    try:
        unseen = unseen_paths({store.path(p): os.path.getsize(store.path(p)) for _, p in inputs}, probes)
    finally:
        for probe in probes:
            store.rm(probe)
    if unseen:
        fields: dict[str, str] = {}  # field -> its first unseen path, in the config's order
        for path in sorted(unseen, key=lambda p: (list(named).index(p))):
            fields.setdefault(*named[path])
        nodes = sorted({node for seen_by in unseen.values() for node in seen_by})
        raise ConfigError(
            "local paths that are not the same on every node of the Ray cluster (node(s) "
            f"{', '.join(nodes[:3])} do not see them as the driver does): "
            + "; ".join(f"{field}: {path}" for field, path in fields.items())
            + ". Put them on a filesystem every node mounts at the same path, or use object storage (s3://...)"
        )


# -- node-local caches and shipped files ---------------------------------------------------------

def clear_node_caches(namespaces: list[str]) -> None:
    """Remove the node-local cache `namespaces` on every node (on this one when Ray is not started).
    Best effort: it runs after the stage's commit, which a failure here must not undo."""
    import ray

    from .storage import clear_node_cache

    if not namespaces:
        return
    if not ray.is_initialized():
        for namespace in namespaces:
            clear_node_cache(namespace)
        return
    try:
        on_every_node(_clear_node_caches, list(namespaces))
    except Exception as err:  # noqa: BLE001 - the stage is committed; a leftover cache is only disk space
        log.warning("could not remove the node caches %s on every node: %s", namespaces, err)


def _clear_node_caches(namespaces: list[str]) -> None:
    from .storage import clear_node_cache

    for namespace in namespaces:
        clear_node_cache(namespace)


@dataclass(frozen=True)
class ShippedFile:
    """A driver-local file in the object store, to be materialised once per node
    (:meth:`local_path`). The reference travels inside a list so Ray hands it on as a reference."""

    name: str
    sha256: str
    refs: tuple

    def local_path(self, namespace: str) -> str:
        """The file's path in this node's cache `namespace`, keyed by its content (sha256): a
        replaced file at the same driver path is a new entry, never the stale one."""
        import ray

        def fill(path: str) -> None:
            with open(path, "wb") as fh:
                fh.write(ray.get(self.refs[0]))

        return node_local_files(namespace, self.sha256, [self.name], [fill])[0]


def ship_file(path: str) -> ShippedFile:
    """Put a local file into the object store for :meth:`ShippedFile.local_path` on other nodes."""
    import ray

    with open(path, "rb") as fh:
        data = fh.read()
    return ShippedFile(os.path.basename(path), hashlib.sha256(data).hexdigest(), (ray.put(data),))


# -- stop signals -----------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# how long the clean-up after a stop signal may take (lease release, Ray shutdown) before the
# process ends anyway with the same line and code: below Kubernetes' and Slurm's default 30 s
# between SIGTERM and SIGKILL
STOP_GRACE_S = 20.0


class _Stopping:
    """The state of :func:`stop_signals` in this process."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.previous: dict[int, Any] = {}
        self.received: JobInterrupted | None = None
        self.finished = threading.Event()
        self._reported = False
        self._lock = threading.Lock()

    def report(self) -> None:
        """The one line on stderr (once, whoever ends the process)."""
        with self._lock:
            if self._reported or self.received is None:
                return
            self._reported = True
        print(f"d2prune: {self.received.message()}", file=sys.stderr, flush=True)

    def deadline(self) -> None:
        if not self.finished.wait(self.grace_s):
            # the clean-up hung (a store that does not answer, Ray that does not stop): end the process; an
            # embedded Ray's leftovers are ended by pipeline.reaper, an unreleased lease is taken over at
            # once by a rerun on this machine
            self.report()
            os._exit(self.received.code)


_stopping: _Stopping | None = None


def _running_stage(frame) -> str | None:
    """The stage the main thread was running when the signal came: the ``stage`` of the innermost
    :func:`pipeline.stage.run_stage` call on its stack (None: before or between stages)."""
    while frame is not None:
        if frame.f_code.co_name == "run_stage" and frame.f_globals.get("__name__") == "pipeline.stage":
            return getattr(frame.f_locals.get("stage"), "name", None)
        frame = frame.f_back
    return None


def _on_stop_signal(signum: int, frame) -> None:
    state = _stopping
    if state is None:  # not ours any more (a handler left behind): behave like Python's default
        raise KeyboardInterrupt
    if state.received is not None:
        return  # already stopping: a second SIGTERM (Slurm sends one to every process) or ^C waits for the first
    state.received = JobInterrupted(signum, _running_stage(frame))
    threading.Thread(target=state.deadline, name="d2prune-stop-deadline", daemon=True).start()
    raise state.received


def _install_stop_handlers() -> None:
    if _stopping is not None and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_stop_signal)


@contextmanager
def _ray_handlers_replaced() -> Iterator[None]:
    """Around ``ray.init``: ours again afterwards (module docstring); a SIGTERM that Ray's own
    handler turned into SystemExit meanwhile is the same stop."""
    try:
        yield
    except SystemExit:
        if _stopping is None:
            raise
        _stopping.received = _stopping.received or JobInterrupted(signal.SIGTERM)
        raise _stopping.received from None
    finally:
        _install_stop_handlers()


@contextmanager
def stop_signals(grace_s: float = STOP_GRACE_S) -> Iterator[None]:
    """While the block runs (the CLI's command), SIGTERM and SIGINT raise
    :class:`~pipeline.errors.JobInterrupted` in the main thread, also after Ray started (module
    docstring); the previous handlers come back afterwards. Outside the main thread: nothing."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _Stopping(grace_s)
    state.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _stopping = state
    _install_stop_handlers()
    try:
        yield
    finally:
        state.finished.set()
        _stopping = None
        for sig, handler in state.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stopped(err: BaseException) -> JobInterrupted | None:
    """The stop signal behind `err` (whatever a library made of the interrupt on its way up), or
    None when no stop signal came."""
    state = _stopping
    if state is not None and state.received is not None:
        return state.received
    return err if isinstance(err, JobInterrupted) else None


def finish_stop(code: int) -> NoReturn:
    """After a stop signal: release every lease still held, hand an embedded Ray to its watchdog
    (:mod:`pipeline.reaper`, which ends its GCS, raylet, agents and workers the moment this process
    is gone; a cluster joined by address is only left: ending this process disconnects it, the
    cluster and its other jobs go on), print the one line on stderr, and end the process with
    `code` at once.

    Not ``ray.shutdown()``, and not ending Ray's processes from here: the interrupted stage leaves
    Ray Data's threads (its prefetcher, its executor) running in this process, and the core worker
    ends the process from C++ with exit 1 as soon as such a thread calls Ray after the shutdown
    ("The core worker has already been shutdown") or the raylet is gone (measured with Ray 2.60),
    before the line is printed. The watchdog acts only after ``os._exit``, so nothing can race it."""
    from .lease import release_all

    handed = False
    try:
        for workdir in release_all():
            log.info("stopping: released the lease on %s", workdir)
        handed = _hand_embedded_ray_over()
    except BaseException as err:  # noqa: BLE001 - the line and the exit code matter more
        log.warning("stopping: clean-up incomplete: %s: %s", type(err).__name__, err)
    finally:
        for handler in logging.getLogger().handlers + logging.getLogger("d2prune").handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
        if _stopping is not None:
            _stopping.report()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        if not handed:  # no watchdog (not Linux): ask the embedded Ray's processes to end, then go
            _signal_embedded_ray(signal.SIGTERM)
        os._exit(code)


def _embedded_node():
    """The Ray node this driver started (None: no Ray, or a cluster joined by address)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray._private import worker

        node = worker._global_node
    except Exception:  # noqa: BLE001 - a private API: without it, Ray's own fate-sharing
        return None
    return node if node is not None and node.head else None  # a driver that joined a cluster: never ended


def _node_processes(node) -> list[int]:
    return [info.process.pid for infos in node.all_processes.values() for info in infos
            if info.process is not None and info.process.poll() is None]


def _hand_embedded_ray_over() -> bool:
    """Tell the embedded Ray's watchdog which processes to end once this driver is gone (True: it
    was told; False: there is no embedded Ray, or no watchdog)."""
    from . import reaper

    node = _embedded_node()
    if node is None or not _WATCHDOGS:
        return node is None
    pids = _node_processes(node)
    # and the raylets' children (the agents): once a raylet is gone nothing else names them
    pids += [child for pid in pids for child in reaper.children(pid)]
    processes = [(pid, start) for pid in pids if (start := reaper._start_ticks(pid)) is not None]
    watchdog = _WATCHDOGS[-1]
    watchdog.stdin.write(reaper.stop_message(processes))
    watchdog.stdin.flush()
    return True


def _signal_embedded_ray(sig: int) -> None:
    node = _embedded_node()
    for pid in _node_processes(node) if node is not None else []:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, which a new program starts afresh (getrusage's
    ru_maxrss keeps the peak of the process image an exec replaced, e.g. a forked parent's)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
