"""The whole job, end to end, through a real S3 endpoint (moto server on 127.0.0.1) with the tiny
random-weight open_clip model: CLI, resume, stale-config detection, outputs as consumers read them.

One full job runs once per module (fixture ``job``); the other tests fork its work directory on S3
(copying committed stages, as a job killed at that point would have left them) and go on from there.
"""

import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import workdir
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core import d2
from pipeline.errors import exit_code_for, one_line
from pipeline.formats.selection import datacomp_subset
from pipeline.formats.webdataset import iter_shard_samples
from pipeline.job import run_job
from pipeline.stage import Hooks
from pipeline.storage import join
from pipeline.testing import FailAtShard, write_pool

pytestmark = pytest.mark.slow

U16 = np.dtype("u8,u8")  # DataComp resharder's subset dtype
REPO = Path(__file__).resolve().parents[1]


def write_config(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3_server, s3_bucket, s3_store, tiny_model_config, tiny_checkpoint, ray_local):
    """A pool of 4 x 60 samples (with broken ones) on S3, and one full `d2prune run` over it."""
    pool = write_pool(f"{s3_bucket}/e2e/pool", store=s3_store, n_shards=4, per_shard=60, seed=7, broken=True)
    tmp = tmp_path_factory.mktemp("job")
    raw = {
        "workdir": f"{s3_bucket}/e2e/work",
        "seed": 0,
        "storage": {"endpoint_url": s3_server},
        "input": {"shards": f"{s3_bucket}/e2e/pool/{{00000..00003}}.tar", "image_exts": ["jpg", "png"]},
        "embed": {"model": "d2prune-tiny", "model_config_path": tiny_model_config, "pretrained": tiny_checkpoint,
                  "batch_size": 32, "num_actors": 1, "cpus_per_actor": 1, "torch_threads": 1},
        "graph": {"k": 5, "index": "ivfflat", "nlist": 4, "nprobe": 4, "recall_sample": 50, "train_size": 1000},
        "select": {"method": "d2", "prune_rate": 0.7, "partitions": 2},
        "output": {"url": f"{s3_bucket}/e2e/out", "samples_per_shard": 25},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    config = write_config(tmp / "job.yaml", raw)
    return {"pool": pool, "raw": raw, "config": config, "tmp": tmp, "store": s3_store}


@pytest.fixture(scope="module")
def full_run(job):
    assert main(["run", job["config"]]) == 0


def fork_workdir(store, src: str, dst: str, stages: list[str]) -> None:
    """Copy committed stages to another workdir (the state a job killed after them leaves)."""
    for stage in stages:
        name = workdir.STAGE_DIRS[stage]
        for url in store.glob(join(src, name, "**")):
            if store.fs(url).isfile(store.path(url)):
                rel = url[len(src):].lstrip("/")
                store.write_bytes(join(dst, rel), store.read_bytes(url))


def output_samples(store, shards_url):
    """uid -> {ext: bytes} of the written shards, read with webdataset from local copies."""
    import webdataset as wds

    tars = [u for u in store.glob(join(shards_url, "*.tar"))]
    local = []
    for i, url in enumerate(tars):
        path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"d2prune-e2e-{os.getpid()}-{i}.tar"
        path.write_bytes(store.read_bytes(url))
        local.append(str(path))
    out = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
           for s in wds.WebDataset(local, shardshuffle=False)}
    for path in local:
        os.remove(path)
    return out


def test_end_to_end_outputs(job, full_run, capsys):
    store, raw, pool = job["store"], job["raw"], job["pool"]
    cfg = load_config(job["config"])
    selected = store.read_parquet(join(raw["workdir"], "selection", "selected.parquet")).to_pydict()
    n = pool.n_kept
    budget = d2.budget_for(n, 0.7)
    assert len(selected["uid"]) == budget == len(set(selected["uid"]))
    assert set(selected["uid"]) <= set(pool.kept_uids)

    # written shards: original bytes of every member, as webdataset reads them
    originals = {}
    for url in pool.shards:
        for sample in iter_shard_samples(store, url, cfg.input):
            if sample.problem is None:
                originals.setdefault(sample.uid, sample.members)
    written = output_samples(store, join(raw["output"]["url"], "shards"))
    assert sorted(written) == sorted(selected["uid"])
    for uid, members in written.items():
        assert members == originals[uid]

    # the same through Ray Data (S3 via the store's pyarrow filesystem)
    import ray

    shards_url = join(raw["output"]["url"], "shards")
    tars = store.glob(join(shards_url, "*.tar"))
    rows = ray.data.read_webdataset([store.path(u) for u in tars], filesystem=store.pyarrow_fs(tars[0]),
                                    decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(selected["uid"])
    ext_of = {uid: next(e for e in ("jpg", "png") if e in m) for uid, m in originals.items()}
    for r in rows:
        assert r[ext_of[r["__key__"]]] == originals[r["__key__"]][ext_of[r["__key__"]]]

    # per-shard metadata and job stats
    metas = [store.read_parquet(u).to_pydict() for u in store.glob(join(shards_url, "*.parquet"))]
    assert [len(m["uid"]) for m in metas] == [25] * (budget // 25) + ([budget % 25] if budget % 25 else [])
    rank_of = dict(zip(selected["uid"], selected["rank"]))
    for m in metas:
        assert all(rank_of[u] == r for u, r in zip(m["uid"], m["rank"]))
        assert all(c for c in m["text"])
    stats = store.read_json(join(raw["output"]["url"], "_stats.json"))
    assert stats["samples_written"] == budget and stats["integrity"].startswith("ok")

    # subset.npy as DataComp's resharder loads it
    local = job["tmp"] / "subset.npy"
    local.write_bytes(store.read_bytes(join(raw["workdir"], "selection", "subset.npy")))
    subset = np.load(local, mmap_mode="r")
    assert subset.dtype == U16 and len(subset) == budget
    for uid in selected["uid"]:
        key = np.array([divmod(int(uid, 16), 2**64)], U16)[0]
        assert np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left") == 1
    assert np.array_equal(subset, datacomp_subset(selected["uid"]))

    # select stats: partitions, exact (overlap 1 by construction), the per-round record
    sel_stats = store.read_json(join(raw["workdir"], "selection", "_stats.json"))
    assert sel_stats["partitions"] == 2 and sel_stats["overlap_with_exact"] == 1.0
    assert len(sel_stats["bytes_per_round"]) == sel_stats["rounds"] >= 1


def test_rerun_skips_everything_and_summarises(job, full_run, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO)
    assert main(["run", job["config"]]) == 0
    out = capsys.readouterr().out
    pool = job["pool"]
    assert f"samples in : {pool.n_kept + sum(pool.skipped_total.values())}" in out
    assert f"kept       : {d2.budget_for(pool.n_kept, 0.7)}" in out
    for reason, count in pool.skipped_total.items():
        assert f"dropped    : {count} (unreadable: {reason})" in out
    assert "already committed, skipped" in out and "output     : s3://" in out
    # the whole job ends with its report, rebuilt from the committed files on a rerun too
    report = f"{job['raw']['workdir']}/report.html"
    assert f"report     : {report}" in out and job["store"].exists(report)
    assert sum("already committed in" in r.getMessage() for r in caplog.records) == 4


def test_changed_config_is_refused_then_forced(job, full_run, capsys):
    store, raw = job["store"], job["raw"]
    fork = f"{raw['workdir']}-stale"
    fork_workdir(store, raw["workdir"], fork, ["embed", "graph", "select"])
    args = ["run", job["config"], "--set", f"workdir={fork}", "--set", f"output.url={raw['output']['url']}-stale"]
    assert main(args + ["--set", "graph.k=3"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2prune: error:") and "stage 'graph'" in err and "--force-from graph" in err
    # --force-from recomputes that stage and the later ones, with the new settings
    assert main(args + ["--set", "select.prune_rate=0.5", "--force-from", "select"]) == 0
    sel = store.read_parquet(join(fork, "selection", "selected.parquet"))
    assert sel.num_rows == d2.budget_for(job["pool"].n_kept, 0.5)


def test_partitions_1_and_8_equal_d2_select_on_the_job_graph(job, full_run):
    store, raw = job["store"], job["raw"]
    from pipeline.formats.embeddings import list_parts, read_column
    from pipeline.formats.graph import read_graph

    for p in (1, 8):
        fork = f"{raw['workdir']}-p{p}"
        fork_workdir(store, raw["workdir"], fork, ["embed", "graph"])
        assert main(["select", job["config"], "--set", f"workdir={fork}", "--set", f"select.partitions={p}"]) == 0
        # the full run used 2 partitions: every P gives the same files, byte for byte
        for name in ("selected.parquet", "subset.npy"):
            assert store.read_bytes(join(fork, "selection", name)) == \
                store.read_bytes(join(raw["workdir"], "selection", name)), (p, name)
    g = read_graph(store, workdir.stage_dir(fork, "graph"))
    parts, _ = list_parts(store, workdir.stage_dir(fork, "embed"))
    scores = read_column(store, parts, "clip_score").astype(np.float64)
    graph = d2.symmetrize_knn(g["neighbors"], g["sq_distances"])
    expected = d2.d2_select(graph, scores - scores.min(), d2.budget_for(len(scores), 0.7))
    got = store.read_parquet(join(fork, "selection", "selected.parquet")).to_pydict()
    assert got["uid"] == [str(g["uids"][i]) for i in expected.order]
    assert np.array_equal(got["final_score"], expected.final_scores[expected.order])
    stats = store.read_json(join(fork, "selection", "_stats.json"))
    assert stats["partitions"] > 1 and stats["cross_partition_edge_fraction"] > 0


@pytest.mark.parametrize("method", ["random", "score_topk", "ccs", "moderate", "kcenter"])
def test_every_method_selects_and_writes_the_same_budget(job, full_run, method):
    store, raw = job["store"], job["raw"]
    fork = f"{raw['workdir']}-{method}"
    fork_workdir(store, raw["workdir"], fork, ["embed", "graph"])
    out = f"{raw['output']['url']}-{method}"
    assert main(["run", job["config"], "--set", f"workdir={fork}", "--set", f"output.url={out}",
                 "--set", f"select.method={method}"]) == 0
    selected = store.read_parquet(join(fork, "selection", "selected.parquet")).column("uid").to_pylist()
    assert len(selected) == d2.budget_for(job["pool"].n_kept, 0.7) == len(set(selected))
    stats = store.read_json(join(out, "_stats.json"))
    assert stats["samples_written"] == len(selected) and stats["select"]["method"] == method


def test_resume_after_kill_between_stages_gives_the_same_output(job, full_run, capsys):
    store, raw = job["store"], job["raw"]
    fork, out = f"{raw['workdir']}-resume", f"{raw['output']['url']}-resume"
    fork_workdir(store, raw["workdir"], fork, ["embed"])  # killed after the embed stage
    assert main(["run", job["config"], "--set", f"workdir={fork}", "--set", f"output.url={out}"]) == 0
    assert "embed      : 0.0 s (already committed, skipped)" in capsys.readouterr().out
    for name in ("selected.parquet", "subset.npy"):
        assert store.read_bytes(join(fork, "selection", name)) == store.read_bytes(join(raw["workdir"], "selection", name))
    original = sorted(store.glob(join(raw["output"]["url"], "shards", "*.tar")))
    resumed = sorted(store.glob(join(out, "shards", "*.tar")))
    assert len(original) == len(resumed)
    for a, b in zip(original, resumed):
        assert store.read_bytes(a) == store.read_bytes(b)


def test_resume_after_kill_inside_the_write_stage(job, full_run, capsys):
    store, raw = job["store"], job["raw"]
    fork, out = f"{raw['workdir']}-killed", f"{raw['output']['url']}-killed"
    fork_workdir(store, raw["workdir"], fork, ["embed", "graph", "select"])
    overrides = [f"workdir={fork}", f"output.url={out}"]
    # output shard 1 fails after its tar is committed and before its metadata (its commit)
    with pytest.raises(Exception) as failed:
        run_job(job["config"], overrides, hooks=Hooks(shard_written=FailAtShard(1)))
    assert exit_code_for(failed.value) == 1
    assert "injected failure" in one_line(failed.value)
    committed = {u: store.fs(u).info(store.path(u))["LastModified"]
                 for u in store.glob(join(out, "shards", "*.parquet"))}
    assert join(out, "shards", "00001.parquet") not in committed
    args = ["run", job["config"]] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    for url, modified in committed.items():  # nothing committed was written again
        assert store.fs(url).info(store.path(url))["LastModified"] == modified
    original = sorted(store.glob(join(raw["output"]["url"], "shards", "*")))
    resumed = sorted(store.glob(join(out, "shards", "*")))
    assert [u.rsplit("/", 1)[1] for u in original] == [u.rsplit("/", 1)[1] for u in resumed]
    for a, b in zip(original, resumed):
        if a.endswith(".tar"):
            assert store.read_bytes(a) == store.read_bytes(b)
    stats = store.read_json(join(out, "_stats.json"))
    # tasks still in flight when the job failed may have committed their shards since: reused too
    assert stats["shards_reused"] >= len(committed) and stats["samples_written"] == len(
        store.read_parquet(join(fork, "selection", "selected.parquet")))


def test_ray_job_entrypoint_reads_its_config_from_s3(job, full_run, monkeypatch, capsys):
    store, raw = job["store"], job["raw"]
    url = f"{raw['workdir']}-job.yaml"
    store.write_bytes(url, Path(job["config"]).read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", raw["storage"]["endpoint_url"])
    monkeypatch.setattr(sys, "argv", ["filter_pool.py", url])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "jobs" / "filter_pool.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "already committed, skipped" in capsys.readouterr().out
