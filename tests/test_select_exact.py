"""The select stage's exact D2 against the single-process greedy (``d2.d2_select`` on the whole
symmetrised graph), bit for bit: selected.parquet (set, order, forward and pick scores), the
per-node files (rank, forward and final scores, blame) and the subset files, through the stage's
files, shuffle, workers and merges. In-process on many random graphs; on Ray (actors, tasks) for
the hard cases; on a local multi-node cluster; resumed after a kill; with partitions spilled.

The pure partitioned greedy is tested on hundreds of graphs in test_d2_exact.py; these tests are
about the layers around it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import workdir
from pipeline.config import config_from_dict
from pipeline.core import d2
from pipeline.formats.selection import datacomp_subset, subset_npy_bytes
from pipeline.job import run_one
from pipeline.select import stage as select_stage
from pipeline.stage import Hooks, StageContext
from pipeline.storage import Store, join
from pipeline.testing import write_graph_stages

REPO = Path(__file__).resolve().parents[1]


def make_case(tmp, neighbors, sq, cells, scores, select=None, n_parts=3, distance="sqeuclidean", uids=None):
    raw = {"workdir": str(Path(tmp) / "work"), "input": {"shards": str(Path(tmp) / "pool/{00000..00002}.tar")},
           "output": {"url": str(Path(tmp) / "out")}, "graph": {"k": max(1, neighbors.shape[1]), "distance": distance},
           "select": {"score": "score", **(select or {})}}
    cfg = config_from_dict(raw)
    store = Store()
    uids = write_graph_stages(store, cfg, neighbors, sq, cells, scores, uids, n_parts)
    return cfg, store, uids


def expected(cfg, neighbors, sq, scores, score_values=None):
    """The single-process reference: (kept node ids, d2_select at the largest budget, at the
    configured budget, the fixed-point shift, the graph on the survivors, budgets)."""
    s = cfg.select
    raw = np.asarray(scores if score_values is None else score_values, np.float64)
    n = len(raw)
    dist = np.sqrt(np.maximum(sq, 0)) if cfg.graph.distance == "euclidean" else sq
    graph = d2.symmetrize_knn(neighbors, dist)
    keep = d2.prefilter_mask(raw, s.beta) if s.beta > 0 else np.ones(n, bool)
    kept = np.flatnonzero(keep)
    sub = d2.subgraph(graph, kept) if kept.size < n else graph
    shifted, _ = d2.shift_nonnegative(raw[kept], s.score_offset)
    budget = d2.budget_for(n, s.prune_rate)
    b_max = max([budget] + [int(round(r * n)) for r in s.keep_rates])
    top = d2.d2_select(sub, shifted, b_max, s.gamma_forward, s.gamma_reverse, s.forward_rounds)
    at_b = d2.d2_select(sub, shifted, budget, s.gamma_forward, s.gamma_reverse, s.forward_rounds)
    shift = d2.fixed_point_shift(top.forward_scores.max()) if kept.size else None
    return kept, top, at_b, shift, sub, budget


def reference_blame(sub, at_b, budget, shift, gamma):
    """For each survivor not among the first B: the selected neighbour with the largest single
    suppression of it (ties: lower id) and that suppression, from the pick scores."""
    n = sub.n_nodes
    node = np.full(n, -1, np.int64)
    amount = np.zeros(n, np.int64)
    chosen = at_b.order[:budget]
    picked = set(chosen.tolist())
    for u in sorted(chosen.tolist()):
        q = int(d2.quantize_scores(at_b.final_scores[u:u + 1], shift)[0])
        nb, dd = sub.neighbors(u)
        for v, d in zip(nb.tolist(), dd.tolist()):
            if v in picked:
                continue
            a = int(d2.suppression(d2.edge_weight(gamma, d), q))
            if a > amount[v] or (a == amount[v] and a > 0 and u < node[v]):
                node[v], amount[v] = u, a
    return node, amount


def check_outputs(cfg, store, uids, neighbors, sq, scores):
    """Every output of the committed select stage against the reference."""
    kept, top, at_b, shift, sub, budget = expected(cfg, neighbors, sq, scores)
    uids = np.asarray(uids)
    sel_dir = workdir.stage_dir(cfg.workdir, "select")
    got = pq.read_table(join(sel_dir, "selected.parquet")).to_pydict()
    ranked = kept[top.order]
    assert got["uid"] == uids[ranked].tolist()
    assert got["rank"] == list(range(len(ranked)))
    assert np.array_equal(got["forward_score"], top.forward_scores[top.order])
    assert np.array_equal(got["final_score"], top.final_scores[top.order])
    assert got["selected"] == [r < budget for r in range(len(ranked))]
    assert set(got["partition"]) <= {-1}
    # the per-node files: every node once, in node order within each file
    files = sorted(store.glob(join(sel_dir, "nodes", "part-*.parquet")))
    tables = [pq.read_table(f) for f in files]
    for t in tables:
        assert np.all(np.diff(t.column("node").to_numpy()) > 0)
    nodes = pa.concat_tables(tables).sort_by("node").to_pydict()
    n = len(scores)
    assert nodes["node"] == list(range(n)) and nodes["uid"] == uids.tolist()
    assert np.array_equal(nodes["score"], np.asarray(scores, np.float64))
    pre = np.ones(n, bool)
    pre[kept] = False
    assert nodes["prefiltered"] == pre.tolist()
    rank = np.full(n, -1)
    rank[ranked] = np.arange(len(ranked))
    assert nodes["rank"] == rank.tolist()
    forward = np.array(nodes["forward_score"])
    final = np.array(nodes["final_score"])
    assert np.isnan(forward[pre]).all() and np.isnan(final[pre]).all()
    assert np.array_equal(forward[kept], at_b.forward_scores)
    assert np.array_equal(final[kept], at_b.final_scores)
    if shift is not None:
        b_node, b_amount = reference_blame(sub, at_b, budget, shift, cfg.select.gamma_reverse)
        expect_node = np.where(b_node >= 0, kept[np.maximum(b_node, 0)], -1)
        assert np.array_equal(np.array(nodes["blame_node"])[kept], expect_node)
        assert np.array_equal(np.array(nodes["blame_amount"])[kept], d2.dequantize_scores(b_amount, shift))
    # subset files: the configured budget's and one per extra keep rate
    for name, b in [("subset.npy", budget)] + [(f"subset_keep{r:g}.npy", int(round(r * n)))
                                                for r in cfg.select.keep_rates]:
        assert store.read_bytes(join(sel_dir, name)) == subset_npy_bytes(datacomp_subset(uids[kept[top.order[:b]]]))


def random_graph(rng, n, k, n_cells, p_missing=0.1, tied=False):
    nb = rng.integers(0, max(n, 1), size=(n, k))
    nb[rng.random((n, k)) < p_missing] = -1
    sq = (rng.random((n, k)) * 2).astype(np.float32)
    if tied:
        sq = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(n, k))
    sq[nb < 0] = np.inf
    sq[rng.random((n, k)) < 0.02] = -1e-5  # FAISS's tiny negatives for near-duplicates
    sq[nb < 0] = np.inf
    cells = rng.integers(0, n_cells, n).astype(np.int32)
    scores = rng.choice([0.25, 0.5], n) if tied else rng.normal(0.3, 0.1, n)
    return nb, sq, cells, scores


# --------------------------------------------------------------------------------------------
# In-process: many random graphs through the stage's files, shuffle, workers and merges
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 90),
    k=st.integers(1, 6),  # graph parts hold k >= 1 neighbour slots
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(1, 24),
    partitions=st.one_of(st.integers(1, 16), st.just("cells")),
    workers=st.integers(1, 4),
    tied=st.booleans(),
    gf=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    gr=st.sampled_from([0.0, 0.1, 1.0, 4.0]),
    rounds=st.integers(1, 3),
    prune=st.sampled_from([0.0, 0.3, 0.7]),  # 1.0 is refused by the config (nothing kept)
    beta_frac=st.sampled_from([0.0, 0.0, 0.5, 1.0]),
    euclidean=st.booleans(),
    rates=st.sampled_from([[], [0.1], [0.05, 0.2]]),
)
def test_stage_equals_d2_select_on_random_graphs(n, k, seed, n_cells, partitions, workers, tied, gf, gr, rounds,
                                                 prune, beta_frac, euclidean, rates):
    rng = np.random.default_rng(seed)
    nb, sq, cells, scores = random_graph(rng, n, k, n_cells, tied=tied)
    beta = round(beta_frac * prune * 0.9, 3)
    rates = [r for r in rates if r <= 1 - beta]
    if rates and max(int(round(r * n)) for r in rates) > n - int(round(beta * n)):
        rates = []
    select = {"partitions": partitions, "workers": workers, "gamma_forward": gf, "gamma_reverse": gr,
              "forward_rounds": rounds, "prune_rate": prune, "beta": beta, "keep_rates": rates}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, store, uids = make_case(tmp, nb, sq, cells, scores, select, n_parts=min(3, n),
                                     distance="euclidean" if euclidean else "sqeuclidean")
        stats = select_stage.run(cfg, store, StageContext("f", {}), use_ray=False)
        workdir.commit(store, workdir.stage_dir(cfg.workdir, "select"), "f", "select", stats)
        check_outputs(cfg, store, uids, nb, sq, scores)
        assert not store.exists(join(workdir.stage_dir(cfg.workdir, "select"), "_work"))


def test_score_file_join_gives_the_same_selection(tmp_path):
    rng = np.random.default_rng(3)
    nb, sq, cells, scores = random_graph(rng, 300, 5, 12)
    cfg, store, uids = make_case(tmp_path, nb, sq, cells, np.zeros(300), {"partitions": 4, "workers": 3})
    order = rng.permutation(300)
    pq.write_table(pa.table({"uid": np.array(uids)[order], "difficulty": scores[order]}), tmp_path / "s.parquet")
    raw = cfg.model_dump()
    raw["select"].update(score="difficulty", score_file=str(tmp_path / "s.parquet"))
    cfg = config_from_dict(raw)
    run_one(cfg, store, "select")
    check_outputs(cfg, store, uids, nb, sq, scores)


def test_partitions_spilled_to_disk_give_the_same_selection(tmp_path):
    rng = np.random.default_rng(4)
    nb, sq, cells, scores = random_graph(rng, 20000, 6, 40)  # partitions of ~0.6 MB
    # 1 MB per worker: every partition but the first of each worker is parked between uses
    cfg, store, uids = make_case(tmp_path, nb, sq, cells, scores,
                                 {"partitions": 8, "workers": 2, "worker_memory_mb": 1, "beta": 0.1})
    stats = run_one(cfg, store, "select")
    assert stats["worker_spilled_mb"] > 1
    check_outputs(cfg, store, uids, nb, sq, scores)


class KillAt:
    """A part hook that fails the stage after its `index`-th task committed (a killed job)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, stage: str, index: int) -> None:
        if index == self.index:
            raise RuntimeError(f"killed after task {index}")


@pytest.mark.parametrize("kill_at", [4, 9, 16])
def test_resume_after_a_kill_gives_the_same_bytes(tmp_path, kill_at):
    """Killed during the shuffle (task 4: 3 cell counts, then 2 of 3 map tasks), after
    selected.parquet was written (task 9: the merge; the subset merges follow) or while writing
    decisions.parquet (task 16: 3 blame lookups, then 2 of 3 decision tasks), then rerun: the same
    files, byte for byte, as an uninterrupted run."""
    from pipeline.job import run_stages

    rng = np.random.default_rng(5)
    nb, sq, cells, scores = random_graph(rng, 400, 5, 16)
    select = {"partitions": 3, "workers": 2, "keep_rates": [0.1]}
    clean_cfg, store, uids = make_case(tmp_path / "clean", nb, sq, cells, scores, select)
    run_one(clean_cfg, store, "select")
    cfg, _, _ = make_case(tmp_path / "killed", nb, sq, cells, scores, select)
    with pytest.raises(RuntimeError, match=f"killed after task {kill_at}"):
        run_stages(cfg, store, ["select"], Hooks(part_committed=KillAt(kill_at)))
    sel = workdir.stage_dir(cfg.workdir, "select")
    assert store.exists(join(sel, "_work")) and not store.exists(join(sel, workdir.SUCCESS))
    assert store.exists(join(sel, "selected.parquet")) == (kill_at >= 9)
    assert store.exists(join(sel, "decisions.parquet/part-00001.parquet")) == (kill_at == 16)
    assert not store.exists(join(sel, "decisions.parquet/part-00002.parquet"))
    run_one(cfg, store, "select")
    for name in ("selected.parquet", "subset.npy", "subset_keep0.1.npy", "nodes/part-00000.parquet",
                 "nodes/part-00002.parquet", "decisions.parquet/part-00000.parquet",
                 "decisions.parquet/part-00002.parquet"):
        assert store.read_bytes(join(sel, name)) == \
            store.read_bytes(join(workdir.stage_dir(clean_cfg.workdir, "select"), name)), name
    assert not store.exists(join(sel, "_work"))


# --------------------------------------------------------------------------------------------
# On Ray: the hard cases through actors and tasks
# --------------------------------------------------------------------------------------------


def chain_case(n=120):
    """A path 0-1-2-... with decreasing scores: every pick waits for its predecessor's, across
    partitions (cells alternate)."""
    nb = np.full((n, 2), -1, np.int64)
    nb[:-1, 0] = np.arange(1, n)
    sq = np.where(nb >= 0, 0.05, np.inf).astype(np.float32)
    cells = (np.arange(n) % 5).astype(np.int32)
    return nb, sq, cells, np.linspace(1.0, 0.5, n)


def hub_case(n=400, hubs=8, seed=6):
    """A few hubs that are every other node's neighbour, in every partition."""
    rng = np.random.default_rng(seed)
    nb, sq, cells, scores = random_graph(rng, n, 4, 16)
    nb[:, 0] = rng.integers(0, hubs, n)
    nb[:hubs, 0] = (np.arange(hubs) + 1) % hubs
    sq[:, 0] = 0.1
    scores[:hubs] = 3.0
    return nb, sq, cells, scores


def isolated_case(n=300, seed=7):
    rng = np.random.default_rng(seed)
    nb, sq, cells, scores = random_graph(rng, n, 5, 10)
    alone = rng.random(n) < 0.3
    nb[alone] = -1
    sq[alone] = np.inf
    nb[np.isin(nb, np.flatnonzero(alone))] = -1
    sq[nb < 0] = np.inf
    return nb, sq, cells, scores


RAY_CASES = {
    "random-P16": (lambda: random_graph(np.random.default_rng(1), 600, 6, 40), {"partitions": 16}),
    "chain-P5": (chain_case, {"partitions": 5, "gamma_reverse": 0.5, "prune_rate": 0.2, "workers": 3}),
    "ties-P7": (lambda: random_graph(np.random.default_rng(2), 300, 5, 20, tied=True),
                {"partitions": 7, "gamma_reverse": 0.0, "workers": 3}),
    "isolated-P4": (isolated_case, {"partitions": 4}),
    "hubs-P8": (hub_case, {"partitions": 8, "workers": 4, "keep_rates": [0.5]}),
    "budget0-P3": (lambda: random_graph(np.random.default_rng(3), 200, 4, 9), {"partitions": 3, "prune_rate": 0.998,
                                                                                 "keep_rates": [0.1]}),  # budget 0
    "budgetN-P6": (lambda: random_graph(np.random.default_rng(4), 200, 4, 9), {"partitions": 6, "prune_rate": 0.0}),
    "beta-P9": (lambda: random_graph(np.random.default_rng(5), 500, 5, 30), {"partitions": 9, "beta": 0.2}),
    "cells-P1": (lambda: random_graph(np.random.default_rng(6), 300, 5, 1), {"partitions": "cells"}),
    # selected.parquet merged by a task of its own (partitions above MERGE_ON_WORKER_MAX_NODES)
    "merge-task-P4": (lambda: random_graph(np.random.default_rng(7), 400, 5, 20), {"partitions": 4, "workers": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RAY_CASES))
def test_ray_stage_equals_d2_select_on_hard_cases(tmp_path, ray_local, case, monkeypatch):
    make, select = RAY_CASES[case]
    if case.startswith("merge-task"):
        from pipeline.select import driver

        monkeypatch.setattr(driver, "MERGE_ON_WORKER_MAX_NODES", 0)
    nb, sq, cells, scores = make()
    cfg, store, uids = make_case(tmp_path, nb, sq, cells, scores, select)
    stats = select_stage.run(cfg, store, StageContext("f", {}), use_ray=True)
    workdir.commit(store, workdir.stage_dir(cfg.workdir, "select"), "f", "select", stats)
    assert stats["used_ray"]
    check_outputs(cfg, store, uids, nb, sq, scores)
    if stats["partitions"] > 1 and stats["budget"]:
        assert stats["rounds"] >= 1 and len(stats["bytes_per_round"]) == stats["rounds"]


CLUSTER_SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import load_config
    from pipeline.job import run_one
    from pipeline.select import stage
    from pipeline.storage import Store

    stage.RAY_MIN_NODES = 1  # a small graph, on Ray all the same

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 100_000_000})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=100_000_000)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        cfg = load_config(sys.argv[1])
        stats = run_one(cfg, Store(), "select")
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert stats["used_ray"] and stats["workers"] == 3 and len(nodes) == 3, (stats["workers"], nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_multinode_cluster_gives_the_same_selection(tmp_path):
    """Three Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster, in a subprocess so it owns its
    Ray): the same selected.parquet, byte for byte, as one partition in-process. Over 60 s when the
    cores are busy (166 s at load 35): three nodes start, and the property needs several."""
    import yaml

    rng = np.random.default_rng(8)
    nb, sq, cells, scores = random_graph(rng, 700, 6, 24)
    cfg, store, uids = make_case(tmp_path / "cluster", nb, sq, cells, scores, {"partitions": 6})
    raw = cfg.model_dump()
    raw["select"]["partitions"] = 6
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(raw))
    script = tmp_path / "run_cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, str(script), str(config)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, _, _ = make_case(tmp_path / "one", nb, sq, cells, scores, {"partitions": 1})
    run_one(one, store, "select")
    read = lambda c: store.read_bytes(join(workdir.stage_dir(c.workdir, "select"), "selected.parquet"))  # noqa: E731
    assert read(cfg) == read(one)
    check_outputs(cfg, store, uids, nb, sq, scores)


def test_merge_bytes_do_not_depend_on_how_the_runs_are_split(tmp_path, monkeypatch):
    """selected.parquet from one run or from many, read in blocks that cut rows differently:
    the same bytes (row groups of fixed size, contiguous columns), and each run's ranks."""
    from pipeline.core.coreset import ranking_order
    from pipeline.formats.shuffle import write_columns
    from pipeline.select import outputs

    monkeypatch.setattr(outputs, "BLOCK_ROWS", 997)
    monkeypatch.setattr(outputs, "ROW_GROUP_ROWS", 40_000)
    rng = np.random.default_rng(9)
    n = 150_000  # large enough that parquet's page layout depended on how columns were chunked
    major = rng.integers(-2000, 2000, n).astype(np.int64)
    minor = rng.permutation(n).astype(np.int64)
    order = ranking_order(major, minor)
    store = Store()
    results = {}
    for n_runs in (1, 7):
        owner = rng.integers(0, n_runs, n)
        urls = []
        for p in range(n_runs):
            sel = order[owner[order] == p]  # each run sorted in ranking order
            url = str(tmp_path / f"r{n_runs}-{p}.col")
            write_columns(store, url, {"major": major[sel], "minor": minor[sel], "node": minor[sel],
                                       "owner": np.full(sel.size, p, np.int32), "forward": major[sel] * 0.5,
                                       "final": major[sel] * 0.25, "uid": pa.array([f"{m:032x}" for m in minor[sel]])})
            urls.append(url)
        out = str(tmp_path / f"sel{n_runs}.parquet")
        got = outputs.merge_selection(store, urls, out, str(tmp_path / f"ranks{n_runs}-") + "{}.bin", 100_000,
                                      60_000)
        assert got["rows"] == 100_000 and got["last"] == (int(major[order[59_999]]), int(minor[order[59_999]]))
        results[n_runs] = store.read_bytes(out)
        table = pq.read_table(out).to_pydict()
        assert table["uid"] == [f"{m:032x}" for m in minor[order[:100_000]]]
        assert table["selected"] == [r < 60_000 for r in range(100_000)]
        for p in range(n_runs):  # each run's ranks, in its own order
            ranks = outputs.read_ranks(store, str(tmp_path / f"ranks{n_runs}-{p}.bin"))
            assert np.array_equal(ranks, np.flatnonzero(owner[order[:100_000]] == p))
    assert pq.ParquetFile(str(tmp_path / "sel1.parquet")).metadata.num_row_groups == 3
    assert results[1] == results[7]
