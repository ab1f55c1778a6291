"""The write stage: the selected samples, byte for byte, as new WebDataset shards.

Layout under ``output.url``::

    shards/NNNNN.tar       the kept samples: every original tar member, original bytes (no re-encoding)
    shards/NNNNN.parquet   that shard's metadata: uid, key, caption, clip_score, rank (selection
                           order), source_shard, source_key; written after the tar = the shard's commit
    _PLAN.json             which job the output belongs to (fingerprint, shard count, selection size)
    _stats.json            the job's stats (written when every shard is committed and checked)

Determinism: the assignment of samples to output shards is fixed before anything is written and
saved as ``WORKDIR/write/plan.parquet`` (one row group per output shard): kept samples in source
order (input shard index, then position in the shard), cut into runs of ``output.samples_per_shard``.
Source order makes each output shard read only a contiguous run of input shards (usually one or
two). Tar headers carry fixed metadata (mtime 0, uid/gid 0), so a shard written twice is
identical byte for byte. Sample keys in the output are the uids (when they are safe tar names;
else the md5 of the uid), since keys of different input shards may collide.

Resume: a shard is committed when its ``.parquet`` exists (the ``.tar`` is committed before it, each
by an atomic write), and a re-run writes only shards that are not. Output shards are produced by
Ray Data (one row per output shard, mapped by a task that streams its input shards).

Integrity check (always, also when resuming): the output shards' metadata together hold exactly the
selected uids, each once; otherwise an error names the missing / extra / repeated uids.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np

from . import workdir
from .config import JobConfig
from .shards import iter_shard_samples, shard_urls
from .storage import Store, basename, join

log = logging.getLogger(__name__)

PLAN = "plan.parquet"
OUTPUT_PLAN = "_PLAN.json"
SHARDS_DIR = "shards"
# Test hook: the output shard with this index fails after its tar is committed and before its
# metadata (= its commit), as a job killed in the middle of the write stage would leave it.
FAIL_ENV = "D2PRUNE_WRITE_FAIL_AT_SHARD"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def shards_dir(cfg: JobConfig) -> str:
    return join(cfg.output.url, SHARDS_DIR)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def shard_committed(store: Store, cfg: JobConfig, index: int) -> bool:
    """Output shard `index` is committed: its metadata (written last) and its tar both exist."""
    stem = join(shards_dir(cfg), shard_name(index))
    return store.exists(stem + ".parquet") and store.exists(stem + ".tar")


def missing_shards(store: Store, cfg: JobConfig, n_shards: int) -> list[int]:
    """Indices of the output shards 0..n_shards-1 that are not committed."""
    return [i for i in range(n_shards) if not shard_committed(store, cfg, i)]


def output_key(uid: str) -> str:
    return uid if _SAFE_KEY.match(uid) else hashlib.md5(uid.encode()).hexdigest()


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


# ================================================================================================
# One output shard (runs in a Ray Data task)
# ================================================================================================

def write_output_shard(store: Store, cfg: JobConfig, plan_url: str, index: int, fail_at: int | None = None
                       ) -> dict[str, Any]:
    """Write output shard `index` from the plan's row group `index`; skip it when committed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = shards_dir(cfg)
    tar_url = join(out_dir, shard_name(index) + ".tar")
    meta_url = join(out_dir, shard_name(index) + ".parquet")
    if shard_committed(store, cfg, index):
        return {"index": index, "written": False, "samples": None}
    with store.open(plan_url, "rb") as fh:
        plan = pq.ParquetFile(fh).read_row_group(index).to_pydict()
    wanted = {(src, key): row for row, (src, key) in enumerate(zip(plan["source_shard"], plan["source_key"]))}
    found: list[dict[str, bytes] | None] = [None] * len(plan["uid"])

    # the same reader as the embed stage, so both agree on what a sample, its key and uid are;
    # Counter keeps the input shards in plan order, each once, with how many rows each still owes
    for src, todo in Counter(plan["source_shard"]).items():
        for sample in iter_shard_samples(store, src, cfg.input):
            row = wanted.get((src, sample.key))
            if row is None or found[row] is not None or sample.problem is not None:
                continue
            if sample.uid != plan["uid"][row]:
                raise RuntimeError(f"{src} key {sample.key}: uid {sample.uid}, the embed stage saw "
                                   f"{plan['uid'][row]} (was the pool changed after the embed stage?)")
            found[row] = sample.members
            todo -= 1
            if todo == 0:
                break
    missing = [plan["uid"][r] for r in range(len(found)) if found[r] is None]
    if missing:
        raise RuntimeError(
            f"output shard {shard_name(index)}: {len(missing)} selected samples are no longer in their input "
            f"shards, e.g. uids {missing[:5]} (was the pool changed after the embed stage?)"
        )

    captions = []
    cap_ext = cfg.input.caption_ext
    with tempfile.TemporaryDirectory(prefix="d2prune-write-") as tmp:
        path = os.path.join(tmp, shard_name(index) + ".tar")
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for row, members in enumerate(found):
                key = output_key(plan["uid"][row])
                caption = None
                for ext, data in members.items():  # tar order of the input
                    tar.addfile(*_tar_member(f"{key}.{ext}", data))
                    if ext == cap_ext and caption is None:
                        caption = data.decode("utf-8", errors="replace")
                captions.append(caption)
        store.write_local_file(tar_url, path)
    if fail_at is not None and index == fail_at:
        raise RuntimeError(f"injected failure in output shard {shard_name(index)} ({FAIL_ENV})")
    meta = pa.table({
        "uid": pa.array(plan["uid"], pa.string()),
        "key": pa.array([output_key(u) for u in plan["uid"]], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "clip_score": pa.array(plan["clip_score"], pa.float32()),
        "rank": pa.array(plan["rank"], pa.int64()),
        "source_shard": pa.array(plan["source_shard"], pa.string()),
        "source_key": pa.array(plan["source_key"], pa.string()),
    })
    store.write_parquet(meta_url, meta)
    return {"index": index, "written": True, "samples": len(found)}


def _ray_data_write(row: dict[str, Any], store: Store, cfg: JobConfig, plan_url: str,
                    fail_at: int | None) -> dict[str, Any]:
    # A failed shard is reported, not raised: the other shards still get written (a re-run has
    # less left to do) and the driver raises one clear error naming the failed shards.
    index = int(row["index"])
    try:
        result = write_output_shard(store, cfg, plan_url, index, fail_at)
        return {"index": index, "written": result["written"], "error": ""}
    except Exception as err:  # noqa: BLE001 - turned into the stage's error below
        log.error("output shard %s failed: %s: %s", shard_name(index), type(err).__name__, err)
        return {"index": index, "written": False, "error": f"{type(err).__name__}: {err}"}


# ================================================================================================
# The plan
# ================================================================================================

def build_plan(store: Store, cfg: JobConfig):
    """The selected samples in source order with their output shard (a pyarrow table)."""
    import pandas as pd
    import pyarrow as pa

    sel_dir = workdir.stage_dir(cfg, "select")
    selected = store.read_parquet(join(sel_dir, "selected.parquet"), columns=["uid", "rank"]).to_pandas()
    if selected["uid"].duplicated().any():
        dup = selected["uid"][selected["uid"].duplicated()].unique()[:5].tolist()
        raise ValueError(f"selected.parquet lists uids more than once, e.g. {dup}")
    n_inputs = len(shard_urls(cfg.input))
    frames = []
    for url in workdir.committed_parts(store, cfg, "embed"):
        name = basename(url)[: -len(".parquet")]
        table = store.read_parquet(url, columns=["uid", "shard", "key", "clip_score"]).to_pandas()
        table["source_index"] = int(name.split("-")[1])
        table["position"] = np.arange(len(table))
        frames.append(table)
    pool = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["uid", "shard", "key", "clip_score", "source_index", "position"])
    joined = selected.merge(pool, on="uid", how="left", validate="one_to_many")
    lost = joined["shard"].isna()
    if lost.any():
        raise ValueError(f"{int(lost.sum())} selected uids are not in the embedding parts, "
                         f"e.g. {joined['uid'][lost].head(5).tolist()}")
    if joined["uid"].duplicated().any():
        dup = joined["uid"][joined["uid"].duplicated()].unique()[:5].tolist()
        raise ValueError(f"selected uids appear in more than one pool sample, e.g. {dup}")
    bad_index = joined["source_index"] >= n_inputs
    if bad_index.any():
        raise ValueError(f"embedding parts index input shards beyond the {n_inputs} of input.shards")
    joined = joined.sort_values(["source_index", "position"], kind="stable").reset_index(drop=True)
    joined["out_shard"] = np.arange(len(joined)) // cfg.output.samples_per_shard
    return pa.table({
        "uid": pa.array(joined["uid"].astype(str).tolist(), pa.string()),
        "rank": pa.array(joined["rank"].to_numpy(np.int64)),
        "clip_score": pa.array(joined["clip_score"].to_numpy(np.float32)),
        "source_shard": pa.array(joined["shard"].astype(str).tolist(), pa.string()),
        "source_key": pa.array(joined["key"].astype(str).tolist(), pa.string()),
        "source_index": pa.array(joined["source_index"].to_numpy(np.int64)),
        "out_shard": pa.array(joined["out_shard"].to_numpy(np.int64)),
    })


def _write_plan(store: Store, url: str, table, samples_per_shard: int) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    # one row group per output shard: a shard's task reads only its own rows (a single chunk, so
    # the writer cuts row groups at exactly every samples_per_shard rows)
    pq.write_table(table.combine_chunks(), buf, row_group_size=samples_per_shard, compression="zstd")
    buf.seek(0)
    meta = pq.ParquetFile(buf).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if any(size != samples_per_shard for size in sizes[:-1]):
        raise RuntimeError(f"plan row groups {sizes[:5]}... are not {samples_per_shard} rows each")
    store.write_bytes(url, buf.getvalue())


# ================================================================================================
# Integrity and the stage
# ================================================================================================

def check_output(store: Store, cfg: JobConfig, n_shards: int, expected_uids: list[str]) -> dict[str, Any]:
    """Every output shard committed; together they hold the selected uids exactly once each."""
    import pandas as pd

    out_dir = shards_dir(cfg)
    uncommitted = [shard_name(i) for i in missing_shards(store, cfg, n_shards)]
    if uncommitted:
        raise RuntimeError(f"output shards not committed: {uncommitted[:10]} ({len(uncommitted)} in all)")
    uids: list[str] = []
    per_shard = []
    for index in range(n_shards):
        meta_url = join(out_dir, shard_name(index) + ".parquet")
        part = store.read_parquet(meta_url, columns=["uid"]).column("uid").to_pylist()
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
            f"integrity check failed in {out_dir}: {len(uids)} samples written, {len(expected_uids)} selected; "
            f"missing {len(missing)} {missing[:5]}, extra {len(extra)} {extra[:5]}, "
            f"written twice {len(repeated)} {repeated[:5]}"
        )
    return {"samples": len(uids), "shards": n_shards, "per_shard_min": min(per_shard, default=0),
            "per_shard_max": max(per_shard, default=0)}


def clear_output(store: Store, cfg: JobConfig) -> None:
    """Remove what this stage writes under output.url (only its own files; used by --force-from)."""
    store.rm(shards_dir(cfg), recursive=True)
    for name in (OUTPUT_PLAN, "_stats.json"):
        store.rm(join(cfg.output.url, name))


def run_write_stage(cfg: JobConfig, store: Store) -> dict[str, Any]:
    """Write the selected samples as new WebDataset shards under output.url (see the module doc)."""
    write_dir = workdir.stage_dir(cfg, "write")
    plan_url = join(write_dir, PLAN)
    out_plan_url = join(cfg.output.url, OUTPUT_PLAN)
    if workdir.is_committed(store, cfg, "write"):
        stats = store.read_json(join(write_dir, "_stats.json"))
        missing = missing_shards(store, cfg, stats["output_shards"])
        if not missing:
            log.info("write stage already committed: %d shards in %s", stats["output_shards"], shards_dir(cfg))
            return stats
        log.warning("write stage was committed but %d output shards are gone (e.g. %s): rewriting them",
                    len(missing), shard_name(missing[0]))
    if not workdir.is_committed(store, cfg, "select"):
        raise RuntimeError(f"the write stage needs the committed select stage: no {workdir.SUCCESS} in "
                           f"{workdir.stage_dir(cfg, 'select')}")
    workdir.claim_stage_dir(store, cfg, "write")
    started = time.perf_counter()
    fingerprint = cfg.fingerprint("write")

    if store.exists(out_plan_url):
        owner = store.read_json(out_plan_url)
        if owner.get("fingerprint") != fingerprint or owner.get("workdir") != cfg.workdir:
            raise workdir.StaleStageError(
                f"{cfg.output.url} holds the output of another job or other settings (fingerprint "
                f"{owner.get('fingerprint')} != {fingerprint}); rerun with --force-from write or use another output.url"
            )
    elif store.ls(shards_dir(cfg)):
        raise workdir.StaleStageError(
            f"{shards_dir(cfg)} already holds files not written by this job; use an empty output.url"
        )

    if store.exists(plan_url):  # resuming: the plan fixed by an earlier run
        uids = store.read_parquet(plan_url, columns=["uid"]).column("uid").to_pylist()
    else:
        plan = build_plan(store, cfg)
        _write_plan(store, plan_url, plan, cfg.output.samples_per_shard)
        uids = plan.column("uid").to_pylist()
    n_samples = len(uids)
    n_shards = -(-n_samples // cfg.output.samples_per_shard)
    if not store.exists(out_plan_url):
        store.write_json(out_plan_url, {"fingerprint": fingerprint, "workdir": cfg.workdir,
                                        "output_shards": n_shards, "samples": n_samples})

    fail_at = os.environ.get(FAIL_ENV)
    fail_at = int(fail_at) if fail_at not in (None, "") else None
    pending = missing_shards(store, cfg, n_shards)
    log.info("write: %d samples into %d shards (%d already committed)", n_samples, n_shards, n_shards - len(pending))
    written = 0
    if pending:
        import ray

        from .runtime import init_ray

        init_ray(cfg.ray)
        ds = ray.data.from_items([{"index": i} for i in pending], override_num_blocks=len(pending)).map(
            _ray_data_write, num_cpus=1,
            fn_kwargs={"store": store, "cfg": cfg, "plan_url": plan_url, "fail_at": fail_at})
        results = sorted(ds.take_all(), key=lambda r: r["index"])
        written = sum(1 for r in results if r["written"])
        failed = [r for r in results if r["error"]]
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(pending)} output shards failed ({written} written, committed and kept "
                f"for a re-run); first: shard {shard_name(failed[0]['index'])}: {failed[0]['error']}"
            )

    check = check_output(store, cfg, n_shards, uids)
    embed_stats = _read_optional(store, join(workdir.stage_dir(cfg, "embed"), "_stats.json"))
    select_stats = _read_optional(store, join(workdir.stage_dir(cfg, "select"), "_stats.json"))
    stats = {
        "output_url": cfg.output.url,
        "shards_url": shards_dir(cfg),
        "output_shards": n_shards,
        "samples_written": check["samples"],
        "samples_per_shard": cfg.output.samples_per_shard,
        "shards_written_this_run": written,
        "shards_reused": n_shards - written,
        "per_shard": {"min": check["per_shard_min"], "max": check["per_shard_max"]},
        "integrity": "ok: every selected uid written exactly once",
        "seconds": round(time.perf_counter() - started, 3),
        "select": {k: select_stats.get(k) for k in ("method", "n_nodes", "budget", "selected", "prefiltered",
                                                    "overlap_with_exact", "cross_partition_edge_fraction")}
        if select_stats else None,
        "embed": {k: embed_stats.get(k) for k in ("samples", "skipped")} if embed_stats else None,
    }
    store.write_json(join(cfg.output.url, "_stats.json"), stats)
    workdir.commit_stage(store, cfg, "write", stats)
    log.info("write stage committed: %d samples in %d shards under %s", check["samples"], n_shards, shards_dir(cfg))
    return stats


def _read_optional(store: Store, url: str) -> dict[str, Any] | None:
    return store.read_json(url) if store.exists(url) else None
