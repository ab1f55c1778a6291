"""The write stage: the selected samples, byte for byte, as new WebDataset shards in img2dataset's
layout (:mod:`pipeline.formats.output`).

Determinism: the shard plan is fixed before anything is written (:mod:`.plan`, built by Ray tasks
over the committed parts); tar headers carry fixed metadata
(:class:`~pipeline.formats.tar.TarWriter`), so a shard written twice is identical byte for byte.

Resume: a shard is committed when its ``.parquet`` exists (its ``.tar`` and ``_stats.json`` are
committed before it, each by an atomic write), and a re-run writes only shards that are not.
Output shards are produced by Ray Data (one row per output shard, mapped by a task that streams
its input shards and picks its samples by uid, :mod:`.shard`).

Integrity check (always, also when resuming; Ray tasks over the output shards, the driver only
adds counts): every output shard's metadata holds exactly the uids the plan gives it, each once,
and its stats agree; the plan itself holds every selected uid exactly once (checked while it is
built); the sums of the uid hashes of the written shards and of the selection agree. Otherwise an
error names the shard and the missing / extra / repeated uids.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import JobConfig, output_settings
from ..errors import StaleStageError
from ..formats.output import OUTPUT_PLAN, SHARDS_DIR, SIZES, STATS
from ..runtime import init_ray
from ..stage import Stage, StageContext
from ..steps import Step, run_step
from ..storage import Store, join
from ..summary import summarize
from ..workdir import EMBED, SELECT, WRITE, read_stats, stage_dir
from .metadata import METADATA_DIR, write_metadata
from .plan import build_plan
from .shard import check_shards, layout_of, write_shard_row

log = logging.getLogger(__name__)

CHECK_SHARDS_PER_TASK = 16


def _metadata_only(cfg: JobConfig) -> bool:
    return cfg.input.shards is None


def settings(cfg: JobConfig) -> dict[str, Any]:
    # a metadata-only job writes OUTPUT/metadata/, not shards: another output, another fingerprint
    out = {"output": output_settings(cfg.output)}
    if _metadata_only(cfg):
        out["mode"] = "metadata-only"
    return out


def check_output(store: Store, cfg: JobConfig, plan: dict[str, Any]) -> dict[str, Any]:
    """Every output shard committed and holding exactly its planned uids (Ray tasks, a batch of
    shards each); the written uids' hash sum equals the selection's."""
    layout = layout_of(cfg)
    n_shards = plan["output_shards"]
    uncommitted = [layout.name(i) for i in layout.missing(store, n_shards)]
    if uncommitted:
        raise RuntimeError(f"output shards not committed: {uncommitted[:10]} ({len(uncommitted)} in all)")
    batches = [list(range(lo, min(lo + CHECK_SHARDS_PER_TASK, n_shards)))
               for lo in range(0, n_shards, CHECK_SHARDS_PER_TASK)]
    checked = run_step(Step("write.check", check_shards, [(store, cfg, plan, b) for b in batches], unit="shard batches"),
                       store)
    results = sorted((r for done in checked for r in done), key=lambda r: r["index"])
    samples = sum(r["samples"] for r in results)
    written_hash = sum(int(r["hash_sum"]) for r in results) % 2**64
    bad = [f"shard {layout.name(r['index'])}: " + "; ".join(r["problems"]) for r in results if r["problems"]]
    if not bad and (samples != plan["samples"] or str(written_hash) != plan["hash_sum"]):
        bad.append(f"the shards hold {samples} samples with uid hash sum {written_hash}, the selection "
                   f"{plan['samples']} with {plan['hash_sum']}")
    if bad:
        raise RuntimeError(f"integrity check failed in {layout.shards_dir}: {len(bad)} problem(s): "
                           + " | ".join(bad[:5]))
    return {"samples": samples, "shards": n_shards,
            "sizes": {layout.name(r["index"]) + ".tar": r["samples"] for r in results}}


def clear_output(cfg: JobConfig, store: Store) -> None:
    """Remove what this stage writes under output.url (only its own files; used by --force-from)."""
    store.rm(layout_of(cfg).shards_dir, recursive=True)
    store.rm(join(cfg.output.url, METADATA_DIR), recursive=True)
    for name in (OUTPUT_PLAN, STATS):
        store.rm(join(cfg.output.url, name))


def missing_outputs(cfg: JobConfig, store: Store, stats: dict[str, Any]) -> list[str]:
    """Output shards of a committed write stage that are gone (the stage then writes them again)."""
    if _metadata_only(cfg):
        return [name for name in stats.get("files", []) if not store.exists(join(cfg.output.url, METADATA_DIR, name))]
    layout = layout_of(cfg)
    return [layout.name(i) for i in layout.missing(store, int(stats.get("output_shards", 0)))]


def _claim_output(store: Store, cfg: JobConfig, fingerprint: str) -> None:
    """The output folder belongs to one job: refuse another job's (or other settings') output."""
    out_plan_url = join(cfg.output.url, OUTPUT_PLAN)
    if store.exists(out_plan_url):
        owner = store.read_json(out_plan_url)
        if owner.get("fingerprint") != fingerprint or owner.get("workdir") != cfg.workdir:
            raise StaleStageError(
                f"{cfg.output.url} holds the output of another job or other settings (fingerprint "
                f"{owner.get('fingerprint')} != {fingerprint}); rerun with --force-from write or use another output.url"
            )
    else:
        for folder in (layout_of(cfg).shards_dir, join(cfg.output.url, METADATA_DIR)):
            if store.ls(folder):
                raise StaleStageError(f"{folder} already holds files not written by this job; use an empty output.url")


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Write the selected samples as new WebDataset shards under output.url (module docstring)."""
    layout = layout_of(cfg)
    out_plan_url = join(cfg.output.url, OUTPUT_PLAN)
    started = time.perf_counter()
    _claim_output(store, cfg, ctx.fingerprint)
    init_ray(cfg.ray)
    if _metadata_only(cfg):
        if not store.exists(out_plan_url):
            store.write_json(out_plan_url, {"fingerprint": ctx.fingerprint, "workdir": cfg.workdir, "mode": "metadata-only"})
        stats = write_metadata(cfg, store)
        upstream = {s: read_stats(store, stage_dir(cfg.workdir, s)) for s in (EMBED, SELECT)}
        store.write_json(join(cfg.output.url, STATS), {**stats, "job": summarize({**upstream, WRITE: stats}),
                                                       "select": _extract(upstream[SELECT], SELECT_KEYS)})
        return stats
    plan = build_plan(store, cfg)  # the one fixed by an earlier run when resuming
    n_samples, n_shards = plan["samples"], plan["output_shards"]
    if not store.exists(out_plan_url):
        store.write_json(out_plan_url, {"fingerprint": ctx.fingerprint, "workdir": cfg.workdir,
                                        "output_shards": n_shards, "samples": n_samples})

    pending = layout.missing(store, n_shards)
    log.info("write: %d samples into %d shards (%d already committed)", n_samples, n_shards, n_shards - len(pending))
    written = 0
    if pending:
        import ray

        ds = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=len(pending)).map(
            write_shard_row, num_cpus=1,
            fn_kwargs={"store": store, "cfg": cfg, "plan": plan, "shard_written": ctx.hooks.shard_written})
        results = sorted(ds.take_all(), key=lambda r: r["index"])
        written = sum(1 for r in results if r["written"])
        failed = [r for r in results if r["error"]]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(pending)} output shards failed ({written} written, committed and kept "
                f"for a re-run); first: shard {layout.name(failed[0]['index'])}: {failed[0]['error']}"
            )

    check = check_output(store, cfg, plan)
    if n_shards:  # the shard table DataComp's resharder and open_clip read instead of every _stats.json
        store.write_json(join(layout.shards_dir, SIZES), check["sizes"])
    stats = {
        "output_url": cfg.output.url,
        "shards_url": layout.shards_dir,
        "output_shards": n_shards,
        "samples_written": check["samples"],
        "samples_per_shard": cfg.output.samples_per_shard,
        "shards_written_this_run": written,
        "shards_reused": n_shards - written,
        "per_shard": {"min": min(check["sizes"].values(), default=0), "max": max(check["sizes"].values(), default=0)},
        "integrity": "ok: every selected uid written exactly once",
        "seconds": round(time.perf_counter() - started, 3),
    }
    upstream = {s: read_stats(store, stage_dir(cfg.workdir, s)) for s in (EMBED, SELECT)}
    store.write_json(join(cfg.output.url, STATS), {**stats, "job": summarize({**upstream, WRITE: stats}),
                                                   "select": _extract(upstream[SELECT], SELECT_KEYS)})
    log.info("write stage: %d samples in %d shards under %s", check["samples"], n_shards, layout.shards_dir)
    return stats


SELECT_KEYS = ("method", "n_nodes", "budget", "selected", "prefiltered", "overlap_with_exact",
               "cross_partition_edge_fraction")


def _extract(stats: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return {k: stats.get(k) for k in keys} if stats else None


def committed_outside(cfg: JobConfig) -> tuple[str, list[str]]:
    """What the stage commits under output.url (recorded in its manifest, checked like its folder)."""
    return cfg.output.url, [METADATA_DIR if _metadata_only(cfg) else SHARDS_DIR, OUTPUT_PLAN, STATS]


STAGE = Stage(name=WRITE, reads=(EMBED, SELECT), settings=settings, run=run,
              missing_outputs=missing_outputs, clear_outputs=clear_output, outside=committed_outside)
