"""The select stage (pipeline/select/) on synthetic work directories: its behaviour per setting.

The embed and graph stages' outputs are written directly here (clustered random vectors, the pure
``sharded_knn_graph``, through ``pipeline.testing.write_graph_stages``), so these tests need no model; they
run the stage in-process (the same workers and tasks as objects and calls). Exactness against the
single-process greedy on many graphs, the Ray path, a multi-node cluster, resume and spilling are
in test_select_exact.py.
"""


import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import workdir
from pipeline.config import config_from_dict
from pipeline.core import d2
from pipeline.core.d2 import forward_rows
from pipeline.core.ivf import sharded_knn_graph
from pipeline.core.partition import auto_partitions, cell_partitions
from pipeline.errors import ConfigError
from pipeline.formats.selection import datacomp_subset, subset_npy_bytes
from pipeline.job import run_one, stage_fingerprints
from pipeline.select.stage import select
from pipeline.storage import Store, join
from pipeline.testing import write_graph_stages


def run_select_stage(cfg, store):
    """The select stage through the job runner (skip / require / claim / run / commit)."""
    return run_one(cfg, store, "select")


U16 = np.dtype("u8,u8")  # what DataComp's resharder asserts


def make_workdir(tmp_path, n=600, k=5, nlist=8, parts=3, dim=16, seed=0, uids=None, select=None, graph=None,
                 filter_columns=None):
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
        # two IVF lists per cluster: the cells cut the clusters, so partitions cut kNN edges
        "graph": {"k": k, "nlist": 2 * nlist, "nprobe": 2 * nlist, "index": "ivfflat", **(graph or {})},
        "select": {"prune_rate": 0.7, **(select or {})},
    }
    cfg = config_from_dict(raw)
    store = Store()
    neighbors, sq, cells = sharded_knn_graph(vectors, k, nlist=cfg.graph.nlist, nprobe=cfg.graph.nprobe, seed=0)
    write_graph_stages(store, cfg, neighbors, sq, cells, scores, uids, parts, vectors=vectors.astype(np.float16),
                       **(filter_columns or {}))
    return cfg, store, {"vectors": vectors, "scores": scores.astype(np.float64), "uids": uids,
                        "neighbors": neighbors, "sq": sq, "cells": cells}


def with_select(cfg, **select):
    raw = cfg.model_dump()
    raw["select"].update(select)
    return config_from_dict(raw)


def read_selected(store, cfg):
    """The configured selection, as the write stage reads it."""
    from pipeline.formats.selection import read_selected as read

    return read(store, workdir.stage_dir(cfg.workdir, "select")).to_pydict()


# -- pure helpers ---------------------------------------------------------------------------------

def test_cell_partitions_cells_and_balanced_bins_are_deterministic():
    cells = np.array([5, 5, 5, 5, 2, 2, 2, 9, 9, 7])
    counts = np.bincount(cells)
    part, p = cell_partitions(counts, "cells")
    assert p == 4 and part[cells].tolist() == [1, 1, 1, 1, 0, 0, 0, 3, 3, 2]
    assert part[[0, 1, 3, 4, 6, 8]].tolist() == [-1] * 6  # empty cells belong nowhere
    part, p = cell_partitions(counts, 2)
    labels = part[cells]
    assert p == 2
    sizes = np.bincount(labels)
    assert sorted(sizes.tolist()) == [5, 5]  # {5:4, 7:1} and {2:3, 9:2}
    again, _ = cell_partitions(counts, 2)
    assert np.array_equal(part, again)
    assert cell_partitions(counts, 1)[0][cells].tolist() == [0] * 10
    part, p = cell_partitions(counts, 50)  # more partitions than cells: one per cell
    assert p == 4


def test_auto_partitions_by_memory_and_by_cores():
    assert auto_partitions(10, max_nodes=10, cpus=2) == 1
    assert auto_partitions(10, max_nodes=4, cpus=2) == 3  # ceil(10 / 4): no partition above max_nodes
    assert auto_partitions(10**7, max_nodes=10**7, cpus=2) == 1  # 2 cores: the extra work would not pay
    assert auto_partitions(10**7, max_nodes=10**7, cpus=16) == 16  # enough cores: one partition each
    assert auto_partitions(10**6, max_nodes=10**7, cpus=16) == 4  # but >= 250k nodes per partition
    assert auto_partitions(3 * 10**7, max_nodes=10**7, cpus=2) == 3
    # and no partition larger than a worker's memory: 10^7 nodes x 300 B in 1 GB workers
    assert auto_partitions(10**7, max_nodes=10**7, cpus=2, worker_bytes=2**30) == 3


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
    assert set(got["partition"]) == {-1}  # an exact selection does not depend on partitions
    assert set(got["selected"]) == {True}
    assert stats["selected"] == budget == 180 and stats["overlap_with_exact"] == 1.0
    assert stats["score_offset"] == pytest.approx(-a["scores"].min())
    # subset.npy holds the same uids
    subset = np.load(join(workdir.stage_dir(cfg.workdir, "select"), "subset.npy"))
    assert np.array_equal(subset, datacomp_subset(got["uid"]))
    # committed: a rerun returns the stats without recomputing
    assert run_select_stage(cfg, store) == store.read_json(join(workdir.stage_dir(cfg.workdir, "select"), "_stats.json"))


def test_the_old_approximation_kept_by_the_select_scale_benchmark(tmp_path):
    """select.approximate left the stage; benchmarks/select_scale.py keeps the approximation (each
    partition its own greedy on its internal edges with its proportional share, merged by pick
    score) to report its overlap with the exact selection."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "select_scale.py"
    spec = importlib.util.spec_from_file_location("select_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, _, a = make_workdir(tmp_path)
    graph = d2.symmetrize_knn(a["neighbors"], a["sq"])
    shifted = a["scores"] - a["scores"].min()
    forward = d2.forward_pass(graph, shifted)
    part, _ = cell_partitions(np.bincount(a["cells"]), 3)
    labels = part[a["cells"]]
    picked = bench.approximate_partitioned(graph, forward, labels, 180)
    assert len(picked) == 180 == len(set(picked.tolist()))
    per_part = np.bincount(labels[picked], minlength=3)
    assert np.all(np.abs(per_part - np.bincount(labels, minlength=3) * 0.3) <= 1)
    finals = {}
    for p in range(3):
        ids = np.flatnonzero(labels == p)
        own = d2.reverse_select(d2.subgraph(graph, ids), forward[ids], int(per_part[p]))
        assert picked[labels[picked] == p].tolist() == ids[own.order].tolist()
        finals.update(zip(ids[own.order].tolist(), own.final_scores[own.order]))
    assert np.all(np.diff([finals[i] for i in picked.tolist()]) <= 0)  # merged by pick score
    exact = d2.d2_select(graph, shifted, 180).order
    overlap = bench.approximate_overlaps(graph, forward, exact, a["cells"], 180, [1, 3])
    assert overlap["1"] == 1.0 and 0.5 < overlap["3"] <= 1.0


@pytest.mark.parametrize("method", ["random", "ccs"])
@pytest.mark.parametrize("partitions", [1, 3])
def test_in_memory_selectors_pick_what_the_stage_picks(tmp_path, method, partitions):
    """pipeline.core.selectors' random and CCS (what the benchmarks run) on the stage's survivors
    and shifted scores pick the stage's set, in the stage's order."""
    from pipeline.core import selectors

    cfg, store, a = make_workdir(tmp_path, select={"method": method, "beta": 0.1, "partitions": partitions,
                                                   "ccs_strata": 7}, seed=3)
    table, stats = select(cfg, store, use_ray=False)
    survivors = np.flatnonzero(d2.prefilter_mask(a["scores"], 0.1))
    shifted = a["scores"][survivors] - a["scores"][survivors].min()
    if method == "random":
        picked = selectors.random_select(survivors, stats["budget"], seed=cfg.seed)
    else:
        picked = selectors.ccs_select(shifted, stats["budget"], strata=7, seed=cfg.seed, ids=survivors)
    assert table.column("uid").to_pylist() == np.array(a["uids"])[picked].tolist()
    other = config_from_dict({**cfg.model_dump(), "seed": 5})
    table5, _ = select(other, store, use_ray=False)
    picked5 = (selectors.random_select(survivors, stats["budget"], seed=5) if method == "random" else
               selectors.ccs_select(shifted, stats["budget"], strata=7, seed=5, ids=survivors))
    assert table5.column("uid").to_pylist() == np.array(a["uids"])[picked5].tolist() != table.column("uid").to_pylist()


def test_partitions_alone_do_not_change_an_exact_selection(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": 1})
    run_select_stage(cfg, store)
    url = join(workdir.stage_dir(cfg.workdir, "select"), "selected.parquet")
    one = store.read_bytes(url)
    # the fingerprint ignores how the work is split: the committed stage stands for every P ...
    assert workdir.is_committed(store, workdir.stage_dir(cfg.workdir, "select"),
                                stage_fingerprints(with_select(cfg, partitions=5))["select"], "select")
    # ... because recomputing it with any P gives the same bytes
    for p in (3, "cells"):
        table, stats = select(with_select(cfg, partitions=p, workers=2), store, use_ray=False)
        assert stats["partitions"] > 1 and stats["cross_partition_edge_fraction"] > 0
        assert table.equals(pq.read_table(url).filter(pq.read_table(url).column("selected")))


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
    with pytest.raises(ConfigError, match=r"select.score='aesthetic'.*numeric columns there: \['clip_score', 'original_width', 'original_height', 'score'\]"):
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
@pytest.mark.parametrize("method", ["d2", "ccs"])
def test_ray_paths_equal_in_process_paths(tmp_path, ray_local, method):
    cfg, store, _ = make_workdir(tmp_path, n=900, select={"partitions": 4, "forward_rounds": 2, "beta": 0.1,
                                                          "method": method})
    local_table, local_stats = select(cfg, store, use_ray=False)
    ray_table, ray_stats = select(cfg, store, use_ray=True)
    assert ray_stats["used_ray"] and not local_stats["used_ray"]
    assert ray_table.equals(local_table)
    assert ray_stats["workers"] == 2  # one per CPU of the fixture's Ray, partitions dealt to them


def test_prune_everything_is_refused_before_the_stage_writes(tmp_path):
    # a budget of 0 keeps nothing (the job used to end with exit 0 and an output path that did not
    # exist): refused when loaded (prune_rate 1.0) or, once N is known, before the select stage writes
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"select.prune_rate=1.0 drops every sample"):
        make_workdir(tmp_path, n=200, select={"partitions": 3, "prune_rate": 1.0})
    cfg, store, _ = make_workdir(tmp_path, n=200, select={"partitions": 3, "prune_rate": 0.998})
    with pytest.raises(ConfigError, match=r"keeps round\(\(1-p\)\*N\) = 0 of the N=200 samples"):
        run_select_stage(cfg, store)
    assert not store.exists(workdir.stage_dir(cfg.workdir, "select"))


@pytest.mark.parametrize("method", ["random", "score_topk", "ccs", "moderate"])
def test_baselines_do_not_depend_on_partitions(tmp_path, method):
    cfg, store, a = make_workdir(tmp_path, select={"method": method, "beta": 0.1, "partitions": 1})
    one, _ = select(cfg, store, use_ray=False)
    many, stats = select(with_select(cfg, partitions=5, workers=3), store, use_ray=False)
    assert stats["partitions"] == 5 and many.equals(one)
    if method == "random":  # a uniform draw from the survivors, another one for another seed
        other, _ = select(config_from_dict({**cfg.model_dump(), "seed": 1}), store, use_ray=False)
        assert set(other.column("uid").to_pylist()) != set(one.column("uid").to_pylist())


def test_one_task_baselines_refuse_pools_above_their_limit_at_start(tmp_path, monkeypatch):
    from pipeline.select.methods import KCenter

    cfg, store, _ = make_workdir(tmp_path, n=300, select={"method": "kcenter"})
    monkeypatch.setattr(KCenter, "max_nodes", 299)
    with pytest.raises(ConfigError, match="runs in one task and handles at most 299 samples; this pool has 300"):
        run_select_stage(cfg, store)
    assert not store.exists(join(workdir.stage_dir(cfg.workdir, "select"), "_work"))  # refused before any work


def test_keep_rates_rank_more_and_write_one_subset_each(tmp_path):
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 2, "keep_rates": [0.5, 0.1]})
    stats = run_select_stage(cfg, store)
    sel_dir = workdir.stage_dir(cfg.workdir, "select")
    ranked = pq.read_table(join(sel_dir, "selected.parquet")).to_pydict()
    assert len(ranked["uid"]) == 300 and ranked["selected"] == [r < 180 for r in range(300)]
    assert stats["ranked"] == 300 and stats["keep_rates"] == {"0.5": 300, "0.1": 60}
    # the prefix property: the 0.3 selection is the first 180 of the 0.5 one, and the greedy's
    expected = d2.d2_select(d2.symmetrize_knn(a["neighbors"], a["sq"]), a["scores"] - a["scores"].min(), 300)
    assert ranked["uid"] == np.array(a["uids"])[expected.order].tolist()
    for name, b in (("subset.npy", 180), ("subset_keep0.5.npy", 300), ("subset_keep0.1.npy", 60)):
        assert store.read_bytes(join(sel_dir, name)) == subset_npy_bytes(datacomp_subset(ranked["uid"][:b]))
    assert read_selected(store, cfg)["uid"] == ranked["uid"][:180]  # what the write stage reads


# -- select.prefilter.basic: DataComp's basic filter before the β pre-filter ---------------------

ENGLISH = ["a photo of a small red dog playing in the garden", "a big red house on the hill at sunset",
           "two children riding bicycles along the beach", "a bowl of fresh fruit on a wooden table"]
# captions / sizes that fail one rule each (node i % 10 picks the case; other nodes pass)
FAILING = {1: ("caption_not_english", "ein kleiner roter Hund spielt im Garten", 640, 480),
           2: ("caption_not_english", "一只小红狗在花园里玩耍", 640, 480),
           3: ("caption_too_few_words", "sunny beach", 640, 480),
           4: ("caption_too_short", "a b c", 640, 480),
           5: ("image_too_small", ENGLISH[0], 150, 480),
           6: ("image_aspect_ratio", ENGLISH[1], 1000, 200),
           7: ("image_too_small", ENGLISH[2], None, None)}  # unknown size: the filter cannot vouch for it


def basic_columns(n):
    captions, widths, heights, rules = [], [], [], []
    for i in range(n):
        rule, caption, w, h = FAILING.get(i % 10, ("", ENGLISH[i % len(ENGLISH)], 640, 480))
        captions.append(caption)
        widths.append(w)
        heights.append(h)
        rules.append(rule)
    return {"captions": captions, "widths": widths, "heights": heights}, rules


def basic_expected(a, cols, cfg):
    """The single-process reference: DataComp's filter (the core function with the offline
    language id), then β on the samples that pass, then d2_select on the graph without the dropped
    nodes; budget and β are fractions of the samples that pass."""
    from pipeline.core.basic_filter import basic_filter
    from pipeline.langid import detect_languages

    s = cfg.select
    result = basic_filter(cols["captions"], cols["widths"], cols["heights"], detect_languages)
    passed = np.flatnonzero(result.keep)
    kept = passed[d2.prefilter_mask(a["scores"][passed], s.beta)] if s.beta else passed
    graph = d2.symmetrize_knn(a["neighbors"], a["sq"])
    shifted, _ = d2.shift_nonnegative(a["scores"][kept], None)
    budget = d2.budget_for(passed.size, s.prune_rate)
    b_max = max([budget] + [round(r * passed.size) for r in s.keep_rates])
    top = d2.d2_select(d2.subgraph(graph, kept), shifted, b_max, s.gamma_forward, s.gamma_reverse, s.forward_rounds)
    return result, passed, kept, budget, np.array(a["uids"])[kept[top.order]].tolist()


def test_basic_filter_drops_each_rule_before_beta_and_selects_from_the_rest(tmp_path):
    from pipeline.core.basic_filter import RULES

    cols, rules = basic_columns(600)
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "beta": 0.1, "prefilter": {"basic": True}},
                                 filter_columns=cols)
    stats = run_select_stage(cfg, store)
    result, passed, kept, budget, expected = basic_expected(a, cols, cfg)
    # the fixture exercises every rule: each failing node is dropped by the rule it was built to fail
    for i, rule in enumerate(rules):
        assert result.reason(i) == (rule or None)
    assert {r for r in rules if r} == set(RULES)
    assert stats["basic_filter"] == {"dropped": 420, "dropped_by": result.dropped_by, "failed": result.failed}
    assert stats["candidates"] == passed.size == 180
    assert stats["budget"] == budget == round(0.3 * 180)  # a fraction of the samples that pass
    assert stats["prefiltered_beta"] == round(0.1 * 180) and stats["prefiltered"] == 420 + 18
    assert stats["pruned"] == 180 - budget - 18
    assert read_selected(store, cfg)["uid"] == expected
    # what the job's summary and report list as dropped: each rule, β on its own
    from pipeline.summary import summarize

    dropped = summarize({"select": stats})["dropped"]
    assert {k: v for k, v in dropped.items() if k.startswith("basic filter: ")} == \
        {f"basic filter: {r}": c for r, c in result.dropped_by.items()}
    assert dropped["pre-filter (lowest 0.1 of scores)"] == 18
    # the nodes files say which pre-filter dropped each node
    nodes = pq.read_table(join(workdir.stage_dir(cfg.workdir, "select"), "nodes")).to_pydict()
    label = dict(zip(nodes["node"], nodes["prefilter"]))
    beta_dropped = set(passed.tolist()) - set(kept.tolist())
    for i in range(600):
        want = rules[i] or ("beta" if i in beta_dropped else "")
        assert label[i] == want, i
    assert nodes["prefiltered"] == [bool(lab) for lab in nodes["prefilter"]]
    assert all(np.isnan(f) for f, lab in zip(nodes["forward_score"], nodes["prefilter"]) if lab)


def test_basic_filter_selection_does_not_depend_on_partitions(tmp_path):
    cols, _ = basic_columns(600)
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "beta": 0.1, "keep_rates": [0.5],
                                                   "prefilter": {"basic": True}}, filter_columns=cols)
    one, one_stats = select(cfg, store, use_ray=False)
    many, stats = select(with_select(cfg, partitions=5, workers=3), store, use_ray=False)
    assert stats["partitions"] == 5 and stats["cross_partition_edge_fraction"] > 0
    assert many.equals(one)
    assert stats["basic_filter"] == one_stats["basic_filter"]
    _, _, _, budget, expected = basic_expected(a, cols, cfg)
    assert one.column("uid").to_pylist() == expected[:budget]


@pytest.mark.parametrize("method", ["score_topk", "random"])
def test_baselines_with_basic_filter_do_not_depend_on_partitions(tmp_path, method):
    cols, rules = basic_columns(600)
    cfg, store, a = make_workdir(tmp_path, select={"method": method, "partitions": 1, "prefilter": {"basic": True}},
                                 filter_columns=cols)
    one, stats = select(cfg, store, use_ray=False)
    many, _ = select(with_select(cfg, partitions=5, workers=3), store, use_ray=False)
    assert many.equals(one) and one.num_rows == stats["budget"] == round(0.3 * 180)
    passing = {u for u, r in zip(a["uids"], rules) if not r}
    assert set(one.column("uid").to_pylist()) <= passing
    if method == "score_topk":
        ids = np.array([i for i, r in enumerate(rules) if not r])
        top = ids[np.argsort(-a["scores"][ids], kind="stable")[: stats["budget"]]]
        assert set(one.column("uid").to_pylist()) == set(np.array(a["uids"])[top].tolist())


def test_basic_filter_resumes_only_unfinished_parts(tmp_path, monkeypatch):
    from pipeline.select import prefilter

    cols, _ = basic_columns(300)
    cfg, store, _ = make_workdir(tmp_path, n=300, select={"partitions": 1, "prefilter": {"basic": True}},
                                 filter_columns=cols)
    calls = []
    real = prefilter.filter_part

    def flaky(job, index):
        calls.append(index)
        if index == 2 and calls.count(2) == 1:
            raise RuntimeError("killed")
        return real(job, index)

    monkeypatch.setattr(prefilter, "filter_part", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        run_select_stage(cfg, store)
    first = list(calls)
    stats = run_select_stage(cfg, store)
    assert first == [0, 1, 2] and calls[3:] == [2]  # the resumed stage filtered only part 2
    assert stats["basic_filter"]["dropped"] == 210


# -- d2prune select CONFIG --keep ------------------------------------------------------------------

def test_keep_flag_sets_keep_rates_through_the_cli(tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    cfg, store, a = make_workdir(tmp_path, select={"partitions": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for bad, needle in (("0.1,abc", "'abc' is not a number"), ("0,0.2", r"must lie in \(0, 1\], got \[0.0\]"),
                        ("0.2,1.5", r"got \[1.5\]"), ("0.2,0.2", "repeat")):
        assert main(["select", str(config), "--keep", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("d2prune: error: --keep") and re.search(needle, err[0]), err
    assert not store.exists(workdir.stage_dir(cfg.workdir, "select"))
    assert main(["select", str(config), "--keep", "0.1,0.2,0.3,0.5"]) == 0
    sel_dir = workdir.stage_dir(cfg.workdir, "select")
    stats = store.read_json(join(sel_dir, "_stats.json"))
    assert stats["keep_rates"] == {"0.1": 60, "0.2": 120, "0.3": 180, "0.5": 300} and stats["ranked"] == 300
    # one greedy order serves every rate: each subset is a prefix of the largest budget's order
    expected = d2.d2_select(d2.symmetrize_knn(a["neighbors"], a["sq"]), a["scores"] - a["scores"].min(), 300)
    order = np.array(a["uids"])[expected.order].tolist()
    for rate, b in (("0.1", 60), ("0.2", 120), ("0.3", 180), ("0.5", 300)):
        assert store.read_bytes(join(sel_dir, f"subset_keep{rate}.npy")) == subset_npy_bytes(datacomp_subset(order[:b]))
    assert store.read_bytes(join(sel_dir, "subset.npy")) == subset_npy_bytes(datacomp_subset(order[:180]))
    # the committed stage was made with these rates: asking for others without --force is stale (exit 3)
    assert main(["select", str(config), "--keep", "0.2"]) == 3
    capsys.readouterr()
    # d2prune run takes the flag too, checked the same way before any stage runs
    assert main(["run", str(config), "--keep", "0.4,2"]) == 2
    assert "--keep 0.4,2: keep rates must lie in (0, 1], got [2.0]" in capsys.readouterr().err


# -- decisions.parquet ---------------------------------------------------------------------------

def write_skip_records(store, cfg, part, rows):
    """What the embed stage records for a shard's samples it did not embed (exactly its schema)."""
    table = pa.table({c: pa.array([r[i] for r in rows], pa.string()) for i, c in enumerate(("shard", "key", "uid",
                                                                                             "reason"))})
    store.write_parquet(join(workdir.stage_dir(cfg.workdir, "embed"), f"part-{part:05d}.skipped.parquet"), table)


def test_decisions_account_for_every_input_sample_once(tmp_path):
    from pipeline.select.driver import compute

    cols, rules = basic_columns(600)
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 3, "beta": 0.1, "keep_rates": [0.5],
                                                   "prefilter": {"basic": True}}, filter_columns=cols)
    skips = {0: [("pool/00000.tar", "x1", "", "decode_error"), ("pool/00000.tar", "x2", "ab" * 16, "no_caption")],
             1: [("pool/00001.tar", "y1", "cd" * 16, "no_embedding")]}  # part 2: an older workdir, none
    for part, rows in skips.items():
        write_skip_records(store, cfg, part, rows)
    stats = run_select_stage(cfg, store)
    sel_dir = workdir.stage_dir(cfg.workdir, "select")
    names = sorted(p.name for p in (tmp_path / "work" / "selection" / "decisions.parquet").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    dec = pq.read_table(join(sel_dir, "decisions.parquet")).to_pydict()
    assert list(dec) == ["shard", "key", "uid", "decision", "reason", "rank", "score", "blame_uid", "blame_amount"]
    emb = pa.concat_tables([pq.read_table(u, columns=["shard", "key", "uid"]) for u in
                            workdir.committed_parts(store, workdir.stage_dir(cfg.workdir, "embed"))]).to_pydict()
    embedded = [(s, k, u) for s, k, u, d in zip(dec["shard"], dec["key"], dec["uid"], dec["decision"]) if d != "skipped"]
    assert sorted(embedded) == sorted(zip(emb["shard"], emb["key"], emb["uid"])) and len(set(embedded)) == 600
    skipped = [(s, k, u, r) for s, k, u, r, d in zip(dec["shard"], dec["key"], dec["uid"], dec["reason"], dec["decision"])
               if d == "skipped"]
    assert sorted(skipped) == sorted(skips[0] + skips[1])
    # the counts match the stage's stats
    count = {d: dec["decision"].count(d) for d in ("skipped", "prefiltered", "selected", "ranked", "pruned")}
    ranked_only = stats["ranked"] - stats["budget"]
    assert count == {"skipped": 3, "prefiltered": stats["prefiltered"], "selected": stats["budget"],
                     "ranked": ranked_only, "pruned": stats["pruned"] - ranked_only} == stats["decisions"]
    assert stats["decisions_without_skip_records"] == 1 and ranked_only == 90 - 54
    # per sample: reason, rank, score, blame as the other outputs say
    row = {u: i for i, (u, d) in enumerate(zip(dec["uid"], dec["decision"])) if d != "skipped"}
    ranked = pq.read_table(join(sel_dir, "selected.parquet")).to_pydict()
    for r, (u, sel) in enumerate(zip(ranked["uid"], ranked["selected"])):
        assert dec["decision"][row[u]] == ("selected" if sel else "ranked") and dec["rank"][row[u]] == r
    nodes = pq.read_table(join(sel_dir, "nodes")).to_pydict()
    uid_of = np.array(a["uids"])
    selected = set(read_selected(store, cfg)["uid"])
    blamed = 0
    for node, u, label, bn, amount in zip(nodes["node"], nodes["uid"], nodes["prefilter"], nodes["blame_node"],
                                          nodes["blame_amount"]):
        i = row[u]
        assert dec["score"][i] == a["scores"][node]
        assert dec["reason"][i] == label == (rules[node] or label)
        assert (dec["decision"][i] == "prefiltered") == bool(label)
        assert dec["blame_uid"][i] == (uid_of[bn] if bn >= 0 else "") and dec["blame_amount"][i] == amount
        if dec["decision"][i] == "pruned" and bn >= 0:
            assert dec["blame_uid"][i] in selected
            blamed += 1
    assert blamed > 0.5 * count["pruned"]
    # blame inside a partition is resolved by the partition, across partitions by the owner's group
    assert 0 < stats["blame_requests"] < sum(bn >= 0 for bn in nodes["blame_node"])
    assert all(np.isnan(s) and r == -1 for s, r, d in zip(dec["score"], dec["rank"], dec["decision"]) if d == "skipped")
    assert not store.exists(join(sel_dir, "_work"))

    # resumable: a second computation keeps the files there and writes only the missing one
    out = str(tmp_path / "again")
    compute(cfg, store, out, use_ray=False)
    files = {n: tmp_path / "again" / "decisions.parquet" / n for n in names}
    before = {n: f.stat().st_mtime_ns for n, f in files.items()}
    files["part-00001.parquet"].unlink()
    again = compute(cfg, store, out, use_ray=False)
    assert files["part-00000.parquet"].stat().st_mtime_ns == before["part-00000.parquet"]
    assert pq.read_table(files["part-00001.parquet"]).to_pandas().equals(  # NaN scores of skipped rows equal
        pq.read_table(join(sel_dir, "decisions.parquet", "part-00001.parquet")).to_pandas())
    assert again["decisions"] == stats["decisions"]


def test_committed_parts_are_not_skip_records(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, n=100)
    write_skip_records(store, cfg, 0, [("pool/00000.tar", "k", "", "decode_error")])
    names = [u.rsplit("/", 1)[-1] for u in workdir.committed_parts(store, workdir.stage_dir(cfg.workdir, "embed"))]
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


@pytest.mark.slow
def test_basic_filter_and_decisions_on_ray_equal_in_process(tmp_path, ray_local):
    from pipeline.select.driver import compute

    cols, _ = basic_columns(600)
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": 4, "beta": 0.1, "prefilter": {"basic": True}},
                                 filter_columns=cols)
    write_skip_records(store, cfg, 1, [("pool/00001.tar", "y1", "", "decode_error")])
    local = compute(cfg, store, str(tmp_path / "local"), use_ray=False)
    remote = compute(cfg, store, str(tmp_path / "ray"), use_ray=True)
    assert remote["used_ray"] and remote["basic_filter"] == local["basic_filter"]
    assert remote["decisions"] == local["decisions"]
    for name in ("selected.parquet", "decisions.parquet"):
        assert pq.read_table(tmp_path / "ray" / name).to_pandas().equals(pq.read_table(tmp_path / "local" / name).to_pandas())
