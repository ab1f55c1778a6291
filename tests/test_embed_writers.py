"""The embed stage's driver is not a data path: the model actors hand the embedded rows to writer
actors (:class:`pipeline.embed.parts.ShardWriter`), which gather each shard and commit its part;
the driver gets small records (forward times, "shard complete") and one commit record per part.

What is shown: on a real run (tiny model, embedded Ray, a pool with every kind of bad sample and
cross-shard duplicate uids) the parts are committed by another process than the driver, and what
reaches the driver is bounded by the number of forward passes and shards, far below the parts'
bytes; and the writer's own rules, called directly: rows arriving in any order and after their
shard's marker, an unreadable shard's late rows dropped, the registry's answer applied as
`duplicate_uid` skip records.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from pipeline.embed.parts import ShardWriter, UidRegistry
from pipeline.formats.buckets import uid_hashes
from pipeline.formats.embeddings import read_skipped, skipped_url
from pipeline.job import run_one
from pipeline.storage import Store, join
from pipeline.testing import make_config
from pipeline.workdir import part_name, stage_dir

# a record the driver receives: 7 fixed-width fields (8 bytes each) and two short strings
# ("complete" and an empty error, or "failed" and a one-line reason)
RECORD_BYTES = 7 * 8 + 64


@pytest.mark.slow
def test_rows_never_reach_the_driver_and_workers_commit_the_parts(ray_local, small_pool, tmp_path):
    store = Store()
    cfg = make_config(str(tmp_path / "work"), small_pool.shards)
    stats = run_one(cfg, store, "embed")
    directory = stage_dir(cfg.workdir, "embed")

    # committed by writer actors: Ray worker processes, not this one (the driver)
    writers = stats["part_writers"]
    assert writers["actors"] >= 1 and writers["pids"] and os.getpid() not in writers["pids"]
    assert all(store.exists(join(directory, part_name(i) + ".parquet")) for i in range(len(small_pool.shards)))

    # what the stream brought the driver: at most a record per forward pass and per shard event
    # (a forward is one chunk of one shard: ceil(rows read / batch) of them per shard)
    driver = stats["driver_received"]
    batch = stats["batch_size"]
    forwards = sum(math.ceil((s["samples"] + sum(s["skipped"].values())) / batch) for s in stats["per_shard"])
    shards = len(small_pool.shards)
    assert 0 < driver["records"] <= forwards + 2 * shards
    assert driver["bytes"] <= RECORD_BYTES * driver["records"]
    assert driver["commit_records"] == shards
    # against what the parts hold (the rows the driver used to receive): a small fraction
    parts_bytes = sum(os.path.getsize(os.path.join(directory, part_name(i) + ".parquet")) for i in range(shards))
    assert driver["bytes"] + driver["commit_record_bytes"] < parts_bytes / 4
    # and the samples are all there, exactly as the pool's construction says
    assert stats["samples"] == small_pool.n_kept
    assert stats["skipped"] == dict(sorted(small_pool.skipped_total.items()))


def _rows(positions, uids, dim=4):
    n = len(positions)
    rng = np.random.default_rng(len(positions))
    vectors = rng.standard_normal((n, dim)).astype(np.float16)
    return {"sample_index": np.array(positions, dtype=np.int64), "uid": np.array(uids, dtype=object),
            "key": np.array([f"k{p:03d}" for p in positions], dtype=object),
            "clip_score": np.zeros(n, dtype=np.float32), "image_embedding": vectors, "text_embedding": vectors,
            "caption": np.array([f"caption {p}" for p in positions], dtype=object),
            "original_width": np.full(n, 10, dtype=np.int32), "original_height": np.full(n, 10, dtype=np.int32),
            "sha256": np.array([f"{p:064x}" for p in positions], dtype=object)}


def test_a_writer_gathers_out_of_order_rows_and_applies_the_registry_answer(tmp_path):
    store, directory = Store(), str(tmp_path / "embeddings")
    writer = ShardWriter(store, directory, {0: "/pool/00000.tar", 1: "/pool/00001.tar"}, dim=4)
    # shard 0: its last chunk and marker first, the first chunk after it (another actor was slower)
    skip = [(2, "k002", "", "missing_caption")]
    assert writer.add(0, _rows([3, 4], ["u3", "u4"]), [], (4, json.dumps(skip), "")) is None
    assert writer.add(0, _rows([0, 1], ["u0", "u1"]), [], None) == ("complete", 4, 5, "")
    # shard 1 could not be read: its rows arriving after the marker are dropped, nothing is kept
    assert writer.add(1, None, [], (0, "[]", "not a tar archive")) == ("failed", 0, 0, "not a tar archive")
    assert writer.add(1, _rows([0], ["v0"]), [], None) is None
    assert writer.failed == {1} and 1 not in writer.partial

    # the registry says u1 was in an earlier shard
    registry = UidRegistry()
    registry.add(uid_hashes(["u1"]))
    hashes = writer.uid_hashes(0)
    seen = registry.check_and_add(hashes)
    record = writer.commit(0, None, seen)
    assert record["pid"] == os.getpid() and record["stats"]["samples"] == 3
    assert record["stats"]["skipped"] == {"duplicate_uid": 1, "missing_caption": 1}
    part = store.read_parquet(join(directory, part_name(0) + ".parquet"))
    assert part.column("uid").to_pylist() == ["u0", "u3", "u4"]  # shard order, u1 dropped
    assert part.column("sha256").to_pylist() == [f"{p:064x}" for p in (0, 3, 4)]  # every column carried
    skipped = read_skipped(store, skipped_url(directory, part_name(0))).to_pylist()
    assert [(r["key"], r["reason"]) for r in skipped] == [("k001", "duplicate_uid"), ("k002", "missing_caption")]
    assert not writer.complete and not writer.partial  # nothing held after the commit
    # every uid of the shard is now seen (the one dropped too): a later shard's u0 is a duplicate
    assert registry.check_and_add(uid_hashes(["u0", "u9"])).tolist() == [True, False]


def test_a_lost_writer_fails_every_later_uid_check_so_no_later_part_commits(ray_local):
    """A writer lost with its node: the registry never gets that shard's uids (its hashes never
    arrive), so a later shard checked anyway would keep a uid the lost shard holds and a rerun
    would commit it twice. Every later check must fail instead (the cluster test losing a worker
    during embed caught the duplicate)."""
    import ray
    from ray.exceptions import RayError

    from pipeline.embed.parts import ShardedUidRegistry

    @ray.remote(max_retries=0)
    def hashes_of_a_lost_writer():
        raise RuntimeError("the writer's node died")

    registry = ShardedUidRegistry(2)
    try:
        first = registry.check_and_add_refs(uid_hashes(["u0", "u1"]))
        assert not np.any(np.logical_or(*ray.get(first)))
        registry.check_and_add_refs(hashes_of_a_lost_writer.remote())
        later = registry.check_and_add_refs(uid_hashes(["u1", "u2"]))  # u1: seen in the first shard
        with pytest.raises(RayError, match="node died"):
            ray.get(later)
        with pytest.raises(RayError):  # and every one after it
            ray.get(registry.check_and_add_refs(uid_hashes(["u3"])))
    finally:
        registry.close()
