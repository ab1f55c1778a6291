"""The write stage (pipeline/write/) on a small hand-made pool and selection.

The pool's tar members are random bytes (the stage never decodes them: it must copy them), the
embedding parts hold only what the stage reads (uid, shard, key, clip_score), and the selection
is written directly, so these tests isolate the write stage. The end-to-end tests in test_job.py
run it after the real stages, through S3.
"""

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from pipeline import workdir
from pipeline.config import config_from_dict
from pipeline.formats.selection import selected_table
from pipeline.job import run_one
from pipeline.stage import Hooks
from pipeline.storage import Store, join
from pipeline.testing import FailAtShard, commit_stage, is_committed
from pipeline.write.stage import check_output


def run_write_stage(cfg, store, hooks=None):
    """The write stage through the job runner (skip / require / claim / run / commit)."""
    return run_one(cfg, store, "write", hooks)

pytestmark = pytest.mark.slow  # Ray Data



def make_pool(tmp_path, n_shards=3, per_shard=20, seed=0):
    """Tar shards of samples (jpg + txt + json, one sample with an extra member) and their parts."""
    rng = np.random.default_rng(seed)
    pool = tmp_path / "pool"
    pool.mkdir()
    samples = {}
    rows = []
    for s in range(n_shards):
        url = str(pool / f"{s:05d}.tar")
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                key = f"{i:09d}"  # keys repeat across shards, as in real pools
                uid = f"{rng.integers(0, 2**62):016x}{s:08x}{i:08x}"
                members = [("jpg", rng.bytes(int(rng.integers(50, 400)))),
                           ("txt", f"caption {s}/{i} ü".encode()),
                           ("json", f'{{"uid": "{uid}"}}'.encode())]
                if i == 3:
                    members.append(("seg.png", rng.bytes(64)))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples[uid] = dict(members)
                rows.append((s, uid, url, key, float(rng.uniform(0, 0.4))))
    return pool, samples, rows


def make_job(tmp_path, select_fraction=0.4, samples_per_shard=7, seed=0):
    pool, samples, rows = make_pool(tmp_path, seed=seed)
    cfg = config_from_dict({
        "workdir": str(tmp_path / "work"),
        "input": {"shards": str(pool / "{00000..00002}.tar")},
        "output": {"url": str(tmp_path / "out"), "samples_per_shard": samples_per_shard},
        "ray": {"num_cpus": 2},
    })
    store = Store()
    emb_dir = workdir.stage_dir(cfg.workdir, "embed")
    for s in range(3):
        part = [r for r in rows if r[0] == s]
        store.write_parquet(join(emb_dir, f"part-{s:05d}.parquet"), pa.table({
            "uid": [r[1] for r in part], "shard": [r[2] for r in part], "key": [r[3] for r in part],
            "clip_score": pa.array([r[4] for r in part], pa.float32())}))
    commit_stage(store, cfg, "embed", {"samples": len(rows), "skipped": {}})
    commit_stage(store, cfg, "graph", {})
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(rows))
    budget = int(select_fraction * len(rows))
    chosen = [rows[i][1] for i in order[:budget]]
    # ranked beyond the budget too (as select.keep_rates leaves it): the write stage takes `selected`
    ranked = chosen + [rows[i][1] for i in order[budget:budget + 5]]
    store.write_parquet(join(workdir.stage_dir(cfg.workdir, "select"), "selected.parquet"),
                        selected_table(ranked, 0, np.ones(len(ranked)), np.ones(len(ranked)),
                                       np.full(len(ranked), -1), budget))
    commit_stage(store, cfg, "select", {"selected": len(chosen)})
    return cfg, store, samples, chosen, rows


def read_tar(path):
    out = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def snapshot(directory):
    return {name: (os.path.getmtime(os.path.join(directory, name)), open(os.path.join(directory, name), "rb").read())
            for name in sorted(os.listdir(directory))}


def test_writes_original_bytes_metadata_and_stats(tmp_path, ray_local):
    cfg, store, samples, chosen, rows = make_job(tmp_path)
    stats = run_write_stage(cfg, store)
    out = tmp_path / "out" / "shards"
    assert stats["samples_written"] == len(chosen) == 24 and stats["output_shards"] == 4
    assert sorted(os.listdir(out)) == [f"{i:05d}.{e}" for i in range(4) for e in ("parquet", "tar")]
    seen = []
    source_order = {r[1]: (r[0], int(r[3])) for r in rows}
    rank = {u: i for i, u in enumerate(chosen)}
    for i in range(4):
        members = read_tar(out / f"{i:05d}.tar")
        meta = store.read_parquet(str(out / f"{i:05d}.parquet")).to_pydict()
        assert list(members) == meta["key"] == meta["uid"]  # hex uids are the keys
        assert len(meta["uid"]) == (7 if i < 3 else 3)
        for uid, caption, score, r, src, key in zip(meta["uid"], meta["caption"], meta["clip_score"],
                                                    meta["rank"], meta["source_shard"], meta["source_key"]):
            assert members[uid] == samples[uid]  # every member, byte for byte
            assert caption == samples[uid]["txt"].decode() and r == rank[uid]
            assert (src, key) == (str(tmp_path / "pool" / f"{source_order[uid][0]:05d}.tar"), f"{source_order[uid][1]:09d}")
        seen += meta["uid"]
    assert sorted(seen) == sorted(chosen)
    assert [source_order[u] for u in seen] == sorted(source_order[u] for u in seen)  # source order
    assert store.read_json(str(tmp_path / "out" / "_stats.json"))["integrity"].startswith("ok")
    assert is_committed(store, cfg, "write")


def test_output_readable_by_webdataset_and_ray_data(tmp_path, ray_local):
    import ray
    import webdataset as wds

    cfg, store, samples, chosen, _ = make_job(tmp_path)
    run_write_stage(cfg, store)
    urls = [str(tmp_path / "out" / "shards" / f"{i:05d}.tar") for i in range(4)]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(got) == sorted(chosen)
    for uid, sample in got.items():
        assert sample["jpg"] == samples[uid]["jpg"] and sample["json"] == samples[uid]["json"]
    rows = ray.data.read_webdataset(urls, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(chosen)
    for r in rows:
        assert r["jpg"] == samples[r["__key__"]]["jpg"]


def test_resume_after_failure_inside_the_stage_rewrites_nothing_committed(tmp_path, ray_local, monkeypatch):
    cfg, store, samples, chosen, _ = make_job(tmp_path)
    with pytest.raises(Exception, match="injected failure"):
        run_write_stage(cfg, store, Hooks(shard_written=FailAtShard(2)))
    out = tmp_path / "out" / "shards"
    assert not is_committed(store, cfg, "write")
    assert (out / "00002.tar").exists() and not (out / "00002.parquet").exists()  # tar, but no commit
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # no partial files
    before = {n: v for n, v in snapshot(out).items() if n.endswith(".parquet")}
    stats = run_write_stage(cfg, store)
    after = snapshot(out)
    for name, (mtime, data) in before.items():  # committed shards were not rewritten
        assert after[name] == (mtime, data)
    assert stats["shards_reused"] == len(before) and stats["samples_written"] == len(chosen)

    # the same selection written in a fresh place gives the same bytes
    other = config_from_dict({**cfg.model_dump(), "output": {"url": str(tmp_path / "out2"), "samples_per_shard": 7}})
    store.rm(workdir.stage_dir(cfg.workdir, "write"), recursive=True)
    run_write_stage(other, store)
    again = snapshot(tmp_path / "out2" / "shards")
    assert {n: d for n, (_, d) in again.items() if n.endswith(".tar")} == \
           {n: d for n, (_, d) in after.items() if n.endswith(".tar")}


def test_deleted_output_shard_is_rewritten_and_other_jobs_output_refused(tmp_path, ray_local):
    cfg, store, samples, chosen, _ = make_job(tmp_path)
    run_write_stage(cfg, store)
    out = tmp_path / "out" / "shards"
    data = (out / "00001.tar").read_bytes()
    os.remove(out / "00001.tar")
    os.remove(out / "00001.parquet")
    stats = run_write_stage(cfg, store)
    assert stats["shards_written_this_run"] == 1 and (out / "00001.tar").read_bytes() == data
    # another selection into the same output url: refused, not mixed
    changed = config_from_dict({**cfg.model_dump(), "output": {"url": cfg.output.url, "samples_per_shard": 5}})
    with pytest.raises(workdir.StaleStageError):
        run_write_stage(changed, store)


def test_missing_source_sample_is_named(tmp_path, ray_local):
    cfg, store, samples, chosen, rows = make_job(tmp_path, select_fraction=1.0)
    # the pool lost a sample after the embed stage
    victim = rows[5]
    src = victim[2]
    with tarfile.open(src) as tar:
        kept = [(i, tar.extractfile(i).read()) for i in tar if not i.name.startswith(victim[3] + ".")]
    with tarfile.open(src, "w") as tar:
        for info, data in kept:
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(Exception, match=victim[1]):
        run_write_stage(cfg, store)


def test_integrity_check_names_missing_and_extra(tmp_path, ray_local):
    cfg, store, samples, chosen, _ = make_job(tmp_path)
    run_write_stage(cfg, store)
    with pytest.raises(RuntimeError, match=r"missing 1 \['zz'\].*extra .*" + chosen[0][:8]):
        check_output(store, cfg, 4, [u for u in chosen if u != chosen[0]] + ["zz"])
    # a sample written into two shards is named
    meta_url = str(tmp_path / "out" / "shards" / "00003.parquet")
    meta = store.read_parquet(meta_url)
    first = store.read_parquet(str(tmp_path / "out" / "shards" / "00000.parquet")).slice(0, 1)
    store.write_parquet(meta_url, pa.concat_tables([meta, first]))
    with pytest.raises(RuntimeError, match=r"written twice 1 \['" + first.column("uid")[0].as_py()):
        check_output(store, cfg, 4, chosen)
