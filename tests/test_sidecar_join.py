"""The precomputed join reads img2dataset's sidecar NNNNNNNN.parquet (status 'success' rows,
checked against NNNNNNNN_stats.json 'successes') instead of the tar: the same parts byte for byte;
a shard whose sidecar is missing or disagrees with its stats is read from its tar; a sidecar that
names other uids than its tar with the right count cannot be seen without the tar, and the write
stage, which reads the tar, fails naming the shard."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.job import run_one
from pipeline.storage import Store, join
from pipeline.testing import make_config, write_datacomp_pool
from pipeline.workdir import stage_dir


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_datacomp_pool(str(tmp_path_factory.mktemp("datacomp")), n_shards=3, per_shard=20, n_metadata_files=2)


def _config(tmp_path, pool, shards_dir, name, **precomputed):
    return make_config(str(tmp_path / name), join(shards_dir, "{00000000..00000002}.tar"), embed={
        "encoder": "precomputed", "precomputed": {"metadata": pool.metadata_dir, "bucket_rows": 25, **precomputed}},
        select={"prune_rate": 0.0})


def _embed_files(store, cfg):
    directory = stage_dir(cfg.workdir, "embed")
    names = [n for n in store.ls(directory) if n.startswith("part-")]
    names += ["_skipped/" + n for n in store.ls(join(directory, "_skipped"))]
    return {n: store.read_bytes(join(directory, n)) for n in sorted(names)}


@pytest.mark.slow
def test_sidecar_join_equals_the_tar_join_and_falls_back_to_the_tar(ray_local, pool, tmp_path):
    store = Store()
    shards = str(tmp_path / "shards")
    shutil.copytree(pool.shards_dir, shards)
    tars = _config(tmp_path, pool, shards, "tars", use_sidecar=False)
    stats = run_one(tars, store, "embed")
    assert stats["shards_read_from"] == {"sidecar": 0, "tar": 3}
    sidecar = _config(tmp_path, pool, shards, "sidecar")
    stats = run_one(sidecar, store, "embed")
    assert stats["shards_read_from"] == {"sidecar": 3, "tar": 0}
    reference = _embed_files(store, tars)
    assert len(reference) == 9 and _embed_files(store, sidecar) == reference  # parts, stats, skip records
    # the sidecars are a few KB against the tars' every image byte
    assert stats["join"]["bytes_read"]["shards"] < sum(store.size(u) for u in pool.shards) / 3

    # shard 0 without its parquet, shard 1's parquet one success row short of its stats: both read
    # from their tars, with the same parts
    store.rm(join(shards, "00000000.parquet"))
    table = store.read_parquet(join(shards, "00000001.parquet"))
    success = table.filter(pc.equal(table.column("status"), "success"))
    store.write_parquet(join(shards, "00000001.parquet"), success.slice(0, success.num_rows - 1))
    fallback = _config(tmp_path, pool, shards, "fallback")
    stats = run_one(fallback, store, "embed")
    assert stats["shards_read_from"] == {"sidecar": 1, "tar": 2}
    problems = stats["sidecar_problems"]
    assert len(problems) == 2 and "00000000.parquet" in problems[0]
    assert f"has {success.num_rows - 1} success rows" in problems[1] and "successes=" in problems[1]
    assert _embed_files(store, fallback) == reference


@pytest.mark.slow
def test_a_sidecar_naming_other_uids_fails_the_write_stage_naming_the_shard(ray_local, pool, tmp_path):
    store = Store()
    edited = str(tmp_path / "edited_shards")
    shutil.copytree(pool.shards_dir, edited)
    url = join(edited, "00000002.parquet")
    table = store.read_parquet(url).to_pydict()
    row = table["status"].index("success")
    # the uid of a failed download (in the metadata, in no tar) in place of the tar's own
    table["uid"][row] = next(u for u, st in zip(table["uid"], table["status"]) if st != "success")
    store.write_parquet(url, pa.Table.from_pydict(table))
    cfg = _config(tmp_path, pool, edited, "edited")
    for stage in ("embed", "graph", "select"):
        run_one(cfg, store, stage)
    with pytest.raises(RuntimeError, match=r"not in their input shards \[.*00000002.tar'\].*use_sidecar: false"):
        run_one(cfg, store, "write")
