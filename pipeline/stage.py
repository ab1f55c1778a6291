"""The stage contract, and the one place that skips, requires, claims and commits.

A stage declares (like NeMo Curator's ``ProcessingStage`` or Ray Data's ``Datasink``: a name and a
small lifecycle) ::

    Stage(name=GRAPH, reads=(EMBED,),  # the stages whose folders it reads (pipeline.workdir names)
          settings=lambda cfg: {...},   # the settings its output depends on (its fingerprint)
          check=check,                  # check(cfg, store): inputs usable? (before any write)
          run=run)                      # run(cfg, store, ctx) -> stats: compute and write its parts

and :func:`run_stage` does the rest, identically for every stage:

1. **skip**: committed (``_SUCCESS.json``) with the current fingerprint, and its outputs still
   intact → return the committed stats; committed with another fingerprint → StaleStageError (3);
   a committed file missing or of another size than its commit's manifest → DamagedFileError (3)
   naming it and the ``--force-from`` stage (output shards deleted outright: the stage runs again);
2. **require**: every stage it reads is committed, else PreconditionError (4) naming the missing
   one, and its files are as committed (sizes against its manifest, DamagedFileError (3)); the
   stage's own ``check`` of its inputs passes (before anything is written);
3. **claim**: record the fingerprint before the first part is written (partial parts of a run with
   other settings are refused, never mixed);
4. **run** the stage (it resumes from its own committed parts) under the stall detector
   (:mod:`pipeline.watchdog`: no committed part and no progress for ``job.stall_timeout_s`` ->
   StallError, exit 1), then **commit**: stats, the manifest of every file it committed
   (:mod:`pipeline.formats.manifest`), then the marker, last; then remove the stage's
   node-local caches (``node_caches``) on every node of the cluster.

A stage's fingerprint hashes its own settings and every earlier stage's, so changing an embed
setting invalidates every later stage. Its settings are its config sections less the fields
:mod:`pipeline.config` marks as not changing output (:func:`pipeline.config.output_settings`).
Fingerprints are computed once per job (:func:`fingerprints`) and handed to the stage in its
:class:`StageContext`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from . import runtime, watchdog, workdir
from .config import JobConfig
from .errors import DamagedFileError, PreconditionError
from .formats import manifest
from .formats.manifest import Damage
from .storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hooks:
    """Test and progress hooks (never read from the environment).

    ``part_committed(stage, index)`` runs in the driver after a stage commits one of its parts;
    ``step_done(stage, step)`` runs in the driver after a stage commits one of its internal steps
    (the graph stage's train, assign, ...); ``shard_written(index)`` runs in the write task after
    an output tar is committed and before its metadata (the shard's commit), so a test can stop a
    job exactly there. All must be picklable (the last travels to Ray workers)."""

    part_committed: Callable[[str, int], None] | None = None
    shard_written: Callable[[int], None] | None = None
    step_done: Callable[[str, str], None] | None = None


@dataclass(frozen=True)
class StageContext:
    fingerprint: str  # this stage's
    fingerprints: dict[str, str]  # every stage's, in order
    hooks: Hooks = field(default_factory=Hooks)

    def part_committed(self, stage: str, index: int) -> None:
        watchdog.beat(f"the part after part {index}")
        if self.hooks.part_committed is not None:
            self.hooks.part_committed(stage, index)

    def progress(self, waiting_for: str | None = None) -> None:
        """Progress short of a committed part (a batch in, a task done); `waiting_for` names what
        comes next (the stall error names it when it never does)."""
        watchdog.beat(waiting_for)

    def step_done(self, stage: str, step: str) -> None:
        watchdog.beat(f"the step after {stage}'s {step}")
        if self.hooks.step_done is not None:
            self.hooks.step_done(stage, step)


@dataclass(frozen=True)
class Stage:
    name: str
    # the earlier stages whose committed folders it reads (none: it reads the job's inputs)
    reads: tuple[str, ...]
    settings: Callable[[JobConfig], dict[str, Any]]
    run: Callable[[JobConfig, Store, StageContext], dict[str, Any]]
    check: Callable[[JobConfig, Store], None] | None = None
    # a committed stage whose outputs outside the workdir are gone (deleted output shards) runs
    # again; returns what is missing (empty when intact)
    missing_outputs: Callable[[JobConfig, Store, dict[str, Any]], list[str]] | None = None
    # what --force-from removes besides the stage's work directory (the write stage's output)
    clear_outputs: Callable[[JobConfig, Store], None] | None = None
    # namespaces of node-local caches the stage fills (storage.node_local_copy); removed on every
    # node once the stage commits
    node_caches: Callable[[JobConfig], list[str]] | None = None
    # what the stage commits outside the workdir: (output.url, the names under it), recorded in its
    # manifest with the files of its folder (the write stage's shards, _PLAN.json, _stats.json)
    outside: Callable[[JobConfig], tuple[str, list[str]]] | None = None

    def directory(self, cfg: JobConfig) -> str:
        return workdir.stage_dir(cfg.workdir, self.name)


def fingerprints(cfg: JobConfig, stages: tuple[Stage, ...]) -> dict[str, str]:
    """Each stage's fingerprint: a hash of its settings and of every earlier stage's."""
    out: dict[str, str] = {}
    chain: list[dict[str, Any]] = []
    for stage in stages:
        chain.append(stage.settings(cfg))
        blob = json.dumps(chain, sort_keys=True, default=str).encode()
        out[stage.name] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def committed_stats(stage: Stage, cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any] | None:
    """The committed stats when `stage` need not run; None when it must (StaleStageError when its
    committed output was made with other settings)."""
    directory = stage.directory(cfg)
    if not workdir.is_committed(store, directory, ctx.fingerprint, stage.name):
        return None
    stats = workdir.read_stats(store, directory) or {}
    damage = damaged_files(stage.name, cfg, store)
    if stage.missing_outputs is not None:
        missing = stage.missing_outputs(cfg, store, stats)
        if missing:
            # outputs deleted outright are written again; anything else damaged is refused first,
            # or the new commit's manifest would take it for committed
            refuse_damage(stage.name, [d for d in damage if not (d.problem.startswith("missing")
                                                                  and not d.url.startswith(directory + "/"))])
            log.warning("stage %s was committed but %d of its outputs are gone (e.g. %s): running it again",
                        stage.name, len(missing), missing[0])
            return None
    refuse_damage(stage.name, damage)
    return stats


def damaged_files(name: str, cfg: JobConfig, store: Store, etags: bool = False) -> list[Damage]:
    """The files of committed stage `name` that are missing or whose size differs from its commit's
    manifest (one listing of its folder, and of output.url for the write stage). A stage committed
    before manifests were recorded is accepted as it is (a log line)."""
    directory = workdir.stage_dir(cfg.workdir, name)
    recorded = manifest.read(store, directory)
    if recorded is None:
        log.info("stage %s: committed without %s (before manifests were recorded): its files are not checked",
                 name, manifest.MANIFEST)
        return []
    return manifest.check(store, directory, recorded, cfg.output.url, etags=etags)


def refuse_damage(name: str, damage: list[Damage]) -> None:
    """DamagedFileError (exit 3) naming the first damaged file of committed stage `name` and the fix."""
    if not damage:
        return
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    first = damage[0]
    raise DamagedFileError(
        f"the committed {name} stage has {len(damage)} damaged file(s): {first.url}: {first.problem}{more}; "
        f"rerun `d2prune run` with --force-from {name} to recompute it and every later stage "
        "(`d2prune verify CONFIG` lists every damaged file)")


def require_read_stages(stage: Stage, cfg: JobConfig, store: Store, ctx: StageContext) -> None:
    """PreconditionError naming a stage that `stage` reads and that is not committed. The latest (in
    pipeline order) is checked first: it is the one to run next, and it names any earlier one it
    needs in turn."""
    for name in sorted(stage.reads, key=list(workdir.STAGE_DIRS).index, reverse=True):
        directory = workdir.stage_dir(cfg.workdir, name)
        if not workdir.is_committed(store, directory, ctx.fingerprints[name], name):
            raise PreconditionError(
                f"the {stage.name} stage needs the committed {name} stage: no {workdir.SUCCESS} in "
                f"{directory} (run `d2prune run` or `d2prune {name}` first)"
            )
    for name in stage.reads:  # every file it reads is as committed (sizes: one listing per folder)
        refuse_damage(name, damaged_files(name, cfg, store))


def run_stage(stage: Stage, cfg: JobConfig, store: Store, ctx: StageContext,
              checked: bool = False) -> tuple[dict[str, Any], bool]:
    """Skip / require / claim / run / commit (module docstring); returns (stats, ran). `checked`:
    the job runner already ran the stage's check (before taking the lease), so it is not repeated."""
    stats = committed_stats(stage, cfg, store, ctx)
    if stats is not None:
        log.info("stage %s: already committed in %s, skipping", stage.name, stage.directory(cfg))
        return stats, False
    require_read_stages(stage, cfg, store, ctx)
    if stage.check is not None and not checked:
        stage.check(cfg, store)
    directory = stage.directory(cfg)
    workdir.claim(store, directory, ctx.fingerprint, stage.name)
    with watchdog.Watchdog(stage.name, cfg.job.stall_timeout_s, describe=runtime.describe_cluster):
        stats = stage.run(cfg, store, ctx)
    workdir.commit(store, directory, ctx.fingerprint, stage.name, stats,
                   stage.outside(cfg) if stage.outside is not None else None)
    if stage.node_caches is not None:
        runtime.clear_node_caches(stage.node_caches(cfg))
    return stats, True
