"""A real multi-node Ray cluster on this machine, for the cluster tests: a head and worker nodes
started with ``ray start`` on 127.0.0.1, each node with its own temp dir, node-local cache dir and
TMPDIR (so "node-local" means what it means on a real cluster), a fixed small object store, the
dashboard and job server on 127.0.0.1 at a free port. Every process is ours by pid (each node's
``ray start --block`` leads its own process group), and nothing binds beyond the loopback address.

Separate filesystems where it matters: a worker node runs in a mount namespace of its own in
which the head's temp dir (where the job's working dir is unpacked for the driver) is an empty
tmpfs, as it would be on another machine; everything else (/tmp with the test's pool, config and
output dirs) is shared, as a shared filesystem would be. Where mount namespaces are not allowed,
the nodes share everything (:attr:`LocalRayCluster.private_head_dir` says which).

Loopback only: Ray replaces 127.0.0.1 with the machine's routable address for any node that could
join a multi-node cluster (``ray._private.services.resolve_ip_for_localhost``). The head and every
Ray process run with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-host mode: 127.0.0.1
stays 127.0.0.1), and a worker node is started through the same ``ray start`` command line
(``ray.scripts.scripts.main``) with that one replacement switched off, because ``ray start
--address`` refuses to start a worker node in single-host mode.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
# `ray start` for a worker node, with 127.0.0.1 kept as it is (module docstring)
WORKER_START = (
    "import os, sys\n"
    "import ray._private.ray_constants as constants\n"
    "import ray._private.services as services\n"
    "constants.ENABLE_RAY_CLUSTER = True  # this process may start a worker node ...\n"
    "services.resolve_ip_for_localhost = lambda host: host  # ... on 127.0.0.1\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _can_unshare_mounts() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc; psutil is not a dependency)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def kill_processes_mentioning(*needles: str) -> list[int]:
    """SIGKILL every process (but this one) whose command line contains one of `needles`, and their
    descendants. A cluster's Ray processes carry its temp dir (``--temp-dir``, ``--session-dir``,
    ``--log-dir``, ...; also those started detached by ``ray start`` without ``--block``) or its GCS
    address (the head's Ray client server); a Ray worker renames itself (``ray::IDLE``), so only its
    raylet ancestor names them. The pids killed."""
    named = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if any(needle.encode() in cmdline for needle in needles):
                named.append(int(entry))
    targets = list(dict.fromkeys(named + [kid for pid in named for kid in _children(pid)]))
    killed = []
    for pid in targets:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: str
    cache_dir: str
    log: str

    def raylet_pid(self) -> int | None:
        return next((p for p in _children(self.process.pid) if _name(p) == "raylet"), None)


@dataclass
class LocalRayCluster:
    base: str
    cpus_per_node: int = 1
    object_store_bytes: int = 80_000_000
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    # Ray's token authentication, with a token of this cluster's own (never ~/.ray/auth_token)
    token: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex)
    # workers do not see the head's temp dir (module docstring)
    private_head_dir: bool = field(default_factory=_can_unshare_mounts)

    @property
    def headers(self) -> dict[str, str]:
        """What a Job Submission API client sends (``JobSubmissionClient(url, headers=...)``)."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment of every Ray process (and of a driver that joins the cluster)."""
        env = dict(os.environ)
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                   # a lost node is noticed in seconds, not the default ~30 s
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   RAY_health_check_initial_delay_ms="1000",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env.pop("RAY_ADDRESS", None)
        # a job's `python` is this interpreter (as in a user's activated virtual environment)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def _node_args(self) -> list[str]:
        ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
        args = ["--num-cpus", str(self.cpus_per_node), "--num-gpus", "0",
                "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats", "--block"]
        for flag in ports:
            args += [flag, str(free_port())]
        return args

    def _start(self, name: str, command: list[str]) -> Node:
        temp_dir = os.path.join(self.base, name)
        cache_dir = os.path.join(self.base, f"{name}-cache")
        tmp = os.path.join(self.base, f"{name}-tmp")
        for d in (temp_dir, cache_dir, tmp):
            os.makedirs(d, exist_ok=True)
        env = self.env()
        env.update(D2PRUNE_CACHE_DIR=cache_dir, TMPDIR=tmp)
        log = os.path.join(self.base, f"{name}.log")
        with open(log, "w") as out:
            process = subprocess.Popen(command + ["--temp-dir", temp_dir] + self._node_args(), env=env,
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        node = Node(name, process, temp_dir, cache_dir, log)
        self.nodes.append(node)
        return node

    # 240 s: the first Ray start of a fresh venv imports everything from source (CI sets
    # PYTHONDONTWRITEBYTECODE), three nodes at once on 2 cores; 120 s was missed once that way
    def start(self, workers: int = 2, timeout_s: float = 240) -> "LocalRayCluster":
        self._start("head", RAY_CLI + ["start", "--head", "--node-ip-address", "127.0.0.1",
                                       "--port", str(self.gcs_port), "--include-dashboard", "true",
                                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                       "--ray-client-server-port", str(free_port())])
        self._wait_for_dashboard(timeout_s)
        for _ in range(workers):
            self.add_worker()
        self.wait_for_nodes(1 + workers, timeout_s)
        return self

    def add_worker(self) -> Node:
        index = sum(1 for n in self.nodes if n.name.startswith("worker"))
        command = [sys.executable, "-c", WORKER_START, "start", "--address", self.address]
        if self.private_head_dir:
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', self.nodes[0].temp_dir] + command
        return self._start(f"worker{index}", command)

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.nodes[0].process.poll() is not None:
                raise RuntimeError(f"the Ray head exited: {open(self.nodes[0].log).read()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # up (and asking for a token)
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("the Ray dashboard did not come up")

    def alive_nodes(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {count} alive nodes")
            time.sleep(1)

    def kill_raylet(self, node: Node) -> None:
        """Lose `node` as a machine is lost: its raylet is killed (SIGKILL), its `ray start
        --block` then ends the node's other processes."""
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet under {node.name}")
        os.kill(pid, signal.SIGKILL)
        try:
            node.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._kill_node(node)

    def _kill_node(self, node: Node) -> None:
        pids = [node.process.pid] + _children(node.process.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self._kill_node(node)
        # Ray workers re-parented away from a node's process tree: ours by their temp dir
        kill_processes_mentioning(self.base, self.address)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{open(n.log).read()[-3000:]}" for n in self.nodes)


def start_cluster(workers: int = 2) -> LocalRayCluster:
    base = tempfile.mkdtemp(prefix="d2prune-cluster-")
    cluster = LocalRayCluster(base)
    try:
        return cluster.start(workers)
    except BaseException:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
