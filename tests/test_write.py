"""The write stage (pipeline/write/) on a small hand-made pool and selection.

The pool's tar members are random bytes (the stage never decodes them: it must copy them), the
embedding parts hold only what the stage reads (uid, shard, key, clip_score), and the selection
is written directly, so these tests isolate the write stage. The end-to-end tests in test_job.py
and test_datacomp.py run it after the real stages, through S3.

(The output metadata's caption column is called ``text``, as img2dataset and DataComp name it.)
"""

import io
import json
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
from pipeline.write import plan as write_plan


def run_write_stage(cfg, store, hooks=None):
    """The write stage through the job runner (skip / require / claim / run / commit)."""
    return run_one(cfg, store, "write", hooks)

pytestmark = pytest.mark.slow  # Ray Data



def make_pool(tmp_path, n_shards=3, per_shard=20, seed=0):
    """Tar shards of samples (jpg + txt + json, one sample with an extra member; in shard 1 the last
    sample repeats the key of the first, as a pool may) and their parts."""
    rng = np.random.default_rng(seed)
    pool = tmp_path / "pool"
    pool.mkdir()
    samples = {}
    rows = []
    for s in range(n_shards):
        url = str(pool / f"{s:05d}.tar")
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                key = f"{i:09d}" if not (s == 1 and i == per_shard - 1) else f"{0:09d}"  # keys repeat across shards
                uid = f"{rng.integers(0, 2**62):016x}{s:08x}{i:08x}"
                meta = {"uid": uid, "url": f"https://example.com/{s}/{i}.jpg", "original_width": 300 + i,
                        "original_height": 200 + s, "sha256": f"{i:064x}"}
                if i == 5:
                    meta = {"uid": uid}  # a json without the img2dataset fields
                members = [("jpg", rng.bytes(int(rng.integers(50, 400)))),
                           ("txt", f"caption {s}/{i} ü".encode()),
                           ("json", json.dumps(meta).encode())]
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
    assert sorted(os.listdir(out)) == sorted([f"{i:05d}{e}" for i in range(4) for e in (".parquet", ".tar", "_stats.json")]
                                             + ["sizes.json"])
    seen = []
    source_order = {r[1]: (r[0], rows.index(r)) for r in rows}
    rank = {u: i for i, u in enumerate(chosen)}
    sizes = json.loads((out / "sizes.json").read_text())
    for i in range(4):
        members = read_tar(out / f"{i:05d}.tar")
        meta = store.read_parquet(str(out / f"{i:05d}.parquet")).to_pydict()
        assert list(meta) == ["uid", "key", "text", "url", "original_width", "original_height", "sha256", "clip_score",
                              "rank", "source_shard", "source_key"]
        assert list(members) == meta["key"] == meta["uid"]  # hex uids are the keys
        assert len(meta["uid"]) == (7 if i < 3 else 3)
        # img2dataset's per-shard stats: what DataComp's resharder reads to size a shard
        assert json.loads((out / f"{i:05d}_stats.json").read_text())["successes"] == len(meta["uid"])
        assert sizes[f"{i:05d}.tar"] == len(meta["uid"])
        for j, uid in enumerate(meta["uid"]):
            assert members[uid] == samples[uid]  # every member, byte for byte
            source = json.loads(samples[uid]["json"])
            assert meta["text"][j] == samples[uid]["txt"].decode() and meta["rank"][j] == rank[uid]
            assert [meta[c][j] for c in ("url", "original_width", "original_height", "sha256")] == \
                [source.get(c) for c in ("url", "original_width", "original_height", "sha256")]  # None where absent
            row = rows[source_order[uid][1]]
            assert (meta["source_shard"][j], meta["source_key"][j]) == (row[2], row[3])
        seen += meta["uid"]
    assert sorted(seen) == sorted(chosen)
    assert [source_order[u] for u in seen] == sorted(source_order[u] for u in seen)  # source order
    assert store.read_json(str(tmp_path / "out" / "_stats.json"))["integrity"].startswith("ok")
    assert is_committed(store, cfg, "write")


def test_samples_are_found_by_uid_when_a_key_repeats_in_a_shard(tmp_path, ray_local):
    cfg, store, samples, _, rows = make_job(tmp_path, select_fraction=1.0, samples_per_shard=100)
    repeated = [r for r in rows if r[0] == 1 and r[3] == f"{0:09d}"]
    assert len(repeated) == 2  # two different samples under one key in one shard
    run_write_stage(cfg, store)
    members = read_tar(tmp_path / "out" / "shards" / "00000.tar")
    for _, uid, _, _, _ in repeated:
        assert members[uid] == samples[uid]


def test_plan_is_built_by_tasks_over_several_buckets_and_part_groups(tmp_path, ray_local, monkeypatch):
    """Small buckets and groups: the same output as one bucket and one group."""
    cfg, store, _, chosen, _ = make_job(tmp_path)
    run_write_stage(cfg, store)
    plan = store.read_json(str(tmp_path / "work" / "write" / "plan.json"))
    assert plan["buckets"] == 1 and plan["samples"] == len(chosen)
    monkeypatch.setattr(write_plan, "POOL_ROWS_PER_BUCKET", 7)
    monkeypatch.setattr(write_plan, "PARTS_PER_TASK", 1)
    other = config_from_dict({**cfg.model_dump(), "workdir": str(tmp_path / "work2"),
                              "output": {"url": str(tmp_path / "out2"), "samples_per_shard": 7}})
    for stage in ("embed", "select"):
        src, dst = workdir.stage_dir(cfg.workdir, stage), workdir.stage_dir(other.workdir, stage)
        for name in store.ls(src):
            if not name.startswith("_"):
                store.write_bytes(join(dst, name), store.read_bytes(join(src, name)))
    for stage, stats in (("embed", {}), ("graph", {}), ("select", {})):
        commit_stage(store, other, stage, stats)
    run_write_stage(other, store)
    assert store.read_json(str(tmp_path / "work2" / "write" / "plan.json"))["buckets"] == 9
    for name in sorted(os.listdir(tmp_path / "out" / "shards")):
        assert (tmp_path / "out" / "shards" / name).read_bytes() == (tmp_path / "out2" / "shards" / name).read_bytes()


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


def test_integrity_check_names_missing_extra_and_repeated_uids(tmp_path, ray_local):
    cfg, store, samples, chosen, _ = make_job(tmp_path)
    run_write_stage(cfg, store)
    out = tmp_path / "out" / "shards"
    store.rm(str(tmp_path / "work" / "write" / "_SUCCESS.json"))  # the next run checks the output again
    meta_url = str(out / "00003.parquet")
    meta = store.read_parquet(meta_url)
    lost = meta.column("uid")[0].as_py()
    first = store.read_parquet(str(out / "00000.parquet")).slice(0, 1)
    # a sample of shard 0 also in shard 3, a planned sample of shard 3 gone, one written twice
    store.write_parquet(meta_url, pa.concat_tables([meta.slice(1), first, meta.slice(1, 1)]))
    with pytest.raises(RuntimeError) as failed:
        run_write_stage(cfg, store)
    message = str(failed.value)
    assert "shard 00003" in message and f"missing 1 ['{lost}']" in message
    assert f"extra 1 ['{first.column('uid')[0].as_py()}']" in message
    assert f"written twice 1 ['{meta.column('uid')[1].as_py()}']" in message
    assert "00003_stats.json says 3 samples, the metadata has 4" in message
