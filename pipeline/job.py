"""The one job runner: the CLI, ``jobs/filter_pool.py``, the demo and the benchmarks all call
:func:`run_job` (or :func:`run_one` for one stage).

    cfg = load_config(path, overrides)        # every rule checked: a bad config never starts (exit 2)
    check_locations(cfg, store)               # buckets and folders exist, nothing written (exit 2)
    check_cluster_paths(cfg, store)           # multi-node: every local path the same on every node (exit 2)
    check_first_inputs(...)                   # every shard a tar, the checkpoint readable (exit 2)
    lease = acquire(store, cfg.workdir)       # one job per workdir (exit 5), released at the end
    fingerprints = fingerprints(cfg, STAGES)  # once per job
    stale output refused up front             # before hours of embedding (exit 3)
    for each stage: check_pool_size(...)      # rules that need N, once N is known (exit 2)
                    run_stage(...)            # skip / require / check / claim / run / commit
    summary                                   # pipeline.summary.summarize
    report                                    # the whole job only: WORKDIR/report.html (a failure warns)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator

from . import warmup, workdir
from .config import ConfigError, JobConfig, input_folders, load_config
from .core.d2 import budget_for
from .errors import LeaseHeldError, UsageError
from .graph.stage import index_sizes
from .lease import Lease, acquire, describe, holder
from .runtime import check_cluster_paths, init_ray
from .stage import Hooks, StageContext, damaged_files, refuse_damage, run_stage
from .stages import BY_NAME, STAGE_NAMES, STAGES, stage_fingerprints  # noqa: F401 - STAGES: the runner's API too
from .storage import Store, join
from .summary import summarize
from .workdir import EMBED, GRAPH, SELECT

log = logging.getLogger("d2prune")


def force_from(cfg: JobConfig, store: Store, name: str) -> None:
    """Remove the output of stage `name` and of every later stage (and what they wrote outside
    the workdir)."""
    if name not in BY_NAME:
        raise UsageError(f"--force-from {name!r}: stages are {', '.join(STAGE_NAMES)}")
    # the earlier stages are kept and read again: a damaged file there is refused (naming the stage
    # to force from) before anything is removed
    for stage in STAGES[:STAGE_NAMES.index(name)]:
        if store.exists(join(stage.directory(cfg), workdir.SUCCESS)):
            refuse_damage(stage.name, damaged_files(stage.name, cfg, store))
    for stage in STAGES[STAGE_NAMES.index(name):]:
        log.info("--force-from %s: removing %s", name, stage.directory(cfg))
        store.rm(stage.directory(cfg), recursive=True)
        if stage.clear_outputs is not None:
            log.info("--force-from %s: removing what the %s stage wrote outside the workdir", name, stage.name)
            stage.clear_outputs(cfg, store)


def check_locations(cfg: JobConfig, store: Store) -> None:
    """Every location the job reads or writes can work, before anything is written: the workdir and
    output.url can be created (their bucket exists, their parent folder is writable), the input
    shards' buckets exist. ConfigError (exit 2) naming each field and bucket; nothing is written."""
    places = [("workdir", cfg.workdir, True), ("output.url", cfg.output.url, True)]
    places += [("input.shards", folder, False) for folder in input_folders(cfg.input.shards)]
    problems = []
    for field_name, url, writable in places:
        problem = store.location_problem(url, writable)
        if problem:
            problems.append(f"{field_name} {url}: {problem}")
    if problems:
        raise ConfigError("storage locations that cannot work:\n" + "\n".join(f"  {p}" for p in problems))


def check_pool_size(cfg: JobConfig, store: Store, name: str, prints: dict[str, str]) -> None:
    """The rules that need the pool size N, checked before the graph or select stage does any
    work, as soon as the embed stage has committed N: k < N, a budget of at least one sample, IVF
    lists that this N can hold and train (the graph stage's own rule). ConfigError (exit 2) naming the field."""
    if name not in (GRAPH, SELECT):
        return
    if not workdir.is_committed(store, BY_NAME[EMBED].directory(cfg), prints[EMBED], EMBED):
        return  # the stage itself refuses (a stage it reads is not committed)
    stats = workdir.read_stats(store, BY_NAME[EMBED].directory(cfg)) or {}
    n = int(stats.get("samples", 0))
    if n == 0:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted((stats.get("skipped") or {}).items())) or "nothing"
        raise ConfigError(f"the embed stage kept no samples of the input (skipped: {skipped}; missing shards: "
                          f"{stats.get('shards_missing', 0)}): input.shards holds nothing to select from")
    problems = []
    if name == GRAPH:
        if cfg.graph.k >= n:
            problems.append(f"graph.k={cfg.graph.k} needs more than k samples; the pool has N={n}")
        try:
            index_sizes(cfg, n)
        except ConfigError as err:
            problems.append(f"{err} (the pool has N={n})")
    if budget_for(n, cfg.select.prune_rate) == 0:
        problems.append(f"select.prune_rate={cfg.select.prune_rate} keeps round((1-p)*N) = 0 of the N={n} samples")
    if problems:
        raise ConfigError(f"settings that cannot work for this pool (checked before the {name} stage):\n"
                          + "\n".join(f"  {p}" for p in problems))


def _guarded(hooks: Hooks, lease: Lease | None) -> Hooks:
    """`hooks` whose part_committed first checks that the lease is still ours (a job whose lease
    was taken over stops at its next committed part instead of writing on)."""
    if lease is None:
        return hooks
    inner = hooks.part_committed

    def part_committed(stage: str, index: int) -> None:
        lease.check()
        if inner is not None:
            inner(stage, index)

    return dataclasses.replace(hooks, part_committed=part_committed)


def check_first_inputs(cfg: JobConfig, store: Store, names: list[str], force: str | None = None) -> set[str]:
    """Run the check of the first stage that will run and reads the job's inputs (the embed stage:
    every shard exists and is a tar, the model's checkpoint is readable) before anything is
    written; the names of the stages checked (run_stage then skips their check). Later stages read
    the workdir, so they are checked when they start."""
    prints = stage_fingerprints(cfg)
    forced = STAGE_NAMES[STAGE_NAMES.index(force):] if force else ()
    for name in names:
        stage = BY_NAME[name]
        if name not in forced and workdir.is_committed(store, stage.directory(cfg), prints[name], name):
            continue
        if not stage.reads and stage.check is not None:
            stage.check(cfg, store)
            return {name}
        return set()
    return set()


def run_stages(cfg: JobConfig, store: Store, names: list[str], hooks: Hooks | None = None,
               lease: Lease | None = None, checked: set[str] = frozenset()) -> dict[str, Any]:
    """Run the stages `names` in order, skipping committed ones: stats and seconds per stage."""
    prints = stage_fingerprints(cfg)
    # Refuse stale output up front (before hours of embedding), naming the first stale stage.
    last = max(STAGE_NAMES.index(n) for n in names)
    for stage in STAGES[: last + 1]:
        workdir.is_committed(store, stage.directory(cfg), prints[stage.name], stage.name)
    results: dict[str, Any] = {"stats": {}, "seconds": {}, "skipped": []}
    hooks = _guarded(hooks or Hooks(), lease)
    # the select stage's numba kernels compiled in the background while the earlier stages run
    warmup.start_for_job(names, lambda n: workdir.is_committed(store, BY_NAME[n].directory(cfg), prints[n], n))
    for name in names:
        stage = BY_NAME[name]
        if lease is not None:
            lease.check()
        if not workdir.is_committed(store, stage.directory(cfg), prints[name], name):
            check_pool_size(cfg, store, name, prints)
        ctx = StageContext(fingerprint=prints[name], fingerprints=prints, hooks=hooks)
        t0 = time.perf_counter()
        stats, ran = run_stage(stage, cfg, store, ctx, checked=name in checked)
        results["stats"][name] = stats
        results["seconds"][name] = round(time.perf_counter() - t0, 3) if ran else 0.0
        if ran:
            log.info("stage %s: done in %.1f s", name, results["seconds"][name])
        else:
            results["skipped"].append(name)
    return results


def run_one(cfg: JobConfig, store: Store, name: str, hooks: Hooks | None = None) -> dict[str, Any]:
    """One stage (skipped when committed), checked and run under the lease like :func:`run_job`; its stats."""
    with leased(cfg, store, [name], command=f"run_one({name})") as (lease, checked):
        return run_stages(cfg, store, [name], hooks, lease, checked)["stats"][name]


@contextmanager
def leased(cfg: JobConfig, store: Store, names: list[str], force: str | None = None,
           command: str | None = None) -> Iterator[tuple[Lease, set[str]]]:
    """Check everything that can be checked without writing (locations, a busy workdir, the first
    stage's inputs), then hold the workdir's lease (released at the end, also on failure), after
    applying --force-from under it. Yields the lease and the stages whose check already ran."""
    if force and force not in BY_NAME:
        raise UsageError(f"--force-from {force!r}: stages are {', '.join(STAGE_NAMES)}")
    check_locations(cfg, store)
    busy = holder(store, cfg.workdir)  # read-only: refuse before minutes of input checks
    if busy is not None:
        raise LeaseHeldError(f"workdir {cfg.workdir} is in use by another job: {describe(busy)}")
    checked = check_first_inputs(cfg, store, names, force)
    if SELECT in names and cfg.select.prefilter.decontaminate is not None:
        # evaluation sets that cannot be read or are of another width: before any stage runs
        from .formats.embeddings import list_parts
        from .select.eval_sets import check_eval_sets

        embed_dir = BY_NAME[EMBED].directory(cfg)
        kept = force is None or force != EMBED
        parts = list_parts(store, embed_dir)[0] if kept and workdir.is_committed(
            store, embed_dir, stage_fingerprints(cfg)[EMBED], EMBED) else None
        check_eval_sets(cfg, store, parts)
    with acquire(store, cfg.workdir, {"command": command or "d2prune"}) as lease:
        if force:
            force_from(cfg, store, force)
        yield lease, checked


def job_summary(cfg: JobConfig, store: Store, results: dict[str, Any]) -> dict[str, Any]:
    """:func:`pipeline.summary.summarize` of every stage's stats (from this run, else committed),
    with the seconds per stage and where the selection is."""
    stats = {s.name: results["stats"].get(s.name) or workdir.read_stats(store, s.directory(cfg)) for s in STAGES}
    summary = summarize(stats)
    summary.update(
        seconds=results["seconds"],
        skipped_stages=results["skipped"],
        selection=join(BY_NAME[SELECT].directory(cfg), "selected.parquet") if stats[SELECT] else None,
    )
    return summary


def write_report(cfg: JobConfig, store: Store) -> str | None:
    """WORKDIR/report.html after a whole job; its URL, or None (with a warning) when it could not
    be built: the job's outputs are complete either way."""
    from .report import build_report

    try:
        return build_report(cfg.workdir, store, input_cfg=cfg.input)
    except Exception as err:  # noqa: BLE001 - the report must never fail a finished job
        log.warning("report not written: %s: %s (the job's outputs are complete; `d2prune report %s` retries)",
                    type(err).__name__, err, cfg.workdir)
        return None


def run_job(config: str, overrides: list[str] | None = None, force: str | None = None,
            address: str | None = None, stages: list[str] | None = None, hooks: Hooks | None = None,
            report: bool | None = None, command: str | None = None) -> dict[str, Any]:
    """The job as a function; raises on failure (:mod:`pipeline.errors` maps it to an exit code).
    `report`: build WORKDIR/report.html at the end; default: when the whole job ran (not one stage).

    Nothing is written before the config, every location and the inputs are checked; then the
    workdir's lease is taken (:mod:`pipeline.lease`) and held until the job ends (its report
    included), also when it fails."""
    cfg = load_config(config, overrides)
    store = Store(cfg.storage)
    if address:  # --address joins now: it wins over RAY_ADDRESS and ray.address (runtime.cluster_address)
        init_ray(cfg.ray, address)
    check_cluster_paths(cfg, store, address)  # local paths a multi-node cluster cannot see: exit 2, before any work
    names = stages or list(STAGE_NAMES)
    with leased(cfg, store, names, force, command or f"run_job({config})") as (lease, checked):
        results = run_stages(cfg, store, names, hooks, lease, checked)
        summary = job_summary(cfg, store, results)
        if report if report is not None else stages is None:
            summary["report"] = write_report(cfg, store)
        return summary
