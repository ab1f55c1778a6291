"""The kNN graph: pure FAISS maths (fast) and the sharded Ray stage (slow, one Ray for the module)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import workdir
from pipeline.config import config_from_dict
from pipeline.core.knn import (
    exact_knn,
    knn_graph,
    merge_topk,
    prepare_vectors,
    recall_at_k,
    recall_sample_ids,
    remove_self,
)
from pipeline.graph import stage as graph_stage
from pipeline.job import run_one
from pipeline.storage import Store
from pipeline.testing import commit_stage, is_committed


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


def test_ivfflat_with_all_lists_probed_equals_exact_knn():
    x = clustered(2000, 24, clusters=12, seed=1)
    nb, d, cells = knn_graph(x, 8, index="ivfflat", nlist=20, nprobe=20, seed=3)
    en, ed = exact_knn(x, 8)
    assert np.array_equal(nb, en)
    assert np.allclose(d, ed, atol=1e-5)
    assert cells.dtype == np.int32 and cells.min() >= 0 and cells.max() < 20
    assert len(np.unique(cells)) > 10  # the cells really partition the pool


def test_flat_index_is_exact_and_puts_everything_in_cell_zero():
    x = clustered(1500, 16, clusters=5, seed=2)
    nb, d, cells = knn_graph(x, 5, index="flat")
    en, ed = exact_knn(x, 5)
    assert np.array_equal(nb, en) and np.allclose(d, ed, atol=1e-5)
    assert (cells == 0).all()
    # exact distances really are squared L2 to the listed neighbour
    rows = np.arange(0, 1500, 97)
    direct = ((x[rows, None, :] - x[nb[rows]]) ** 2).sum(-1)
    assert np.allclose(direct, d[rows], atol=1e-5)


def test_euclidean_returns_square_roots():
    x = clustered(500, 8, clusters=3, seed=4)
    _, sq, _ = knn_graph(x, 4, index="flat")
    _, eu, _ = knn_graph(x, 4, index="flat", distance="euclidean")
    assert np.allclose(eu, np.sqrt(sq))


@pytest.mark.parametrize("index", ["flat", "ivfflat", "ivfpq"])
def test_self_removed_by_id_with_exact_duplicates(index):
    base = clustered(400, 16, clusters=4, seed=5)
    copies = 4  # each vector 4 times: self ties at distance 0 with 3 duplicates
    x = np.repeat(base, copies, axis=0)
    ids = np.arange(len(x))
    kw = {"nlist": 8, "nprobe": 8} if index != "flat" else {}
    if index == "ivfpq":
        kw.update(pq_m=8, pq_bits=4)
    nb, d, _ = knn_graph(x, copies - 1, index=index, **kw)
    assert not (nb == ids[:, None]).any(), "a node listed itself"
    assert (nb >= 0).all()
    # the k = copies-1 nearest others are exactly the node's duplicates (same encoding under PQ)
    assert np.array_equal(np.sort(nb // copies, axis=1), np.repeat(ids // copies, copies - 1).reshape(-1, copies - 1))
    if index != "ivfpq":
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
    for index in ("flat", "ivfflat"):
        nb, d, _ = knn_graph(x, 6, index=index, nlist=1 if index == "ivfflat" else None)
        assert nb.shape == (4, 6) and d.dtype == np.float32
        assert (nb[:, :3] >= 0).all() and (nb[:, 3:] == -1).all()
        assert np.isfinite(d[:, :3]).all() and np.isinf(d[:, 3:]).all()
    # one probed list with fewer than k+1 members also pads (far clusters, nprobe=1)
    rng = np.random.default_rng(7)
    far = prepare_vectors(np.concatenate([rng.normal(size=(3, 8)) * 0.01 + 5 * np.eye(8)[0],
                                          rng.normal(size=(300, 8)) * 0.01 - 5 * np.eye(8)[0]]), None)
    nb, d, cells = knn_graph(far, 4, index="ivfflat", nlist=2, nprobe=1)
    small = cells == cells[0]
    assert small.sum() == 3
    assert (nb[small][:, 2:] == -1).all() and np.isinf(d[small][:, 2:]).all()


def test_approximate_recall_is_reported_and_sane():
    x = clustered(3000, 32, clusters=30, seed=8)
    en, _ = exact_knn(x, 10)
    nb_full, _, _ = knn_graph(x, 10, nlist=40, nprobe=40)
    nb_few, _, _ = knn_graph(x, 10, nlist=40, nprobe=2)
    full, few = recall_at_k(nb_full, en), recall_at_k(nb_few, en)
    assert full == 1.0
    assert 0.5 < few < 1.0  # approximate, yet mostly right on clustered data
    pq_nb, pq_d, _ = knn_graph(x, 10, index="ivfpq", nlist=40, nprobe=40, pq_m=16, pq_bits=8)
    assert 0.4 < recall_at_k(pq_nb, en) < 1.0
    assert (pq_d >= 0).all() and (pq_nb != np.arange(3000)[:, None]).all()


def test_recall_at_k_counts_ids_and_ignores_padding():
    exact = np.array([[1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    approx = np.array([[3, 9, 1], [5, -1, -1], [7, 8, 9]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(approx[:2], exact)


def test_knn_graph_is_deterministic_and_seeded_sample_matters():
    x = clustered(3000, 16, clusters=10, seed=9)
    a = knn_graph(x, 5, nprobe=2, train_size=1000, seed=1)
    b = knn_graph(x, 5, nprobe=2, train_size=1000, seed=1)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


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
    with pytest.raises(ValueError, match="pq_m"):
        knn_graph(x, 3, index="ivfpq", nlist=2, pq_m=3)
    with pytest.raises(ValueError, match="graph.nlist=500"):
        knn_graph(x, 3, nlist=500)
    with pytest.raises(ValueError, match="graph.index"):
        knn_graph(x, 3, index="hnsw")


# ------------------------------------------------------------------------------------------------
# the Ray stage
# ------------------------------------------------------------------------------------------------

PART_ROWS = [310, 0, 450, 220, 505, 175]  # an empty part too: its rows are simply none
DIM = 16


def write_embedding_parts(root: str, seed: int = 0, storage=None):
    """Embedding parts in the contract's schema (as the embed stage writes them), committed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, DIM))
    shards = [f"{root}/pool/{i:05d}.tar" for i in range(len(PART_ROWS))]
    cfg = make_cfg(root, shards, storage=storage)
    store = Store(cfg.storage)
    all_img, all_uid = [], []
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
        all_uid.extend(uids)
    commit_stage(store, cfg, "embed", {"samples": sum(PART_ROWS)})
    return np.concatenate(all_img), all_uid


def make_cfg(root: str, shards=None, storage=None, **graph_settings):
    shards = shards or [f"{root}/pool/{i:05d}.tar" for i in range(len(PART_ROWS))]
    settings = {"k": 6, "nlist": 12, "nprobe": 3, "parts_per_task": 2, "recall_sample": 300, "train_size": 1000}
    settings.update(graph_settings)
    return config_from_dict({
        "workdir": f"{root}/work", "seed": 5,
        "input": {"shards": shards},
        "output": {"url": f"{root}/out"},
        "graph": settings,
        "storage": storage or {},
    })


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


@pytest.mark.slow
def test_stage_matches_pure_knn_graph_and_aligns_uids(tmp_path, ray_local):
    img, uids = write_embedding_parts(str(tmp_path))
    cfg = make_cfg(str(tmp_path))
    store = Store(cfg.storage)
    stats = run_graph_stage(cfg, store)
    n = sum(PART_ROWS)
    assert is_committed(store, cfg, "graph")
    assert stats["n_nodes"] == n and stats["k"] == 6 and stats["nlist"] == 12 and stats["nprobe"] == 3
    assert stats["parts_searched"] == len(PART_ROWS) and stats["shards"] == 3
    assert set(stats["seconds"]) >= {"train", "add", "merge", "search", "recall"}
    assert stats["recall_sample"] == 300 and 0.5 < stats["recall_at_k"] <= 1.0

    nodes = pq.read_table(f"{workdir.stage_dir(cfg.workdir, 'graph')}/nodes.parquet")
    assert nodes.column("node").to_pylist() == list(range(n))
    assert nodes.column("uid").to_pylist() == uids  # sorted part order, rows in order
    expected_parts = [workdir.part_name(i) for i, rows in enumerate(PART_ROWS) for _ in range(rows)]
    assert nodes.column("part").to_pylist() == expected_parts

    table = read_graph(cfg)
    assert table.schema.field("neighbors").type == pa.list_(pa.int64(), 6)
    assert table.schema.field("sq_distances").type == pa.list_(pa.float32(), 6)
    assert table.schema.field("cell").type == pa.int32()
    node, nb, d, cells = table_arrays(table)
    assert node.tolist() == list(range(n))

    # the same maths as the pure function on the concatenated vectors (same seeded sample)
    x = prepare_vectors(img, None, "image")
    p_nb, p_d, p_cells = knn_graph(x, 6, nlist=12, nprobe=3, seed=5, train_size=1000)
    assert np.array_equal(nb, p_nb) and np.array_equal(cells, p_cells)
    assert np.allclose(d, p_d, atol=1e-5)
    # and the reported recall is the recall of the written graph on its seeded sample
    sample = recall_sample_ids(n, 300, 5)
    en, _ = exact_knn(x, 6, sample)
    assert stats["recall_at_k"] == pytest.approx(recall_at_k(nb[sample], en))

    # ids line up with uids: distances recomputed from the vectors looked up BY UID
    by_uid = dict(zip(uids, x))
    node_uid = nodes.column("uid").to_pylist()
    for i in np.random.default_rng(0).choice(n, 40, replace=False):
        for j, dist in zip(nb[i], d[i]):
            assert dist == pytest.approx(float(((by_uid[node_uid[i]] - by_uid[node_uid[j]]) ** 2).sum()), abs=1e-5)

    # committed: a rerun is skipped and returns the stored stats
    assert run_graph_stage(cfg, store) == stats


@pytest.mark.slow
def test_stage_resume_recomputes_only_missing_part_identically(tmp_path, ray_local):
    write_embedding_parts(str(tmp_path), seed=1)
    cfg = make_cfg(str(tmp_path))
    store = Store(cfg.storage)
    run_graph_stage(cfg, store)
    gdir = workdir.stage_dir(cfg.workdir, "graph")
    before = read_graph(cfg)
    mtimes = {i: os.stat(f"{gdir}/{workdir.part_name(i)}.parquet").st_mtime_ns for i in range(len(PART_ROWS))}
    # a job killed after some parts: its last part and the commit marker are missing
    os.remove(f"{gdir}/{workdir.part_name(3)}.parquet")
    os.remove(f"{gdir}/{workdir.SUCCESS}")
    stats = run_graph_stage(cfg, store)
    assert stats["parts_searched"] == 1 and stats["parts_reused"] == len(PART_ROWS) - 1
    assert stats["rows_searched"] == PART_ROWS[3]
    assert stats["steps_run"] == []  # trained and merged index reused
    assert read_graph(cfg).equals(before)
    for i, mtime in mtimes.items():
        if i != 3:
            assert os.stat(f"{gdir}/{workdir.part_name(i)}.parquet").st_mtime_ns == mtime
    # a killed add step: a missing shard is rebuilt and merged, the output stays the same
    for name in os.listdir(f"{gdir}/index"):
        if name.startswith("merged"):
            os.remove(f"{gdir}/index/{name}")
    os.remove(f"{gdir}/{workdir.part_name(0)}.parquet")
    os.remove(f"{gdir}/{workdir.SUCCESS}")
    stats = run_graph_stage(cfg, store)
    assert stats["steps_run"] == ["add", "merge"] and stats["parts_searched"] == 1
    assert read_graph(cfg).equals(before)


@pytest.mark.slow
def test_stage_shuffled_completion_order_gives_the_same_graph(tmp_path, ray_local, monkeypatch):
    img, uids = write_embedding_parts(str(tmp_path / "a"), seed=2)
    write_embedding_parts(str(tmp_path / "b"), seed=2)
    cfg_a, cfg_b = make_cfg(str(tmp_path / "a")), make_cfg(str(tmp_path / "b"))
    stats_a = run_graph_stage(cfg_a, Store(cfg_a.storage))

    import ray

    def shuffled(refs):
        results = ray.get(list(refs))
        for j in np.random.default_rng(3).permutation(len(results))[::-1]:
            yield results[j]

    monkeypatch.setattr(graph_stage, "as_completed", shuffled)
    stats_b = run_graph_stage(cfg_b, Store(cfg_b.storage))
    assert read_graph(cfg_b).equals(read_graph(cfg_a))
    assert stats_b["recall_at_k"] == stats_a["recall_at_k"]
    nodes = pq.read_table(f"{workdir.stage_dir(cfg_b.workdir, 'graph')}/nodes.parquet")
    assert nodes.column("uid").to_pylist() == uids


@pytest.mark.slow
def test_stage_ivfpq_and_image_text_vectors(tmp_path, ray_local):
    img, _ = write_embedding_parts(str(tmp_path), seed=3)
    cfg = make_cfg(str(tmp_path), index="ivfpq", vector="image+text", pq_m=8, pq_bits=6, nprobe=12, k=4)
    stats = run_graph_stage(cfg, Store(cfg.storage))
    assert stats["index"] == "ivfpq" and stats["dim"] == 2 * DIM
    node, nb, d, cells = table_arrays(read_graph(cfg))
    assert not (nb == node[:, None]).any() and (nb >= 0).all() and (d >= 0).all()
    assert 0.3 < stats["recall_at_k"] <= 1.0


@pytest.mark.slow
def test_stage_requires_committed_embeddings(tmp_path, ray_local):
    cfg = make_cfg(str(tmp_path))
    with pytest.raises(RuntimeError, match="committed embed stage"):
        run_graph_stage(cfg, Store(cfg.storage))


@pytest.mark.slow
def test_stage_on_s3_equals_local_run(tmp_path, ray_local, s3_bucket, s3_server):
    storage = {"endpoint_url": s3_server}
    root = f"{s3_bucket}/graph-stage"
    write_embedding_parts(root, seed=4, storage=storage)
    write_embedding_parts(str(tmp_path), seed=4)
    cfg_s3, cfg_local = make_cfg(root, storage=storage), make_cfg(str(tmp_path))
    store = Store(cfg_s3.storage)
    stats = run_graph_stage(cfg_s3, store)
    run_graph_stage(cfg_local, Store(cfg_local.storage))
    assert is_committed(store, cfg_s3, "graph")
    assert read_graph(cfg_s3).equals(read_graph(cfg_local))
    gdir = workdir.stage_dir(cfg_s3.workdir, "graph")
    nodes = store.read_parquet(f"{gdir}/nodes.parquet")
    assert nodes.equals(pq.read_table(f"{workdir.stage_dir(cfg_local.workdir, 'graph')}/nodes.parquet"))
    assert store.exists(f"{gdir}/index/merged.faissindex") and store.exists(f"{gdir}/index/merged.ivfdata")
    assert not store.glob(f"{gdir}/index/shard-*")  # merged index replaced the shards
    assert stats["n_nodes"] == sum(PART_ROWS)
