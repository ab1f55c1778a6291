"""One output shard (runs in a Ray Data task): its plan rows → the original samples read from the
input shards through the same reader as the embed stage, found by **uid** (a key may repeat in a
shard, and DataComp's keys say nothing about identity) → a deterministic tar, its img2dataset
stats, then its metadata parquet (the shard's commit). And the per-shard integrity check."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ..config import JobConfig
from ..formats.output import (
    OutputLayout,
    json_fields,
    metadata_table,
    output_key,
    read_metadata_uids,
    shard_stats,
)
from ..formats.tar import TarWriter
from ..formats.webdataset import Sample, iter_shard_samples
from ..storage import Store
from ..workdir import WRITE, stage_dir
from .plan import hash_sum, read_plan_rows

log = logging.getLogger(__name__)


def layout_of(cfg: JobConfig) -> OutputLayout:
    return OutputLayout(cfg.output.url, cfg.output.shard_name_width)


def find_planned_samples(store: Store, cfg: JobConfig, rows: dict[str, list]) -> list[Sample | None]:
    """The sample of each plan row, streaming each input shard once (in plan order) and stopping
    when it owes no more. Matched by uid among the usable samples, exactly as the embed stage saw
    them (same reader, same in-shard de-duplication); None where a sample is gone."""
    found: list[Sample | None] = [None] * len(rows["uid"])
    wanted: dict[str, dict[str, int]] = {}
    for row, (src, uid) in enumerate(zip(rows["source_shard"], rows["uid"])):
        wanted.setdefault(src, {})[uid] = row
    for src, by_uid in wanted.items():
        todo = len(by_uid)
        for sample in iter_shard_samples(store, src, cfg.input):
            row = by_uid.get(sample.uid) if sample.problem is None else None
            if row is None or found[row] is not None:
                continue
            if sample.key != rows["source_key"][row]:
                raise RuntimeError(f"{src}: uid {sample.uid} is under key {sample.key}, the embed stage saw it under "
                                   f"{rows['source_key'][row]} (was the pool changed after the embed stage?)")
            found[row] = sample
            todo -= 1
            if todo == 0:
                break
    return found


def write_output_shard(store: Store, cfg: JobConfig, plan: dict[str, Any], index: int,
                       shard_written: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write output shard `index` from its plan rows; skip it when committed.
    `shard_written(index)` runs after the tar is committed, before the metadata (a test hook)."""
    layout = layout_of(cfg)
    if layout.committed(store, index):
        return {"index": index, "written": False, "samples": None}
    rows = read_plan_rows(store, stage_dir(cfg.workdir, WRITE), plan, index)
    found = find_planned_samples(store, cfg, rows)
    gone = [r for r, sample in enumerate(found) if sample is None]
    if gone:
        raise RuntimeError(
            f"output shard {layout.name(index)}: {len(gone)} selected samples are not in their input shards "
            f"{sorted({rows['source_shard'][r] for r in gone})[:3]}, e.g. uids {[rows['uid'][r] for r in gone][:5]} (was "
            "the pool changed after the embed stage, or does a shard's img2dataset .parquet name other uids than its "
            "tar? embed.precomputed.use_sidecar: false reads the tars)"
        )

    meta: dict[str, list] = {c: [] for c in ("text", "url", "original_width", "original_height", "sha256")}
    cap_ext = cfg.input.caption_ext.lower()
    with tempfile.TemporaryDirectory(prefix="d2prune-write-") as tmp:
        path = os.path.join(tmp, layout.name(index) + ".tar")
        with TarWriter(path) as tar:
            for uid, sample in zip(rows["uid"], found):
                key = output_key(uid)
                caption = None
                for ext, data in sample.members.items():  # tar order of the input, original bytes
                    tar.add(f"{key}.{ext}", data)
                    if ext.lower() == cap_ext and caption is None:
                        caption = data.decode("utf-8", errors="replace")
                meta["text"].append(caption)
                for name, value in json_fields(sample.meta).items():
                    meta[name].append(value)
        store.write_local_file(layout.tar(index), path)
    if shard_written is not None:
        shard_written(index)
    store.write_json(layout.stats(index), shard_stats(len(found)))
    store.write_parquet(layout.metadata(index), metadata_table({
        "uid": rows["uid"], **meta, "clip_score": rows["clip_score"], "rank": rows["rank"],
        "source_shard": rows["source_shard"], "source_key": rows["source_key"]}))
    return {"index": index, "written": True, "samples": len(found)}


def write_shard_row(row: dict[str, Any], store: Store, cfg: JobConfig, plan: dict[str, Any],
                    shard_written: Callable[[int], None] | None) -> dict[str, Any]:
    """The Ray Data map over output shard indices. A failed shard is reported, not raised: the
    other shards still get written (a re-run has less left to do) and the driver raises one clear
    error naming the failed shards."""
    index = int(row["index"])
    try:
        result = write_output_shard(store, cfg, plan, index, shard_written)
        return {"index": index, "written": result["written"], "error": ""}
    except Exception as err:  # noqa: BLE001 - turned into the stage's error by the driver
        log.error("output shard %s failed: %s: %s", layout_of(cfg).name(index), type(err).__name__, err)
        return {"index": index, "written": False, "error": f"{type(err).__name__}: {err}"}


def check_shards(store: Store, cfg: JobConfig, plan: dict[str, Any], indices: list[int]) -> list[dict[str, Any]]:
    """The integrity check of output shards `indices` (a Ray task): each shard's metadata holds
    exactly its planned uids, each once, and its stats say as many samples. Returns per shard its
    count, uid hash sum and problems (empty when it is right)."""
    layout = layout_of(cfg)
    write_dir = stage_dir(cfg.workdir, WRITE)
    out = []
    for index in indices:
        planned = read_plan_rows(store, write_dir, plan, index)["uid"]
        written = read_metadata_uids(store, layout, index)
        successes = store.read_json(layout.stats(index)).get("successes")
        problems = []
        seen: set[str] = set()
        twice = [u for u in written if u in seen or seen.add(u)]
        missing = sorted(set(planned) - seen)
        extra = sorted(seen - set(planned))
        if missing:
            problems.append(f"missing {len(missing)} {missing[:5]}")
        if extra:
            problems.append(f"extra {len(extra)} {extra[:5]} (not planned for this shard)")
        if twice:
            problems.append(f"written twice {len(twice)} {twice[:5]}")
        if successes != len(written):
            problems.append(f"{layout.name(index)}_stats.json says {successes} samples, the metadata has {len(written)}")
        out.append({"index": index, "samples": len(written), "hash_sum": str(hash_sum(written)),
                    "problems": problems})
    return out
