"""The select stage (pipeline/select/, its pure call pipeline/core/coreset.py) on synthetic work directories.

The embed and graph stages' outputs are written directly here (clustered random vectors, the pure
``graph.knn_graph``), so these tests need neither a model nor Ray; the Ray paths are checked
against the in-process ones in the tests marked slow.
"""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import workdir
from pipeline.config import config_from_dict
from pipeline.core import d2
from pipeline.core.d2 import forward_rows
from pipeline.core.knn import knn_graph
from pipeline.core.partition import build_partitions, merge_partition_orders
from pipeline.formats.graph import graph_part_table
from pipeline.formats.selection import datacomp_subset, subset_npy_bytes
from pipeline.job import run_one
from pipeline.select import parallel
from pipeline.select.stage import select
from pipeline.storage import Store, join
from pipeline.testing import commit_stage


def run_select_stage(cfg, store):
    """The select stage through the job runner (skip / require / claim / run / commit)."""
    return run_one(cfg, store, "select")

U16 = np.dtype("u8,u8")  # what DataComp's resharder asserts



def fixed_list(values: np.ndarray, typ) -> pa.Array:
    n, d = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(n * d), typ), d)


def make_workdir(tmp_path, n=600, k=5, nlist=8, parts=3, dim=16, seed=0, uids=None, select=None, graph=None):
    """A committed embed + graph stage for n clustered points; returns (cfg, store, arrays)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(nlist, dim))
    labels = rng.integers(0, nlist, n)
    vectors = (centers[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = rng.uniform(0.1, 0.4, n).astype(np.float32)
    if uids is None:
        uids = [f"{i:032x}" for i in rng.permutation(10 * n)[:n]]
    raw = {
        "workdir": str(tmp_path / "work"), "input": {"shards": str(tmp_path / "pool/{00000..00009}.tar")},
        "output": {"url": str(tmp_path / "out")},
        "graph": {"k": k, "nlist": nlist, "nprobe": nlist, "index": "ivfflat", **(graph or {})},
        "select": {"prune_rate": 0.7, **(select or {})},
    }
    cfg = config_from_dict(raw)
    store = Store()
    emb_dir = workdir.stage_dir(cfg.workdir, "embed")
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        store.write_parquet(join(emb_dir, f"part-{p:05d}.parquet"), pa.table({
            "uid": pa.array(uids[lo:hi], pa.string()),
            "shard": pa.array([f"pool/{p:05d}.tar"] * (hi - lo)),
            "key": pa.array([f"{i:09d}" for i in range(lo, hi)]),
            "clip_score": pa.array(scores[lo:hi], pa.float32()),
            "image_embedding": fixed_list(vectors[lo:hi].astype(np.float16), pa.float16()),
            "text_embedding": fixed_list(vectors[lo:hi].astype(np.float16), pa.float16()),
        }))
    commit_stage(store, cfg, "embed", {"samples": n, "skipped": {}})
    neighbors, sq, cells = knn_graph(vectors, k, index="ivfflat", nlist=nlist, nprobe=nlist, seed=0)
    graph_dir = workdir.stage_dir(cfg.workdir, "graph")
    store.write_parquet(join(graph_dir, "nodes.parquet"), pa.table({
        "node": pa.array(np.arange(n, dtype=np.int64)), "uid": pa.array(uids, pa.string()),
        "part": pa.array([f"part-{int(np.searchsorted(bounds, i, 'right') - 1):05d}" for i in range(n)])}))
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        store.write_parquet(join(graph_dir, f"part-{p:05d}.parquet"),
                            graph_part_table(np.arange(lo, hi), neighbors[lo:hi], sq[lo:hi], cells[lo:hi]))
    commit_stage(store, cfg, "graph", {"n_nodes": n})
    return cfg, store, {"vectors": vectors, "scores": scores.astype(np.float64), "uids": uids,
                        "neighbors": neighbors, "sq": sq, "cells": cells}


def with_select(cfg, **select):
    raw = cfg.model_dump()
    raw["select"].update(select)
    return config_from_dict(raw)


def read_selected(store, cfg):
    return store.read_parquet(join(workdir.stage_dir(cfg.workdir, "select"), "selected.parquet")).to_pydict()


# -- pure helpers ---------------------------------------------------------------------------------

def test_build_partitions_cells_and_balanced_bins_are_deterministic():
    cells = np.array([5, 5, 5, 5, 2, 2, 2, 9, 9, 7])
    labels, p = build_partitions(cells, "cells")
    assert p == 4 and labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 3, 3, 2]
    labels, p = build_partitions(cells, 2)
    assert p == 2
    sizes = np.bincount(labels)
    assert sorted(sizes.tolist()) == [5, 5]  # {5:4, 7:1} and {2:3, 9:2}
    for c in np.unique(cells):  # whole cells only
        assert len(set(labels[cells == c].tolist())) == 1
    again, _ = build_partitions(cells, 2)
    assert np.array_equal(labels, again)
    assert build_partitions(cells, 1)[0].tolist() == [0] * 10
    labels, p = build_partitions(cells, 50)  # more partitions than cells: one per cell
    assert p == 4


def test_forward_rows_split_is_bit_identical_to_forward_pass():
    rng = np.random.default_rng(1)
    n, k = 300, 4
    nb = rng.integers(0, n, (n, k))
    dist = rng.uniform(0, 2, (n, k)).astype(np.float32)
    graph = d2.symmetrize_knn(nb, dist)
    s = rng.uniform(0, 1, n)
    for rounds in (1, 3):
        expected = d2.forward_pass(graph, s, 0.7, rounds)
        prev = s
        for _ in range(rounds):
            prev = np.concatenate([forward_rows(graph, lo, min(n, lo + 64), s[lo:lo + 64], prev, 0.7)
                                   for lo in range(0, n, 64)])
        assert np.array_equal(prev, expected)


def test_merge_partition_orders_keeps_each_partition_order():
    results = [(0, np.array([10, 11, 12]), np.array([5.0, 3.0, 1.0])),
               (1, np.array([20, 21]), np.array([4.0, 3.0]))]
    ids, parts = merge_partition_orders(results)
    assert ids.tolist() == [10, 20, 11, 21, 12]
    assert parts.tolist() == [0, 1, 0, 1, 0]


def test_datacomp_subset_reads_back_as_the_resharder_reads_it(tmp_path):
    uids = ["ffffffffffffffff0000000000000001", "00000000000000010000000000000000", "0a" * 16, "7"]
    subset = datacomp_subset(uids)
    path = tmp_path / "subset.npy"
    path.write_bytes(subset_npy_bytes(subset))
    with open(path, "rb") as fh:
        assert fh.read(6) == b"\x93NUMPY"
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == U16 and loaded.shape == (4,)
    pairs = [(int(x["f0"]), int(x["f1"])) for x in loaded]
    assert pairs == sorted(pairs)  # sorted: the resharder binary-searches it
    for uid in uids:  # the resharder's own lookup
        key = np.array([divmod(int(uid, 16), 2**64)], U16)[0]
        a, b = np.searchsorted(loaded, key, "left"), np.searchsorted(loaded, key, "right")
        assert b - a == 1
    assert (int(loaded[-1]["f0"]), int(loaded[-1]["f1"])) == (2**64 - 1, 1)
    with pytest.raises(ValueError, match="not 128-bit hex.*'sample-1'"):
        datacomp_subset(["sample-1", "ab"])


# -- the stage ------------------------------------------------------------------------------------

def test_partitions_1_equals_d2_select_on_the_same_graph(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "gamma_reverse": 0.5, "forward_rounds": 2})
    stats = run_select_stage(cfg, store)
    shifted = a["scores"] - a["scores"].min()
    graph = d2.symmetrize_knn(a["neighbors"], a["sq"])
    budget = d2.budget_for(600, 0.7)
    expected = d2.d2_select(graph, shifted, budget, 1.0, 0.5, rounds=2)
    got = read_selected(store, cfg)
    uid_of = np.array(a["uids"])
    assert got["uid"] == uid_of[expected.order].tolist()
    assert got["rank"] == list(range(budget))
    assert np.array_equal(got["forward_score"], expected.forward_scores[expected.order])
    assert np.array_equal(got["final_score"], expected.final_scores[expected.order])
    assert set(got["partition"]) == {0}
    assert stats["selected"] == budget == 180 and stats["overlap_with_exact"] == 1.0
    assert stats["score_offset"] == pytest.approx(-a["scores"].min())
    # subset.npy holds the same uids
    subset = np.load(join(workdir.stage_dir(cfg.workdir, "select"), "subset.npy"))
    assert np.array_equal(subset, datacomp_subset(got["uid"]))
    # committed: a rerun returns the stats without recomputing
    assert run_select_stage(cfg, store) == store.read_json(join(workdir.stage_dir(cfg.workdir, "select"), "_stats.json"))


def test_partitioned_selection_reports_cut_and_overlap(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 3})
    stats = run_select_stage(cfg, store)
    got = read_selected(store, cfg)
    assert stats["partitions"] == 3 and len(got["uid"]) == 180 == len(set(got["uid"]))
    assert 0.0 <= stats["cross_partition_edge_fraction"] < 0.5
    assert 0.5 < stats["overlap_with_exact"] <= 1.0
    # every partition got its proportional share (largest remainder) and used it
    labels, _ = build_partitions(a["cells"], 3)
    per_part = np.bincount(np.array(got["partition"]), minlength=3)
    sizes = np.bincount(labels, minlength=3)
    assert np.all(np.abs(per_part - sizes * 0.3) <= 1)
    # the partition column agrees with the cells of the selected nodes
    uid_index = {u: i for i, u in enumerate(a["uids"])}
    assert [int(labels[uid_index[u]]) for u in got["uid"]] == got["partition"]
    # the merged order is by pick score
    assert np.all(np.diff(got["final_score"]) <= 0)


def test_overlap_check_skipped_above_threshold(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": "cells", "exact_check_max_n": 100})
    stats = run_select_stage(cfg, store)
    assert stats["overlap_with_exact"] is None and "exact_check_max_n" in stats["overlap_skipped"]


def test_prefilter_drops_lowest_scores_and_keeps_the_full_budget(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "beta": 0.2})
    stats = run_select_stage(cfg, store)
    got = read_selected(store, cfg)
    assert stats["prefiltered"] == 120 and stats["budget"] == 180 == len(got["uid"])
    assert stats["pruned"] == 600 - 180 - 120
    dropped = set(np.array(a["uids"])[~d2.prefilter_mask(a["scores"], 0.2)])
    assert not dropped & set(got["uid"])
    # the shift is taken over the survivors
    assert stats["score_offset"] == pytest.approx(-np.sort(a["scores"])[120])


def test_euclidean_distance_takes_the_square_root(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1}, graph={"distance": "euclidean"})
    run_select_stage(cfg, store)
    graph = d2.symmetrize_knn(a["neighbors"], np.sqrt(a["sq"]))
    expected = d2.d2_select(graph, a["scores"] - a["scores"].min(), 180)
    assert read_selected(store, cfg)["uid"] == np.array(a["uids"])[expected.order].tolist()


def test_score_file_joined_by_uid_and_missing_uids_named(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "score": "difficulty",
                                                   "score_file": str(tmp_path / "scores.parquet")})
    rng = np.random.default_rng(5)
    difficulty = rng.uniform(-1, 1, 600)
    order = rng.permutation(600)  # another row order than the pool's
    pq.write_table(pa.table({"uid": np.array(a["uids"])[order][:590], "difficulty": difficulty[order][:590]}),
                   tmp_path / "scores.parquet")
    with pytest.raises(ValueError, match=r"no 'difficulty' for 10 of 600 samples, e\.g\. uids \['"):
        run_select_stage(cfg, store)
    pq.write_table(pa.table({"uid": np.array(a["uids"])[order], "difficulty": difficulty[order]}),
                   tmp_path / "scores.parquet")
    stats = run_select_stage(cfg, store)
    assert stats["score_source"].endswith(":difficulty") and stats["score_offset"] == pytest.approx(-difficulty.min())
    graph = d2.symmetrize_knn(a["neighbors"], a["sq"])
    expected = d2.d2_select(graph, difficulty - difficulty.min(), 180)
    assert read_selected(store, cfg)["uid"] == np.array(a["uids"])[expected.order].tolist()


def test_unknown_score_column_is_named(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, select={"score": "aesthetic"})
    with pytest.raises(ValueError, match=r"select.score='aesthetic'.*numeric columns there: \['clip_score'\]"):
        run_select_stage(cfg, store)


def test_non_hex_uids_skip_subset_file_with_a_reason(tmp_path):
    uids = [f"sample/{i}" for i in range(300)]
    cfg, store, _ = make_workdir(tmp_path, n=300, uids=uids, select={"partitions": 1})
    stats = run_select_stage(cfg, store)
    assert stats["subset_file"] is None and "'sample/" in stats["subset_file_skipped"]
    assert not store.exists(join(workdir.stage_dir(cfg.workdir, "select"), "subset.npy"))
    assert len(read_selected(store, cfg)["uid"]) == 90


def test_changed_select_settings_are_detected(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": 1})
    run_select_stage(cfg, store)
    changed = with_select(cfg, prune_rate=0.5)
    with pytest.raises(workdir.StaleStageError, match="--force-from select"):
        run_select_stage(changed, store)


@pytest.mark.parametrize("method", ["random", "score_topk", "ccs", "moderate", "kcenter"])
def test_baselines_use_the_same_budget(tmp_path, method):
    cfg, store, a = make_workdir(tmp_path, select={"method": method, "beta": 0.1})
    stats = run_select_stage(cfg, store)
    got = read_selected(store, cfg)
    assert len(got["uid"]) == stats["budget"] == 180 == len(set(got["uid"]))
    assert set(got["partition"]) == {-1}
    assert set(got["uid"]) <= set(a["uids"])
    if method == "score_topk":
        top = np.array(a["uids"])[np.argsort(-a["scores"], kind="stable")[:180]]
        assert set(got["uid"]) == set(top)
    dropped = set(np.array(a["uids"])[~d2.prefilter_mask(a["scores"], 0.1)])
    assert not dropped & set(got["uid"])
    again = select(cfg, store, use_ray=False)[0].column("uid").to_pylist()
    assert again == got["uid"]  # deterministic for the seed


@pytest.mark.slow
def test_ray_paths_equal_in_process_paths(tmp_path, monkeypatch, ray_local):
    cfg, store, _ = make_workdir(tmp_path, n=900, select={"partitions": 4, "forward_rounds": 2})
    local_table, local_stats = select(cfg, store, use_ray=False)
    monkeypatch.setattr(parallel, "FORWARD_RANGE_NODES", 128)
    ray_table, ray_stats = select(cfg, store, use_ray=True)
    assert ray_stats["used_ray"] and not local_stats["used_ray"]
    assert ray_table.equals(local_table)
    assert ray_stats["overlap_with_exact"] == local_stats["overlap_with_exact"]


def test_prune_everything_gives_an_empty_selection(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, n=200, select={"partitions": 3, "prune_rate": 1.0})
    stats = run_select_stage(cfg, store)
    assert stats["selected"] == 0 and stats["pruned"] == 200
    assert read_selected(store, cfg)["uid"] == []
    subset = np.load(join(workdir.stage_dir(cfg.workdir, "select"), "subset.npy"))
    assert subset.dtype == U16 and subset.shape == (0,)


def test_build_partitions_auto_is_exact_until_max_nodes():
    cells = np.array([5, 5, 5, 5, 2, 2, 2, 9, 9, 7])
    labels, p = build_partitions(cells, "auto", max_nodes=10)
    assert p == 1 and labels.tolist() == [0] * 10
    labels, p = build_partitions(cells, "auto", max_nodes=4)  # ceil(10 / 4) = 3 partitions of whole cells
    assert p == 3
    for c in np.unique(cells):
        assert len(set(labels[cells == c].tolist())) == 1
