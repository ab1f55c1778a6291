"""Ray at the edges: start-up (the same code on a laptop and a cluster) and the one place the
stages ask Ray what they may use.

* :func:`init_ray`: an embedded local Ray, or the cluster at ``--address`` / ``ray.address`` /
  ``RAY_ADDRESS``.
* :func:`resources`: CPUs and GPUs of the cluster and of its largest node (a one-worker step such
  as IVF training or the index merge takes a whole node's cores).
* :func:`task_cpus`: inside a task, the CPUs Ray reserved for it (threads to use, so concurrent
  tasks on a node do not oversubscribe its cores).
* :func:`as_completed`: results of tasks in completion order (drivers never rely on submission
  order for anything but scheduling).
* :func:`peak_rss_bytes`: this process's peak memory (what the stages report for their driver and
  workers).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .config import RayConfig

log = logging.getLogger(__name__)


def init_ray(ray_cfg: RayConfig | None = None, address: str | None = None):
    """Connect to a cluster when an address is given (argument, config, or RAY_ADDRESS), else start a
    local Ray. Idempotent: an already initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        return ray
    ray_cfg = ray_cfg or RayConfig()
    address = address or ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
    else:
        # address="local": always a new embedded Ray, never a `ray start` cluster that happens to
        # run on this machine (plain ray.init() would join it, and then refuse num_cpus)
        kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": True}
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_memory:
            kwargs["object_store_memory"] = ray_cfg.object_store_memory
        ray.init(**kwargs)
        log.info("started embedded local Ray with %s", ray.cluster_resources())
    return ray


@dataclass(frozen=True)
class Resources:
    cpus: float  # the whole cluster's
    gpus: float
    max_node_cpus: int  # the largest live node's (>= 1)
    memory_per_cpu: float = 0.0  # bytes: the lowest of the live nodes' memory / CPUs (0 unknown)


def resources() -> Resources:
    """What the (initialised) cluster offers now."""
    import ray

    total = ray.cluster_resources()
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = [r.get("CPU", 0) for r in alive]
    per_cpu = [r.get("memory", 0) / r["CPU"] for r in alive if r.get("CPU") and r.get("memory")]
    return Resources(cpus=float(total.get("CPU", 0)), gpus=float(total.get("GPU", 0)),
                     max_node_cpus=max(1, int(max(node_cpus, default=1))), memory_per_cpu=min(per_cpu, default=0.0))


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
        yield ray.get(ready[0])


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
