"""The write stage: the selected samples, byte for byte, as new WebDataset shards (layout:
:mod:`pipeline.formats.output`).

Determinism: the shard plan is fixed before anything is written (:mod:`.plan`); tar headers carry
fixed metadata (:class:`~pipeline.formats.tar.TarWriter`), so a shard written twice is identical
byte for byte.

Resume: a shard is committed when its ``.parquet`` exists (the ``.tar`` is committed before it,
each by an atomic write), and a re-run writes only shards that are not. Output shards are produced
by Ray Data (one row per output shard, mapped by a task that streams its input shards,
:mod:`.shard`).

Integrity check (always, also when resuming): the output shards' metadata together hold exactly
the selected uids, each once; otherwise an error names the missing / extra / repeated uids.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import JobConfig
from ..errors import StaleStageError
from ..formats.output import OUTPUT_PLAN, STATS, missing_shards, read_metadata_uids, shard_name, shards_dir
from ..runtime import init_ray
from ..stage import Stage, StageContext
from ..storage import Store, join
from ..summary import summarize
from ..workdir import read_stats, stage_dir
from .plan import PLAN, build_plan, write_plan
from .shard import write_shard_row

log = logging.getLogger(__name__)


def settings(cfg: JobConfig) -> dict[str, Any]:
    return {"output": cfg.output.model_dump()}


def check_output(store: Store, cfg: JobConfig, n_shards: int, expected_uids: list[str]) -> dict[str, Any]:
    """Every output shard committed; together they hold the selected uids exactly once each."""
    import pandas as pd

    uncommitted = [shard_name(i) for i in missing_shards(store, cfg.output.url, n_shards)]
    if uncommitted:
        raise RuntimeError(f"output shards not committed: {uncommitted[:10]} ({len(uncommitted)} in all)")
    uids: list[str] = []
    per_shard = []
    for index in range(n_shards):
        part = read_metadata_uids(store, cfg.output.url, index)
        per_shard.append(len(part))
        uids.extend(part)
    written = pd.Series(uids, dtype=object)
    repeated = written[written.duplicated()].unique().tolist()
    expected = set(expected_uids)
    got = set(uids)
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if repeated or missing or extra or len(uids) != len(expected_uids):
        raise RuntimeError(
            f"integrity check failed in {shards_dir(cfg.output.url)}: {len(uids)} samples written, "
            f"{len(expected_uids)} selected; missing {len(missing)} {missing[:5]}, extra {len(extra)} {extra[:5]}, "
            f"written twice {len(repeated)} {repeated[:5]}"
        )
    return {"samples": len(uids), "shards": n_shards, "per_shard_min": min(per_shard, default=0),
            "per_shard_max": max(per_shard, default=0)}


def clear_output(cfg: JobConfig, store: Store) -> None:
    """Remove what this stage writes under output.url (only its own files; used by --force-from)."""
    store.rm(shards_dir(cfg.output.url), recursive=True)
    for name in (OUTPUT_PLAN, STATS):
        store.rm(join(cfg.output.url, name))


def missing_outputs(cfg: JobConfig, store: Store, stats: dict[str, Any]) -> list[str]:
    """Output shards of a committed write stage that are gone (the stage then writes them again)."""
    return [shard_name(i) for i in missing_shards(store, cfg.output.url, int(stats.get("output_shards", 0)))]


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
    elif store.ls(shards_dir(cfg.output.url)):
        raise StaleStageError(
            f"{shards_dir(cfg.output.url)} already holds files not written by this job; use an empty output.url"
        )


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Write the selected samples as new WebDataset shards under output.url (module docstring)."""
    plan_url = join(stage_dir(cfg.workdir, "write"), PLAN)
    out_plan_url = join(cfg.output.url, OUTPUT_PLAN)
    started = time.perf_counter()
    _claim_output(store, cfg, ctx.fingerprint)

    if store.exists(plan_url):  # resuming: the plan fixed by an earlier run
        uids = store.read_parquet(plan_url, columns=["uid"]).column("uid").to_pylist()
    else:
        plan = build_plan(store, cfg)
        write_plan(store, plan_url, plan, cfg.output.samples_per_shard)
        uids = plan.column("uid").to_pylist()
    n_samples = len(uids)
    n_shards = -(-n_samples // cfg.output.samples_per_shard)
    if not store.exists(out_plan_url):
        store.write_json(out_plan_url, {"fingerprint": ctx.fingerprint, "workdir": cfg.workdir,
                                        "output_shards": n_shards, "samples": n_samples})

    pending = missing_shards(store, cfg.output.url, n_shards)
    log.info("write: %d samples into %d shards (%d already committed)", n_samples, n_shards, n_shards - len(pending))
    written = 0
    if pending:
        import ray

        init_ray(cfg.ray)
        ds = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=len(pending)).map(
            write_shard_row, num_cpus=1,
            fn_kwargs={"store": store, "cfg": cfg, "plan_url": plan_url, "shard_written": ctx.hooks.shard_written})
        results = sorted(ds.take_all(), key=lambda r: r["index"])
        written = sum(1 for r in results if r["written"])
        failed = [r for r in results if r["error"]]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(pending)} output shards failed ({written} written, committed and kept "
                f"for a re-run); first: shard {shard_name(failed[0]['index'])}: {failed[0]['error']}"
            )

    check = check_output(store, cfg, n_shards, uids)
    stats = {
        "output_url": cfg.output.url,
        "shards_url": shards_dir(cfg.output.url),
        "output_shards": n_shards,
        "samples_written": check["samples"],
        "samples_per_shard": cfg.output.samples_per_shard,
        "shards_written_this_run": written,
        "shards_reused": n_shards - written,
        "per_shard": {"min": check["per_shard_min"], "max": check["per_shard_max"]},
        "integrity": "ok: every selected uid written exactly once",
        "seconds": round(time.perf_counter() - started, 3),
    }
    upstream = {s: read_stats(store, stage_dir(cfg.workdir, s)) for s in ("embed", "select")}
    store.write_json(join(cfg.output.url, STATS), {**stats, "job": summarize({**upstream, "write": stats}),
                                                   "select": _extract(upstream["select"], SELECT_KEYS)})
    log.info("write stage: %d samples in %d shards under %s", check["samples"], n_shards, shards_dir(cfg.output.url))
    return stats


SELECT_KEYS = ("method", "n_nodes", "budget", "selected", "prefiltered", "overlap_with_exact",
               "cross_partition_edge_fraction")


def _extract(stats: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return {k: stats.get(k) for k in keys} if stats else None


STAGE = Stage(name="write", upstream="select", settings=settings, run=run,
              missing_outputs=missing_outputs, clear_outputs=clear_output)
