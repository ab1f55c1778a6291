"""The one job runner: the CLI, ``jobs/filter_pool.py``, the demo and the benchmarks all call
:func:`run_job` (or :func:`run_one` for one stage).

    cfg = load_config(path, overrides)        # every rule checked: a bad config never starts (exit 2)
    fingerprints = fingerprints(cfg, STAGES)  # once per job
    stale output refused up front             # before hours of embedding (exit 3)
    for each stage: run_stage(...)            # skip / require / check / claim / run / commit
    summary                                   # pipeline.summary.summarize
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import workdir
from .config import JobConfig, load_config
from .embed.stage import STAGE as EMBED
from .errors import UsageError
from .graph.stage import STAGE as GRAPH
from .select.stage import STAGE as SELECT
from .stage import Hooks, Stage, StageContext, fingerprints, run_stage
from .storage import Store, join
from .summary import summarize
from .write.stage import STAGE as WRITE

log = logging.getLogger("d2prune")

STAGES: tuple[Stage, ...] = (EMBED, GRAPH, SELECT, WRITE)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    return fingerprints(cfg, STAGES)


def force_from(cfg: JobConfig, store: Store, name: str) -> None:
    """Remove the output of stage `name` and of every later stage (and what they wrote outside
    the workdir)."""
    if name not in BY_NAME:
        raise UsageError(f"--force-from {name!r}: stages are {', '.join(STAGE_NAMES)}")
    for stage in STAGES[STAGE_NAMES.index(name):]:
        log.info("--force-from %s: removing %s", name, stage.directory(cfg))
        store.rm(stage.directory(cfg), recursive=True)
        if stage.clear_outputs is not None:
            log.info("--force-from %s: removing what the %s stage wrote outside the workdir", name, stage.name)
            stage.clear_outputs(cfg, store)


def run_stages(cfg: JobConfig, store: Store, names: list[str], hooks: Hooks | None = None) -> dict[str, Any]:
    """Run the stages `names` in order, skipping committed ones: stats and seconds per stage."""
    prints = stage_fingerprints(cfg)
    # Refuse stale output up front (before hours of embedding), naming the first stale stage.
    last = max(STAGE_NAMES.index(n) for n in names)
    for stage in STAGES[: last + 1]:
        workdir.is_committed(store, stage.directory(cfg), prints[stage.name], stage.name)
    results: dict[str, Any] = {"stats": {}, "seconds": {}, "skipped": []}
    for name in names:
        stage = BY_NAME[name]
        ctx = StageContext(fingerprint=prints[name], fingerprints=prints, hooks=hooks or Hooks())
        t0 = time.perf_counter()
        stats, ran = run_stage(stage, cfg, store, ctx)
        results["stats"][name] = stats
        results["seconds"][name] = round(time.perf_counter() - t0, 3) if ran else 0.0
        if ran:
            log.info("stage %s: done in %.1f s", name, results["seconds"][name])
        else:
            results["skipped"].append(name)
    return results


def run_one(cfg: JobConfig, store: Store, name: str, hooks: Hooks | None = None) -> dict[str, Any]:
    """One stage (skipped when committed); its stats."""
    return run_stages(cfg, store, [name], hooks)["stats"][name]


def job_summary(cfg: JobConfig, store: Store, results: dict[str, Any]) -> dict[str, Any]:
    """:func:`pipeline.summary.summarize` of every stage's stats (from this run, else committed),
    with the seconds per stage and where the selection is."""
    stats = {s.name: results["stats"].get(s.name) or workdir.read_stats(store, s.directory(cfg)) for s in STAGES}
    summary = summarize(stats)
    summary.update(
        seconds=results["seconds"],
        skipped_stages=results["skipped"],
        selection=join(SELECT.directory(cfg), "selected.parquet") if stats["select"] else None,
    )
    return summary


def run_job(config: str, overrides: list[str] | None = None, force: str | None = None,
            address: str | None = None, stages: list[str] | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    """The job as a function; raises on failure (:mod:`pipeline.errors` maps it to an exit code)."""
    cfg = load_config(config, overrides)
    if address:
        cfg.ray.address = address
    store = Store(cfg.storage)
    if force:
        force_from(cfg, store, force)
    results = run_stages(cfg, store, stages or list(STAGE_NAMES), hooks)
    return job_summary(cfg, store, results)
