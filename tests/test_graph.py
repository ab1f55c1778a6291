"""The kNN graph: pure FAISS maths (fast) and the cell-sharded Ray stage (slow, one Ray for the module)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import steps, workdir
from pipeline.config import config_from_dict
from pipeline.core import ivf
from pipeline.core.knn import exact_knn, merge_topk, prepare_vectors, recall_at_k, recall_sample_ids, remove_self
from pipeline.errors import ConfigError, exit_code_for
from pipeline.formats.graph import read_lists
from pipeline.graph import scratch
from pipeline.graph import stage as graph_stage
from pipeline.graph.layout import plan_units
from pipeline.graph.scratch import BlockSchema
from pipeline.job import run_one
from pipeline.stage import Hooks
from pipeline.storage import Store
from pipeline.steps import Resources
from pipeline.testing import StopAfterStep, commit_stage, is_committed


def run_graph_stage(cfg, store):
    """The graph stage through the job runner (skip / require / claim / run / commit)."""
    return run_one(cfg, store, "graph")


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return prepare_vectors(x, None)


# ------------------------------------------------------------------------------------------------
# pure maths
# ------------------------------------------------------------------------------------------------

def test_prepare_vectors_normalises_and_concatenates():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 4)).astype(np.float16)
    txt = 3 * rng.normal(size=(6, 3))
    img[2] = 0
    out = prepare_vectors(img, txt, "image")
    assert out.dtype == np.float32 and out.shape == (6, 4)
    norms = np.linalg.norm(out, axis=1)
    assert np.allclose(np.delete(norms, 2), 1, atol=1e-6) and norms[2] == 0  # zero row stays zero
    both = prepare_vectors(img, txt, "image+text")
    assert both.shape == (6, 7)
    # both halves weigh the same: each half of a row with non-zero image is 1/sqrt(2) long
    assert np.allclose(np.linalg.norm(both[0, :4]), np.linalg.norm(both[0, 4:]), atol=1e-6)
    assert np.allclose(prepare_vectors(None, txt, "text"), txt / np.linalg.norm(txt, axis=1, keepdims=True))


def test_prepare_vectors_errors_name_the_problem():
    bad = np.ones((4, 3))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        prepare_vectors(bad, None, "image")
    with pytest.raises(ValueError, match="needs text"):
        prepare_vectors(bad, None, "image+text")
    with pytest.raises(ValueError, match="graph.vector"):
        prepare_vectors(bad, None, "audio")


# graph.index: flat, as the stage runs it (index_sizes): one list, one probe
FLAT = {"nlist": 1, "nprobe": 1}


def test_flat_index_is_exact_and_puts_everything_in_cell_zero():
    x = clustered(1500, 16, clusters=5, seed=2)
    nb, d, cells = ivf.sharded_knn_graph(x, 5, **FLAT)
    en, ed = exact_knn(x, 5)
    assert np.array_equal(nb, en) and np.allclose(d, ed, atol=1e-5)
    assert (cells == 0).all()
    # exact distances really are squared L2 to the listed neighbour
    rows = np.arange(0, 1500, 97)
    direct = ((x[rows, None, :] - x[nb[rows]]) ** 2).sum(-1)
    assert np.allclose(direct, d[rows], atol=1e-5)


@pytest.mark.parametrize("index", ["flat", "ivfflat"])
def test_self_removed_by_id_with_exact_duplicates(index):
    base = clustered(400, 16, clusters=4, seed=5)
    copies = 4  # each vector 4 times: self ties at distance 0 with 3 duplicates
    x = np.repeat(base, copies, axis=0)
    ids = np.arange(len(x))
    kw = {"nlist": 8, "nprobe": 8} if index != "flat" else FLAT
    nb, d, _ = ivf.sharded_knn_graph(x, copies - 1, **kw)
    assert not (nb == ids[:, None]).any(), "a node listed itself"
    assert (nb >= 0).all()
    # the k = copies-1 nearest others are exactly the node's duplicates
    assert np.array_equal(np.sort(nb // copies, axis=1), np.repeat(ids // copies, copies - 1).reshape(-1, copies - 1))
    assert np.allclose(d, 0, atol=1e-5) and (d >= 0).all()


def test_remove_self_when_self_is_not_first_or_missing():
    neighbors = np.array([[7, 3, 9, 4], [5, 6, 8, 2], [1, -1, -1, -1]])
    dists = np.array([[0.0, 0.0, 0.5, 0.7], [0.1, 0.2, 0.3, 0.4], [-1e-7, np.inf, np.inf, np.inf]], np.float32)
    nb, d = remove_self(neighbors, dists, np.array([3, 0, 2]), 3)
    assert nb.tolist() == [[7, 9, 4], [5, 6, 8], [1, -1, -1]]  # row 1: self absent -> drop the last
    assert d[0].tolist() == pytest.approx([0.0, 0.5, 0.7])
    assert d[2, 0] == 0.0 and np.isinf(d[2, 1:]).all()  # negative rounding clamped; inf padding


def test_padding_when_fewer_than_k_neighbours_exist():
    x = clustered(4, 8, clusters=2, seed=6)
    for kw in (FLAT, {"nlist": 2, "nprobe": 2}):
        nb, d, _ = ivf.sharded_knn_graph(x, 6, **kw)
        assert nb.shape == (4, 6) and d.dtype == np.float32
        assert (nb[:, :3] >= 0).all() and (nb[:, 3:] == -1).all()
        assert np.isfinite(d[:, :3]).all() and np.isinf(d[:, 3:]).all()
    # one probed list with fewer than k+1 members also pads (far clusters, nprobe=1)
    rng = np.random.default_rng(7)
    far = prepare_vectors(np.concatenate([rng.normal(size=(3, 8)) * 0.01 + 5 * np.eye(8)[0],
                                          rng.normal(size=(300, 8)) * 0.01 - 5 * np.eye(8)[0]]), None)
    nb, d, cells = ivf.sharded_knn_graph(far, 4, nlist=2, nprobe=1)
    small = cells == cells[0]
    assert small.sum() == 3
    assert (nb[small][:, 2:] == -1).all() and np.isinf(d[small][:, 2:]).all()


def test_approximate_recall_is_reported_and_sane():
    x = clustered(3000, 32, clusters=30, seed=8)
    en, _ = exact_knn(x, 10)
    nb_full, _, _ = ivf.sharded_knn_graph(x, 10, nlist=40, nprobe=40)
    nb_few, _, _ = ivf.sharded_knn_graph(x, 10, nlist=40, nprobe=2)
    full, few = recall_at_k(nb_full, en), recall_at_k(nb_few, en)
    assert full == 1.0
    assert 0.5 < few < 1.0  # approximate, yet mostly right on clustered data


def test_recall_at_k_counts_ids_and_ignores_padding():
    exact = np.array([[1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    approx = np.array([[3, 9, 1], [5, -1, -1], [7, 8, 9]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(approx[:2], exact)


def test_merge_topk_is_independent_of_block_order():
    rng = np.random.default_rng(10)
    d = [rng.random((5, 4)).astype(np.float32) for _ in range(3)]
    i = [rng.integers(0, 100, (5, 4)) for _ in range(3)]
    d[1][0, 0] = d[0][0, 0]  # a tie, broken by id
    fwd = (d[0], i[0])
    for j in (1, 2):
        fwd = merge_topk(*fwd, d[j], i[j], 4)
    rev = (d[2], i[2])
    for j in (1, 0):
        rev = merge_topk(*rev, d[j], i[j], 4)
    assert np.array_equal(fwd[1], rev[1]) and np.array_equal(fwd[0], rev[0])
    assert (np.diff(fwd[0], axis=1) >= 0).all()


def test_bad_arguments_are_named():
    x = clustered(100, 10, clusters=2, seed=11)
    with pytest.raises(ValueError, match="graph.nlist=500"):
        ivf.sharded_knn_graph(x, 3, nlist=500)
    with pytest.raises(ValueError, match="graph.nprobe=3"):
        ivf.sharded_knn_graph(x, 3, nlist=2, nprobe=3)


# ------------------------------------------------------------------------------------------------
# the stage's plan and scratch files (no Ray)
# ------------------------------------------------------------------------------------------------

def test_units_are_contiguous_runs_of_parts_balanced_by_rows():
    units, starts = plan_units([310, 0, 450, 220, 505, 175], 500)
    assert units == ((0, 2), (2, 3), (3, 4), (4, 5), (5, 6))  # the 505-row part is a unit of its own
    assert starts == (0, 310, 760, 980, 1485, 1660)
    assert plan_units([10] * 6, 10**9) == (((0, 6),), (0, 60))
    assert plan_units([], 5) == ((), (0,))


def test_blocked_scratch_files_read_back_block_by_block(tmp_path):
    store = Store()
    schema = BlockSchema((("id", "<i8", 0), ("raw", "<f2", 3), ("d", "<f4", 2)))
    rng = np.random.default_rng(0)
    blocks = [{"id": np.arange(r, dtype=np.int64) + 100 * b, "raw": rng.normal(size=(r, 3)).astype(np.float16),
               "d": rng.random((r, 2)).astype(np.float32)} for b, r in enumerate([4, 0, 7, 1])]
    urls = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert not scratch.exists(store, urls[0])
    for url in urls:
        assert scratch.write(store, url, schema, iter(blocks)).tolist() == [4, 0, 7, 1]
        assert scratch.exists(store, url)
    assert scratch.block_rows(store, urls[0]).tolist() == [4, 0, 7, 1]
    for b, block in enumerate(blocks):
        one = scratch.read_blocks(store, urls[:1], schema, b)
        both = scratch.read_blocks(store, urls, schema, b)
        for name in ("id", "raw", "d"):
            assert one[name].dtype == block[name].dtype and np.array_equal(one[name], block[name])
            assert np.array_equal(both[name], np.concatenate([block[name], block[name]]))
    with pytest.raises(ValueError, match="raw"):
        scratch.write(store, str(tmp_path / "c"), schema, [{"id": np.zeros(2, np.int64), "raw": np.zeros((2, 4)),
                                                            "d": np.zeros((2, 2))}])


# ------------------------------------------------------------------------------------------------
# the Ray stage: equal bit for bit to ivf.sharded_knn_graph on the same vectors
# ------------------------------------------------------------------------------------------------

PART_ROWS = [310, 0, 450, 220, 505, 175]  # an empty part too: its rows are simply none
DIM = 16
N = sum(PART_ROWS)


def write_embedding_parts(root: str, seed: int = 0, storage=None):
    """Embedding parts in the contract's schema (as the embed stage writes them), committed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, DIM))
    shards = [f"{root}/pool/{i:05d}.tar" for i in range(len(PART_ROWS))]
    cfg = make_cfg(root, shards, storage=storage)
    store = Store(cfg.storage)
    all_img, all_txt, all_uid = [], [], []
    for index, rows in enumerate(PART_ROWS):
        img = (centres[rng.integers(0, 8, rows)] + 0.4 * rng.normal(size=(rows, DIM))).astype(np.float16)
        txt = rng.normal(size=(rows, DIM)).astype(np.float16)
        keys = [f"{index:05d}{r:04d}" for r in range(rows)]
        uids = [hashlib.md5(f"{index:05d}.tar/{k}".encode()).hexdigest() for k in keys]
        table = pa.table({
            "uid": pa.array(uids, pa.string()),
            "shard": pa.array([shards[index]] * rows, pa.string()),
            "key": pa.array(keys, pa.string()),
            "clip_score": pa.array(rng.random(rows).astype(np.float32)),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1), pa.float16()), DIM),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1), pa.float16()), DIM),
        })
        name = workdir.part_name(index)
        emb = workdir.stage_dir(cfg.workdir, "embed")
        store.write_json(f"{emb}/{name}.stats.json", {"shard": shards[index], "samples": rows, "skipped": {}})
        store.write_parquet(f"{emb}/{name}.parquet", table)
        all_img.append(img)
        all_txt.append(txt)
        all_uid.extend(uids)
    commit_stage(store, cfg, "embed", {"samples": N})
    return np.concatenate(all_img), np.concatenate(all_txt), all_uid


GRAPH = {"k": 6, "nlist": 12, "nprobe": 3, "recall_sample": 300, "train_size": 1000, "max_task_rows": 500}


def make_cfg(root: str, shards=None, storage=None, **graph_settings):
    shards = shards or [f"{root}/pool/{i:05d}.tar" for i in range(len(PART_ROWS))]
    return config_from_dict({
        "workdir": f"{root}/work", "seed": 5,
        "input": {"shards": shards},
        "output": {"url": f"{root}/out"},
        "graph": dict(GRAPH, **graph_settings),
        "storage": storage or {},
    })


def reference(vectors, cfg, max_rows_per_group=10**9):
    """The in-process reference on the same prepared vectors and settings."""
    g = cfg.graph
    return ivf.sharded_knn_graph(vectors, g.k, nlist=g.nlist, nprobe=g.nprobe, seed=cfg.seed,
                                 train_size=g.train_size, max_rows_per_group=max_rows_per_group)


def read_graph(cfg):
    store = Store(cfg.storage)
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    return pa.concat_tables([store.read_parquet(f"{gdir}/{workdir.part_name(i)}.parquet")
                             for i in range(len(PART_ROWS))])


def table_arrays(table):
    k = table.schema.field("neighbors").type.list_size
    return (table.column("node").to_numpy(),
            table.column("neighbors").combine_chunks().flatten().to_numpy().reshape(-1, k),
            table.column("sq_distances").combine_chunks().flatten().to_numpy().reshape(-1, k),
            table.column("cell").to_numpy())


def assert_equals_reference(cfg, ref):
    node, nb, d, cells = table_arrays(read_graph(cfg))
    assert node.tolist() == list(range(N))
    for got, want in zip((nb, d, cells), ref):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def graph_files(cfg):
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    return sorted(os.path.relpath(os.path.join(d, f), gdir) for d, _, fs in os.walk(gdir) for f in fs)


@pytest.mark.slow
def test_stage_equals_sharded_reference_bit_for_bit_and_aligns_uids(tmp_path, ray_local):
    img, _, uids = write_embedding_parts(str(tmp_path))
    cfg = make_cfg(str(tmp_path))
    store = Store(cfg.storage)
    stats = run_graph_stage(cfg, store)
    assert is_committed(store, cfg, "graph")
    assert stats["n_nodes"] == N and stats["k"] == 6 and stats["nlist"] == 12 and stats["nprobe"] == 3
    assert stats["parts_searched"] == len(PART_ROWS) and stats["units"] > 1 and stats["groups"] > 1
    assert stats["steps_run"] == ["train", "assign", "group", "shuffle", "search", "merge", "nodes"]
    assert stats["train"]["coarse_cells"] == ivf.coarse_count(12) and stats["train"]["fine_sample"] == 1000
    assert stats["recall_sample"] == 300 and 0.5 < stats["recall_at_k"] <= 1.0

    nodes = pq.read_table(f"{workdir.stage_dir(cfg.workdir, 'graph')}/nodes.parquet")
    assert nodes.column("node").to_pylist() == list(range(N))
    assert nodes.column("uid").to_pylist() == uids  # sorted part order, rows in order
    expected_parts = [workdir.part_name(i) for i, rows in enumerate(PART_ROWS) for _ in range(rows)]
    assert nodes.column("part").to_pylist() == expected_parts

    table = read_graph(cfg)
    assert table.schema.field("neighbors").type == pa.list_(pa.int64(), 6)
    assert table.schema.field("sq_distances").type == pa.list_(pa.float32(), 6)
    assert table.schema.field("cell").type == pa.int32()
    x = prepare_vectors(img, None, "image")
    ref = reference(x, cfg)
    assert_equals_reference(cfg, ref)
    nb, d, cells = ref
    # lists.parquet: every list's node count, coarse cell and search group
    lists = read_lists(store, workdir.stage_dir(cfg.workdir, "graph"))
    assert lists["nodes"].tolist() == np.bincount(cells, minlength=12).tolist()
    assert (np.diff(lists["coarse_cell"]) >= 0).all() and lists["coarse_cell"].max() + 1 == ivf.coarse_count(12)
    assert lists["group"].max() + 1 == stats["groups"] and (np.diff(lists["group"]) >= 0).all()
    # the reported recall is the recall of the written graph on its seeded sample
    sample = recall_sample_ids(N, 300, 5)
    en, _ = exact_knn(x, 6, sample)
    assert stats["recall_at_k"] == pytest.approx(recall_at_k(nb[sample], en))
    # ids line up with uids: distances recomputed from the vectors looked up BY UID
    by_uid = dict(zip(uids, x))
    node_uid = nodes.column("uid").to_pylist()
    for i in np.random.default_rng(0).choice(N, 40, replace=False):
        for j, dist in zip(nb[i], d[i]):
            assert dist == pytest.approx(float(((by_uid[node_uid[i]] - by_uid[node_uid[j]]) ** 2).sum()), abs=1e-5)
    # the scratch is gone; the plan, centroids and groups stay (small)
    files = graph_files(cfg)
    assert not [f for f in files if f.split("/")[0] in ("train", "assign", "buckets", "candidates")]
    assert {"index/plan.json", "index/centroids.npz", "index/groups.npz", "lists.parquet"} <= set(files)
    # committed: a rerun is skipped and returns the stored stats
    assert run_graph_stage(cfg, store) == stats


@pytest.mark.slow
@pytest.mark.parametrize("max_task_rows, search_cpus, groups", [(10**9, 2, "one"), (2000, 1, "few"), (200, 1, "per list")])
def test_stage_is_the_same_graph_for_any_group_bound_and_respects_it(tmp_path, ray_local, monkeypatch,
                                                                      max_task_rows, search_cpus, groups):
    """One group (one search task with 2 FAISS threads), a few, one list per group: the same bytes;
    every group's rows (base vectors + probe pairs) within graph.max_task_rows unless a single list
    is larger."""
    img, _, _ = write_embedding_parts(str(tmp_path), seed=6)
    cfg = make_cfg(str(tmp_path), max_task_rows=max_task_rows)
    monkeypatch.setattr(graph_stage, "SEARCH_TASK", Resources(cpus=search_cpus))  # one slot: no split for parallelism
    stats = run_graph_stage(cfg, Store(cfg.storage))
    assert_equals_reference(cfg, reference(prepare_vectors(img, None, "image"), cfg))
    assert {"one": stats["groups"] == 1, "few": 1 < stats["groups"] < 12, "per list": stats["groups"] == 12}[groups]
    assert stats["max_task_rows"] == max_task_rows and stats["group_bound"] <= max_task_rows
    over = stats["groups_over_bound"]
    assert stats["group_rows_max"] <= stats["group_bound"] or over > 0
    assert (over > 0) == (groups == "per list")  # 200 rows is less than one list's 140 nodes + 415 probes
    assert stats["search"]["tasks"] == stats["groups"] and stats["search"]["worker_peak_rss_mb"] > 0
    assert stats["groups_per_query"] >= 1.0


@pytest.mark.slow
def test_stage_image_text_vectors_and_flat_exact(tmp_path, ray_local):
    img, txt, _ = write_embedding_parts(str(tmp_path / "a"), seed=3)
    cfg = make_cfg(str(tmp_path / "a"), vector="image+text", nprobe=5, k=4)
    stats = run_graph_stage(cfg, Store(cfg.storage))
    assert stats["dim"] == 2 * DIM
    assert_equals_reference(cfg, reference(prepare_vectors(img, txt, "image+text"), cfg))

    write_embedding_parts(str(tmp_path / "b"), seed=3)
    cfg = make_cfg(str(tmp_path / "b"), index="flat", nlist=None, max_task_rows=10**6)
    stats = run_graph_stage(cfg, Store(cfg.storage))
    assert stats["nlist"] == 1 and stats["nprobe"] == 1 and stats["groups"] == 1 and stats["recall_at_k"] == 1.0
    _, nb, d, cells = table_arrays(read_graph(cfg))
    en, ed = exact_knn(prepare_vectors(img, None, "image"), 6)
    assert (cells == 0).all() and np.array_equal(nb, en) and np.allclose(d, ed, atol=1e-5)


STEPS = ["train", "assign", "group", "shuffle", "search", "merge"]


@pytest.mark.slow
def test_stage_killed_after_each_step_resumes_with_only_the_missing_work(tmp_path, ray_local):
    img, _, _ = write_embedding_parts(str(tmp_path / "clean"), seed=1)
    clean = make_cfg(str(tmp_path / "clean"))
    run_graph_stage(clean, Store(clean.storage))
    expected = read_graph(clean)
    assert_equals_reference(clean, reference(prepare_vectors(img, None, "image"), clean))

    write_embedding_parts(str(tmp_path / "killed"), seed=1)
    cfg = make_cfg(str(tmp_path / "killed"))
    store = Store(cfg.storage)
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    for step in STEPS:  # each run stops right after `step`; the next one resumes from there
        stop = StopAfterStep("graph", step)
        with pytest.raises(KeyboardInterrupt):
            run_one(cfg, store, "graph", Hooks(step_done=stop))
        assert stop.seen == [step]  # the steps committed before were not run again
        assert not is_committed(store, cfg, "graph")
        if step == "train":
            centroids = os.stat(f"{gdir}/index/centroids.npz").st_mtime_ns
    stats = run_graph_stage(cfg, store)
    assert stats["steps_run"] == ["nodes"] or stats["steps_run"] == []  # the merge committed every part
    assert os.stat(f"{gdir}/index/centroids.npz").st_mtime_ns == centroids  # trained once
    assert read_graph(cfg).equals(expected)

    # a part lost after the commit: its unit is merged again from recomputed scratch (same bytes)
    os.remove(f"{gdir}/{workdir.part_name(3)}.parquet")
    os.remove(f"{gdir}/{workdir.SUCCESS}")
    mtimes = {i: os.stat(f"{gdir}/{workdir.part_name(i)}.parquet").st_mtime_ns for i in range(len(PART_ROWS)) if i != 3}
    stats = run_graph_stage(cfg, store)
    assert stats["parts_searched"] == 1 and stats["rows_searched"] == PART_ROWS[3]
    assert "train" not in stats["steps_run"] and "group" not in stats["steps_run"]  # centroids and groups reused
    assert stats["tasks_run"]["merge"] == 1
    assert read_graph(cfg).equals(expected)
    assert all(os.stat(f"{gdir}/{workdir.part_name(i)}.parquet").st_mtime_ns == t for i, t in mtimes.items())


@pytest.mark.slow
def test_stage_resume_redoes_only_missing_scratch_and_regroups_when_the_bound_changes(tmp_path, ray_local):
    write_embedding_parts(str(tmp_path / "clean"), seed=7)
    clean = make_cfg(str(tmp_path / "clean"))
    run_graph_stage(clean, Store(clean.storage))
    expected = read_graph(clean)

    write_embedding_parts(str(tmp_path / "w"), seed=7)
    cfg = make_cfg(str(tmp_path / "w"))
    store = Store(cfg.storage)
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, store, "graph", Hooks(step_done=StopAfterStep("graph", "search")))
    # a killed shuffle and search left one unit's buckets and one group's candidates unwritten
    for name in ("buckets/wave-000/query-00001.idx", "candidates/group-00002.idx", "train/fine-00000.npz"):
        os.remove(f"{gdir}/{name}")
    stats = run_graph_stage(cfg, store)
    assert stats["tasks_run"]["shuffle"] == 1 and "assign" not in stats["tasks_run"] and "train" not in stats["tasks_run"]
    assert stats["tasks_run"]["search"] == 1  # a unit's buckets are rewritten with the same bytes
    assert read_graph(cfg).equals(expected)

    # a lower bound on resume (tasks ran out of memory): the search is regrouped, the graph is the same
    for i in (0, 4):
        os.remove(f"{gdir}/{workdir.part_name(i)}.parquet")
    os.remove(f"{gdir}/{workdir.SUCCESS}")
    smaller = make_cfg(str(tmp_path / "w"), max_task_rows=300)
    stats = run_graph_stage(smaller, Store(smaller.storage))
    assert "group" in stats["steps_run"] and stats["max_task_rows"] == 300 and stats["parts_searched"] == 2
    assert read_graph(smaller).equals(expected)


class WaveWatch:
    """A stage hook: the shuffle files on disk after each wave's shuffle (bytes, wave folders); with
    `stop_at_search`, stops the stage after that many waves were searched (a killed job)."""

    def __init__(self, gdir: str, stop_at_search: int | None = None):
        self.gdir, self.stop_at_search = gdir, stop_at_search
        self.after_shuffle: list[tuple[int, list[str]]] = []
        self.searched = 0

    def __call__(self, stage: str, step: str) -> None:
        buckets = os.path.join(self.gdir, "buckets")
        if step == "shuffle":
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(buckets) for f in fs)
            self.after_shuffle.append((size, sorted(os.listdir(buckets))))
        if step == "search":
            self.searched += 1
            if self.searched == self.stop_at_search:
                raise KeyboardInterrupt(f"stopped after wave {self.searched}'s search")


@pytest.mark.slow
def test_stage_in_waves_under_the_scratch_bound_is_the_same_graph_and_resumes_wave_by_wave(tmp_path, ray_local):
    """The search cut into waves by graph.scratch_gb: the same bytes as one wave; the shuffle files on
    disk at any time are one wave's, within the bound; a job killed between waves resumes with the
    waves not searched; a lower bound on resume recuts the waves and keeps the searched groups."""
    write_embedding_parts(str(tmp_path / "one"), seed=4)
    one = make_cfg(str(tmp_path / "one"), max_task_rows=300)
    stats_one = run_graph_stage(one, Store(one.storage))
    expected = read_graph(one)
    assert stats_one["waves"] == 1 and stats_one["groups"] >= 6
    assert json.load(open(f"{workdir.stage_dir(one.workdir, 'graph')}/index/plan.json"))["raw_copy"] is True

    write_embedding_parts(str(tmp_path / "w"), seed=4)
    bound = stats_one["search"]["shuffled_bytes"] // 4  # bytes: four or more waves
    cfg = make_cfg(str(tmp_path / "w"), max_task_rows=300, scratch_gb=bound / 2**30)
    store = Store(cfg.storage)
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    watch = WaveWatch(gdir, stop_at_search=2)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, store, "graph", Hooks(step_done=watch))
    assert [folders for _, folders in watch.after_shuffle] == [["wave-000"], ["wave-001"]]  # the last one removed
    assert all(size <= bound for size, _ in watch.after_shuffle)
    # a copy of the raw rows would take more than half the bound: every wave decodes the parts again
    assert json.load(open(f"{gdir}/index/plan.json"))["raw_copy"] is False
    starts = np.load(f"{gdir}/index/waves.npz")["starts"]
    assert len(starts) - 1 >= 4 and starts[0] == 0 and starts[-1] == stats_one["groups"]
    searched = sorted(int(f[6:11]) for f in os.listdir(f"{gdir}/candidates") if f.endswith(".idx"))
    assert searched == list(range(int(starts[2])))  # the first two waves' groups, nothing else

    lower = make_cfg(str(tmp_path / "w"), max_task_rows=300, scratch_gb=bound / 3 / 2**30)
    watch = WaveWatch(gdir)
    stats = run_one(lower, store, "graph", Hooks(step_done=watch))
    assert "assign" not in stats["steps_run"] and "train" not in stats["steps_run"]
    assert stats["tasks_run"]["search"] == stats_one["groups"] - int(starts[2])  # searched groups stay searched
    assert stats["waves"] > len(starts) - 1 and stats["scratch_gb"] == lower.graph.scratch_gb
    recut = np.load(f"{gdir}/index/waves.npz")["starts"]
    shuffled = [(a, b) for a, b in zip(recut[:-1], recut[1:]) if b > starts[2]]  # waves with groups to search
    assert len(watch.after_shuffle) == len(shuffled)
    for (size, folders), (a, b) in zip(watch.after_shuffle, shuffled):
        assert len(folders) == 1 and (size <= bound / 3 or b - a == 1)  # a group larger than the bound: alone
    assert read_graph(lower).equals(expected)
    assert stats["groups_per_query"] is None or stats["groups_per_query"] >= 1.0
    assert not os.path.exists(f"{gdir}/buckets") or not os.listdir(f"{gdir}/buckets")


@pytest.mark.slow
def test_stage_shuffled_completion_order_gives_the_same_graph(tmp_path, ray_local, monkeypatch):
    _, _, uids = write_embedding_parts(str(tmp_path / "a"), seed=2)
    write_embedding_parts(str(tmp_path / "b"), seed=2)
    cfg_a, cfg_b = make_cfg(str(tmp_path / "a")), make_cfg(str(tmp_path / "b"))
    stats_a = run_graph_stage(cfg_a, Store(cfg_a.storage))

    import ray

    def shuffled(refs):
        results = ray.get(list(refs))
        for j in np.random.default_rng(3).permutation(len(results))[::-1]:
            yield results[j]

    monkeypatch.setattr(steps, "as_completed", shuffled)  # every step of the stage completes out of order
    stats_b = run_graph_stage(cfg_b, Store(cfg_b.storage))
    assert read_graph(cfg_b).equals(read_graph(cfg_a))
    assert stats_b["recall_at_k"] == stats_a["recall_at_k"]
    nodes = pq.read_table(f"{workdir.stage_dir(cfg_b.workdir, 'graph')}/nodes.parquet")
    assert nodes.column("uid").to_pylist() == uids


@pytest.mark.slow
def test_stage_requires_committed_embeddings(tmp_path, ray_local):
    cfg = make_cfg(str(tmp_path))
    with pytest.raises(RuntimeError, match="committed embed stage"):
        run_graph_stage(cfg, Store(cfg.storage))


def test_removed_and_impossible_settings_fail_at_load():
    with pytest.raises(ConfigError, match="ivfpq' was removed: without re-ranking its recall@10 was 0.51") as err:
        make_cfg("/tmp/x", index="ivfpq")
    assert exit_code_for(err.value) == 2 and "use 'ivfflat'" in str(err.value)
    for key in ("pq_m", "parts_per_task"):
        with pytest.raises(ConfigError, match=f"graph.{key} was removed"):
            make_cfg("/tmp/x", **{key: 8})
    with pytest.raises(ConfigError, match="graph.nprobe=13 exceeds graph.nlist=12"):
        make_cfg("/tmp/x", nprobe=13)


@pytest.mark.slow
@pytest.mark.parametrize("settings, message", [
    ({"nlist": None, "nprobe": 200}, r"graph.nprobe=200 exceeds the 163 IVF lists of these 1660 nodes"),
    ({"nlist": 5000, "nprobe": 3, "train_size": None}, r"graph.nlist=5000 exceeds the 1660 vectors"),
    ({"index": "flat", "max_task_rows": 3000}, r"graph.index=flat searches all 1660 nodes in one task"),
])
def test_settings_that_cannot_work_for_this_pool_fail_before_any_work(tmp_path, ray_local, settings, message):
    write_embedding_parts(str(tmp_path))
    cfg = make_cfg(str(tmp_path), **settings)
    with pytest.raises(ConfigError, match=message) as err:
        run_graph_stage(cfg, Store(cfg.storage))
    assert exit_code_for(err.value) == 2
    assert not os.path.exists(workdir.stage_dir(cfg.workdir, "graph"))  # refused before the stage claimed its dir


@pytest.mark.slow
def test_stage_on_s3_equals_local_run(tmp_path, ray_local, s3_bucket, s3_server):
    storage = {"endpoint_url": s3_server}
    root = f"{s3_bucket}/graph-stage"
    img, _, _ = write_embedding_parts(root, seed=4, storage=storage)
    write_embedding_parts(str(tmp_path), seed=4)
    cfg_s3, cfg_local = make_cfg(root, storage=storage), make_cfg(str(tmp_path))
    store = Store(cfg_s3.storage)
    stats = run_graph_stage(cfg_s3, store)
    run_graph_stage(cfg_local, Store(cfg_local.storage))
    assert is_committed(store, cfg_s3, "graph")
    assert read_graph(cfg_s3).equals(read_graph(cfg_local))
    assert_equals_reference(cfg_s3, reference(prepare_vectors(img, None, "image"), cfg_s3))
    gdir = workdir.stage_dir(cfg_s3.workdir, "graph")
    nodes = store.read_parquet(f"{gdir}/nodes.parquet")
    assert nodes.equals(pq.read_table(f"{workdir.stage_dir(cfg_local.workdir, 'graph')}/nodes.parquet"))
    assert not store.glob(f"{gdir}/buckets/*") and not store.glob(f"{gdir}/candidates/*")  # scratch removed
    assert stats["n_nodes"] == N and stats["groups"] > 1


MULTI_NODE = """
import json, sys
from pipeline.config import config_from_dict
from pipeline.job import run_one
from pipeline.storage import Store
from pipeline.testing import local_cluster

cfg = config_from_dict(json.loads(sys.argv[1]))
with local_cluster(nodes=3, cpus_per_node=1, object_store_memory=80 * 2**20):
    import ray
    stats = run_one(cfg, Store(cfg.storage), "graph")
    nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
print(json.dumps({"nodes": nodes, "groups": stats["groups"], "units": stats["units"]}))
"""


@pytest.mark.slow
def test_stage_on_a_three_node_ray_equals_the_single_node_run(tmp_path, ray_local):
    """A separate process (one Ray per process) runs the stage on a 3-node cluster on 127.0.0.1."""
    write_embedding_parts(str(tmp_path / "single"), seed=8)
    single = make_cfg(str(tmp_path / "single"))
    run_graph_stage(single, Store(single.storage))
    write_embedding_parts(str(tmp_path / "multi"), seed=8)
    multi = make_cfg(str(tmp_path / "multi"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", MULTI_NODE, json.dumps(multi.model_dump())], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 3 and report["groups"] > 1 and report["units"] > 1
    assert read_graph(multi).equals(read_graph(single))
