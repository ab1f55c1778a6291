"""Ray start-up: the same code on a laptop (embedded Ray) and on a cluster (RAY_ADDRESS / --address)."""

from __future__ import annotations

import logging
import os

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
        kwargs = {"include_dashboard": False, "log_to_driver": True}
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_memory:
            kwargs["object_store_memory"] = ray_cfg.object_store_memory
        ray.init(**kwargs)
        log.info("started embedded local Ray with %s", ray.cluster_resources())
    return ray


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
