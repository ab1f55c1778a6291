"""The select stage's numba kernels compiled off the critical path.

The select stage's arithmetic is numba kernels (:mod:`pipeline.core.d2`, :mod:`~pipeline.core.d2_exact`,
:mod:`~pipeline.core.partition`, ...) compiled with ``cache=True``: numba compiles each one on its
first call in a process and writes the machine code to its on-disk cache (``__pycache__`` beside
the source, or ``$NUMBA_CACHE_DIR``), which later processes load in milliseconds. A fresh clone has
no cache, and compiling the select stage's kernels takes ~20 CPU seconds: on a small pool that is
nearly all of the stage.

So when a job is going to run the select stage after an earlier stage (the embed stage, minutes of
mostly waiting on Ray), the job runner starts :func:`start` at job start: a background *process*
(it never holds the driver's GIL) that runs the select stage's own code, in process, on a tiny
synthetic graph in a temporary directory, for the usual shapes of a run (one partition and
several, D2 and the baselines), so that every kernel is compiled with the argument types the real
stage uses and numba writes its cache. When the select stage starts, its kernels load from the
cache.

Nothing depends on it: if the warm-up failed, was killed or is still running, the stage compiles
what is not cached yet, as without it (numba writes each cache file to a temporary name and
renames it into place, so concurrent writers never leave a torn file; the worst a race can do is
drop an index entry, which the next process compiles again). The outputs do not depend on it
either: a kernel loaded from the cache is the same machine code numba would compile.

A stamp beside the cache (``d2prune-warmup-<key>.json``: the key hashes the kernel modules'
sources, Python's and numba's versions) lists the cache index files the warm-up saw; while it is
valid and those files exist, no warm-up starts (a job on a warm checkout pays one hash of a few
source files). ``D2PRUNE_WARMUP=0`` turns it off. ``python -m pipeline.warmup`` runs it in the
foreground (e.g. in a Docker build, to ship a warm cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# the modules whose numba kernels the select stage calls (their sources key the stamp)
KERNEL_MODULES = ("pipeline.core.d2", "pipeline.core.d2_exact", "pipeline.core.partition", "pipeline.core.coreset",
                  "pipeline.core.uids", "pipeline.formats.selection")
# a warm-up older than this whose lock is still there is taken to be dead
LOCK_STALE_S = 600
ENV_SWITCH = "D2PRUNE_WARMUP"


def _module_file(name: str) -> Path:
    return PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py")


def cache_key() -> str:
    """Hash of what the compiled kernels depend on: their sources (bytes and modification times),
    Python's and numba's versions and where numba caches."""
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update(f"{sys.version}|{sys.executable}|{version('numba')}|{os.environ.get('NUMBA_CACHE_DIR', '')}".encode())
    for name in KERNEL_MODULES:
        path = _module_file(name)
        h.update(f"{name}|{path.stat().st_mtime_ns}".encode())  # numba's index is keyed by the source's mtime too
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stamp_dir() -> Path:
    """Where the stamp and the lock live: ``$NUMBA_CACHE_DIR``, else the package's ``__pycache__``
    (where numba caches when it can write there), else a per-user temp directory."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    in_tree = PACKAGE / "__pycache__"
    try:
        in_tree.mkdir(exist_ok=True)
        if os.access(in_tree, os.W_OK):
            return in_tree
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"d2prune-warmup-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def stamp_path(key: str | None = None) -> Path:
    return stamp_dir() / f"d2prune-warmup-{key or cache_key()}.json"


def is_warm(key: str | None = None) -> bool:
    """A valid stamp whose cache index files all exist."""
    try:
        stamp = json.loads(stamp_path(key).read_text())
        return bool(stamp["index_files"]) and all(os.path.exists(p) for p in stamp["index_files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _lock_busy(lock: Path) -> bool:
    """Another live warm-up holds ``lock``."""
    try:
        pid_s, started_s = lock.read_text().split()
        pid, started = int(pid_s), float(started_s)
    except (OSError, ValueError):
        return False
    if time.time() - started > LOCK_STALE_S:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start() -> subprocess.Popen | None:
    """Start the warm-up in a background process unless it is off, the cache is warm, or another
    warm-up is running; the process, or None. Never raises (the warm-up is an optimisation)."""
    try:
        if not enabled():
            return None
        key = cache_key()
        if is_warm(key):
            return None
        directory = stamp_dir()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "d2prune-warmup.lock"
        if _lock_busy(lock):
            log.info("numba warm-up already running (%s)", lock)
            return None
        log_file = open(directory / "d2prune-warmup.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.warmup", "--lock", str(lock),
                                     "--parent", str(os.getpid())],
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=str(PACKAGE.parent), close_fds=True)
        finally:
            log_file.close()
        lock.write_text(f"{proc.pid} {time.time()}")
        log.info("compiling the select stage's numba kernels in the background (pid %d; log %s)", proc.pid,
                 directory / "d2prune-warmup.log")
        return proc
    except Exception as err:  # noqa: BLE001 - never fail a job over its warm-up
        log.warning("numba warm-up not started: %s: %s", type(err).__name__, err)
        return None


def start_for_job(names: Iterable[str], committed: Callable[[str], bool]) -> subprocess.Popen | None:
    """:func:`start` when the job will run the select stage after another stage (time to compile
    while that one runs): ``names`` the stages it runs in order, ``committed(name)`` whether one
    is already done."""
    try:
        from .workdir import SELECT

        names = list(names)
        if SELECT not in names or committed(SELECT):
            return None
        earlier = names[: names.index(SELECT)]
        if all(committed(n) for n in earlier):  # select would start at once: nothing to overlap
            return None
    except Exception as err:  # noqa: BLE001
        log.warning("numba warm-up not started: %s: %s", type(err).__name__, err)
        return None
    return start()


# --------------------------------------------------------------------------------------------
# The warm-up itself (in the background process)
# --------------------------------------------------------------------------------------------

# (select settings) of the runs made on the tiny graph: the in-process path with one partition
# and with several, the pre-filter on and off, both distances, the demo's baselines
RUNS = (
    {"partitions": 1, "beta": 0.1},
    {"partitions": 4, "beta": 0.1, "keep_rates": [0.2]},
    {"partitions": 4, "beta": 0.0, "distance": "euclidean"},
    {"partitions": 1, "beta": 0.0, "distance": "euclidean"},
    {"partitions": 4, "beta": 0.0, "method": "score_topk"},
    {"partitions": 4, "beta": 0.0, "method": "random"},
)
N_NODES, K, N_CELLS = 240, 5, 12


def _graph(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    nb = rng.integers(0, N_NODES, size=(N_NODES, K))
    nb[rng.random((N_NODES, K)) < 0.1] = -1
    sq = (rng.random((N_NODES, K)) * 2).astype(np.float32)
    sq[nb < 0] = np.inf
    cells = rng.integers(0, N_CELLS, N_NODES).astype(np.int32)
    scores = rng.normal(0.3, 0.1, N_NODES)
    return nb, sq, cells, scores


def warm(root: str) -> dict:
    """Run the select stage in process on a tiny graph under ``root`` for every setting of
    :data:`RUNS` (compiling and caching every kernel they call); seconds per run."""
    from .config import config_from_dict
    from .select.driver import compute
    from .storage import Store
    from .testing import write_graph_stages

    os.environ["D2PRUNE_CACHE_DIR"] = os.path.join(root, "node-cache")  # never the job's node caches
    nb, sq, cells, scores = _graph()
    store = Store()
    seconds = {}
    for i, run in enumerate(RUNS):
        run = dict(run)
        distance = run.pop("distance", "sqeuclidean")
        base = os.path.join(root, f"run{i}")
        cfg = config_from_dict({
            "workdir": os.path.join(base, "work"), "input": {"shards": os.path.join(base, "pool/{00000..00002}.tar")},
            "output": {"url": os.path.join(base, "out")}, "graph": {"k": K, "distance": distance},
            "select": {"prune_rate": 0.7, **run}}, source="warm-up")
        write_graph_stages(store, cfg, nb, sq, cells, scores, n_parts=3, return_uids=False)
        t0 = time.perf_counter()
        compute(cfg, store, os.path.join(base, "selection"), use_ray=False)
        seconds[f"run{i}"] = round(time.perf_counter() - t0, 3)
    return seconds


def index_files() -> list[str]:
    """The cache index files of every numba kernel of :data:`KERNEL_MODULES` that has one."""
    import importlib

    from numba.core.registry import CPUDispatcher

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, CPUDispatcher) and obj.signatures and getattr(obj, "_cache", None) is not None:
                path = getattr(getattr(obj._cache, "_cache_file", None), "_index_path", None)
                if path and os.path.exists(path):
                    found.append(path)
    return sorted(set(found))


def _end_with(parent: int) -> None:
    """End this warm-up (cleaning up: SIGTERM runs the ``finally`` blocks) when the job that
    started it ends: a job stopped by a signal leaves no process of its own behind, and a job that
    is over has no use for it (the next one starts another if the cache is still cold)."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # <linux/prctl.h>: the signal this process gets when its parent exits
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:  # the job ended before the request above took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", help="lock file to remove when done (set by start())")
    parser.add_argument("--parent", type=int, help="end when this process (the job) ends (set by start())")
    args = parser.parse_args(argv)
    if args.parent:
        _end_with(args.parent)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    key = cache_key()
    root = tempfile.mkdtemp(prefix="d2prune-warmup-")
    try:
        seconds = warm(root)
        files = index_files()
        path = stamp_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "index_files": files, "seconds": seconds,
                                   "total_seconds": round(time.perf_counter() - started, 3)}, indent=1))
        os.replace(tmp, path)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} numba warm-up: {len(files)} kernels cached in "
              f"{time.perf_counter() - started:.1f} s ({path})", flush=True)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.lock:
            try:
                os.remove(args.lock)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
