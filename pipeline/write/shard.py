"""One output shard (runs in a Ray Data task): its plan rows → the original members read from the
input shards through the same reader as the embed stage → a deterministic tar, then its metadata
parquet (the shard's commit)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from typing import Any, Callable

from ..config import JobConfig
from ..formats.output import metadata_table, output_key, shard_committed, shard_name, shard_urls
from ..formats.tar import TarWriter
from ..formats.webdataset import iter_shard_samples
from ..storage import Store
from .plan import read_plan_shard

log = logging.getLogger(__name__)


def write_output_shard(store: Store, cfg: JobConfig, plan_url: str, index: int,
                       shard_written: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write output shard `index` from the plan's row group `index`; skip it when committed.
    `shard_written(index)` runs after the tar is committed, before the metadata (a test hook)."""
    tar_url, meta_url = shard_urls(cfg.output.url, index)
    if shard_committed(store, cfg.output.url, index):
        return {"index": index, "written": False, "samples": None}
    plan = read_plan_shard(store, plan_url, index)
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
        with TarWriter(path) as tar:
            for row, members in enumerate(found):
                key = output_key(plan["uid"][row])
                caption = None
                for ext, data in members.items():  # tar order of the input
                    tar.add(f"{key}.{ext}", data)
                    if ext == cap_ext and caption is None:
                        caption = data.decode("utf-8", errors="replace")
                captions.append(caption)
        store.write_local_file(tar_url, path)
    if shard_written is not None:
        shard_written(index)
    store.write_parquet(meta_url, metadata_table(plan["uid"], captions, plan["clip_score"], plan["rank"],
                                                 plan["source_shard"], plan["source_key"]))
    return {"index": index, "written": True, "samples": len(found)}


def write_shard_row(row: dict[str, Any], store: Store, cfg: JobConfig, plan_url: str,
                    shard_written: Callable[[int], None] | None) -> dict[str, Any]:
    """The Ray Data map over output shard indices. A failed shard is reported, not raised: the
    other shards still get written (a re-run has less left to do) and the driver raises one clear
    error naming the failed shards."""
    index = int(row["index"])
    try:
        result = write_output_shard(store, cfg, plan_url, index, shard_written)
        return {"index": index, "written": result["written"], "error": ""}
    except Exception as err:  # noqa: BLE001 - turned into the stage's error by the driver
        log.error("output shard %s failed: %s: %s", shard_name(index), type(err).__name__, err)
        return {"index": index, "written": False, "error": f"{type(err).__name__}: {err}"}
