"""The HTML report, built from a hand-made work directory that follows the on-disk contracts.

No Ray and no model here: the embedding parts, selection and stage stats are written directly (as
the stages would commit them) next to a small generated demo pool, so these tests are fast and
exercise exactly what build_report reads. The end-to-end report of a real run is in test_demo.py.
"""

from __future__ import annotations

import base64
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from pipeline.demo.pool import PoolSpec, generate_pool
from pipeline.demo.report_section import GROUND_TRUTH_FILE, demo_extras
from pipeline.report import REPORT_NAME, build_report, pca_2d
from pipeline.storage import Store, expand_urls, join

DIM = 16


def _fixed_list(values: np.ndarray) -> pa.Array:
    flat = pa.array(values.astype(np.float16).ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


@pytest.fixture()
def workdir(tmp_path):
    """A committed-looking work dir over a 200-sample demo pool; the first 60 samples selected."""
    import pyarrow.parquet as pq

    pool_dir = str(tmp_path / "pool")
    manifest = generate_pool(pool_dir, PoolSpec(n_samples=200, samples_per_shard=100, seed=3))
    gt = pq.read_table(manifest["ground_truth"])
    store = Store()
    wd = str(tmp_path / "work")
    rng = np.random.default_rng(0)
    shards = expand_urls(manifest["shards"])
    for i, shard in enumerate(shards):
        rows = [r for r in range(gt.num_rows) if gt.column("shard")[r].as_py() == os.path.basename(shard)]
        n = len(rows)
        emb = rng.normal(size=(n, DIM))
        table = pa.table({
            "uid": pa.array([gt.column("uid")[r].as_py() for r in rows]),
            "shard": pa.array([shard] * n),
            "key": pa.array([gt.column("key")[r].as_py() for r in rows]),
            "clip_score": pa.array(rng.uniform(0.0, 0.5, n).astype(np.float32)),
            "image_embedding": _fixed_list(emb),
            "text_embedding": _fixed_list(emb + 0.1),
        })
        store.write_json(join(wd, "embeddings", f"part-{i:05d}.stats.json"),
                         {"shard": shard, "samples": n, "skipped": {}})
        store.write_parquet(join(wd, "embeddings", f"part-{i:05d}.parquet"), table)
    store.write_json(join(wd, "embeddings", "_stats.json"),
                     {"samples": 200, "skipped": {"undecodable_image": 2}, "seconds": 1.5})
    store.write_json(join(wd, "graph", "_stats.json"), {"n_nodes": 200, "k": 5, "recall_at_k": 0.97})
    selected = gt.column("uid").to_pylist()[:60]
    store.write_parquet(join(wd, "selection", "selected.parquet"), pa.table({
        "uid": pa.array(selected), "rank": pa.array(np.arange(60, dtype=np.int64)),
        "forward_score": pa.array(np.ones(60)), "final_score": pa.array(np.ones(60)),
        "partition": pa.array(np.zeros(60, np.int32)),
    }))
    store.write_json(join(wd, "selection", "_stats.json"),
                     {"method": "d2", "budget": 60, "selected": 60, "pruned": 140, "prefiltered": 0,
                      "overlap_with_exact": 0.95})
    for stage_dir in ("embeddings", "graph", "selection"):
        store.write_json(join(wd, stage_dir, "_SUCCESS.json"), {"stage": stage_dir, "fingerprint": "x",
                                                                "committed_at": 0})
    return {"workdir": wd, "manifest": manifest, "selected": selected}


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]+)"', page)


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"https?://", page), "the report must not reference any URL (it opens offline)"
    assert not re.search(r"<(script|link)\b", page), "no scripts or external stylesheets"
    for src in _images(page):
        assert src.startswith("data:image/"), src[:60]
        base64.b64decode(src.split(",", 1)[1], validate=True)


def test_report_sections_images_and_no_urls(workdir):
    url = build_report(workdir["workdir"])
    assert url == join(workdir["workdir"], REPORT_NAME)
    page = open(url, encoding="utf-8").read()
    _assert_self_contained(page)
    for heading in ("Summary", "What was kept", "Stages", "Kept (a random sample)", "Dropped (a random sample)"):
        assert heading in page
    # the stage numbers come from the _stats.json files
    assert "recall_at_k" in page and "0.97" in page
    assert "undecodable_image" in page
    assert "overlap_with_exact" in page
    # 2 plots + 3 grids of 16 thumbnails, all decodable images from the shards
    images = _images(page)
    assert sum(src.startswith("data:image/png") for src in images) == 2
    assert sum(src.startswith("data:image/jpeg") for src in images) == 48
    assert "image not available" not in page
    # captions of kept examples are the pool's captions
    import pyarrow.parquet as pq

    gt = pq.read_table(workdir["manifest"]["ground_truth"]).to_pydict()
    captions = dict(zip(gt["uid"], gt["caption"]))
    assert sum(captions[u].replace("&", "&amp;") in page for u in workdir["selected"]) >= 8
    # no demo ground truth in this work dir: no such section
    assert "against its ground truth" not in page


def test_report_shows_demo_ground_truth_when_present(workdir):
    from pipeline.demo.evaluate import evaluate_selection
    import pyarrow.parquet as pq

    gt = pq.read_table(workdir["manifest"]["ground_truth"])
    results = {"d2": evaluate_selection(gt, workdir["selected"]),
               "random": evaluate_selection(gt, gt.column("uid").to_pylist()[-60:])}
    Store().write_json(join(workdir["workdir"], GROUND_TRUTH_FILE), {
        "pool": {k: workdir["manifest"][k] for k in ("samples", "planted", "ground_truth")},
        "budget": 60, "titles": {"d2": "D2", "random": "random"},
        "context": {"pool_mismatch_share": 0.1, "rare_shape": "heart", "rare_colour": "cyan"},
        "results": results, "settings": {"baselines": "same budget"},
    })
    store = Store()
    page = open(build_report(workdir["workdir"], store, demo_extras(store, workdir["workdir"])),
                encoding="utf-8").read()
    _assert_self_contained(page)
    assert "The demo against its ground truth" in page
    assert "planted mismatched captions dropped" in page
    d2_dropped = f"{results['d2']['mismatches_dropped']:.1%}"
    assert d2_dropped in page
    # the comparison plot is one more embedded PNG
    assert sum(src.startswith("data:image/png") for src in _images(page)) == 3
    # thumbnails of planted samples carry their ground-truth badge
    assert "mismatched caption" in page or "near-duplicate" in page or "rare " in page


def test_report_survives_missing_pieces(workdir):
    store = Store()
    wd = workdir["workdir"]
    # the pool is gone (examples cannot be read) and the selection is not committed
    store.rm(join(wd, "selection"), recursive=True)
    page = open(build_report(wd), encoding="utf-8").read()
    _assert_self_contained(page)
    assert "No selection committed yet" in page
    assert "Stage select has no _stats.json" in page
    # nothing committed at all still gives a page
    empty = os.path.join(os.path.dirname(wd), "empty")
    os.makedirs(empty)
    page = open(build_report(empty), encoding="utf-8").read()
    assert "No committed stage found" in page


def test_report_without_input_shards_marks_missing_images(workdir):
    import shutil

    shutil.rmtree(os.path.join(workdir["manifest"]["ground_truth"].rsplit("/", 1)[0], "shards"))
    page = open(build_report(workdir["workdir"]), encoding="utf-8").read()
    _assert_self_contained(page)
    assert "image not available" in page
    assert "unreadable shards" in page


def test_report_of_missing_workdir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_report(str(tmp_path / "does-not-exist"))


def test_pca_2d_finds_the_main_axes():
    rng = np.random.default_rng(0)
    x = np.zeros((500, 5))
    x[:, 2] = rng.normal(scale=10, size=500)  # the widest axis
    x[:, 4] = rng.normal(scale=3, size=500)
    x += rng.normal(scale=0.1, size=x.shape)
    xy = pca_2d(x)
    assert xy.shape == (500, 2)
    assert abs(np.corrcoef(xy[:, 0], x[:, 2])[0, 1]) > 0.99
    assert abs(np.corrcoef(xy[:, 1], x[:, 4])[0, 1]) > 0.99
    assert xy[:, 0].std() > xy[:, 1].std()


# -- the "dropped as near-copy of …" gallery --------------------------------------------------------

_PAIR = re.compile(r'<div class="pair" data-pruned="([^"]+)" data-kept="([^"]+)" data-distance="([^"]+)">'
                   r'(.*?</figure>.*?</figure>)</div>', re.S)


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory, ray_local):
    """The demo's job (its config and shipped tiny CLIP) on a 400-sample demo pool, through the
    real embed, graph and select stages; exact kNN so the reference below can read the graph."""
    from pipeline.config import config_from_dict
    from pipeline.demo.run import demo_config
    from pipeline.job import run_one

    out = tmp_path_factory.mktemp("gallery")
    manifest = generate_pool(str(out / "pool"), PoolSpec(n_samples=400, samples_per_shard=200, seed=3))
    raw = demo_config(str(out), manifest["shards"], quick=True)
    raw["graph"].update(index="flat", recall_sample=0)
    raw["select"].update(partitions=2)  # two nodes files
    raw["embed"].update(num_gpus_per_actor=0)
    cfg = config_from_dict(raw)
    store = Store()
    for stage in ("embed", "graph", "select"):
        run_one(cfg, store, stage)
    return cfg, manifest


def _reference_pairs(store, workdir):
    """Every (pruned, blame) pair of the committed selection with its squared distance on the graph
    edge, read straight from the nodes and graph files."""
    import pyarrow.parquet as pq

    from pipeline.formats.graph import read_graph

    graph = read_graph(store, join(workdir, "graph"))
    nodes = pa.concat_tables([pq.read_table(u) for u in store.glob(join(workdir, "selection", "nodes", "part-*.parquet"))])
    pairs = {}
    for node, blame in zip(nodes.column("node").to_pylist(), nodes.column("blame_node").to_pylist()):
        if blame < 0:
            continue
        if blame in graph["neighbors"][node]:
            sq = graph["sq_distances"][node][list(graph["neighbors"][node]).index(blame)]
        else:
            sq = graph["sq_distances"][blame][list(graph["neighbors"][blame]).index(node)]
        pairs[(graph["uids"][node], graph["uids"][blame])] = float(np.sqrt(max(sq, 0.0)))
    return pairs


@pytest.mark.slow
def test_near_copy_gallery_shows_the_closest_pruned_pairs_with_their_blame(demo_job):
    import pyarrow.parquet as pq

    cfg, manifest = demo_job
    store = Store()
    page = open(build_report(cfg.workdir, store, input_cfg=cfg.input), encoding="utf-8").read()
    _assert_self_contained(page)
    assert "Dropped as near-copy of a kept sample" in page
    shown = _PAIR.findall(page)
    reference = _reference_pairs(store, cfg.workdir)
    assert len(reference) > 12 and len(shown) == 12
    selected = set(pq.read_table(join(cfg.workdir, "selection", "selected.parquet")).column("uid").to_pylist())
    distances = [float(d) for _, _, d, _ in shown]
    assert distances == sorted(distances)
    # the 12 closest of all pruned samples and their blame, at the graph's distance
    np.testing.assert_allclose(distances, sorted(reference.values())[:12], rtol=1e-6)
    gt = pq.read_table(manifest["ground_truth"]).to_pydict()
    caption = dict(zip(gt["uid"], gt["caption"]))
    group = dict(zip(gt["uid"], gt["dup_group"]))
    for pruned, kept, distance, body in shown:
        assert (pruned, kept) in reference and reference[(pruned, kept)] == pytest.approx(float(distance), rel=1e-6)
        assert kept in selected and pruned not in selected
        images = _images(body)
        assert len(images) == 2 and all(src.startswith("data:image/jpeg") for src in images)
        for uid in (pruned, kept):
            assert html_escape(caption[uid][:140]) in body
    # the demo pool plants near-duplicate groups (a picture and re-encoded copies, one caption):
    # D2 keeps one and prunes the rest, and they are the closest pairs the gallery shows
    copies = [group[p] >= 0 and group[p] == group[k] for p, k, _, _ in shown]
    assert copies[0] and sum(copies) >= 8, copies

    # a selection without per-node blame (an older workdir): no gallery, the rest of the report as before
    import shutil

    nodes_dir = join(cfg.workdir, "selection", "nodes")
    backup = nodes_dir + ".bak"
    shutil.move(nodes_dir, backup)
    try:
        page = open(build_report(cfg.workdir, store, input_cfg=cfg.input), encoding="utf-8").read()
    finally:
        shutil.move(backup, nodes_dir)
    assert "near-copy" not in page and "Kept (a random sample)" in page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_near_copies_edges_in_either_direction_and_the_memory_cap(tmp_path):
    """find_near_copies on a hand-made graph: an edge listed only in the blame node's row is found
    (second pass); pairs closer than every other come first; with the waiting heap capped below
    what it needs the result says it may not be exact."""
    from pipeline.formats.embeddings import EmbeddingPart
    from pipeline.formats.graph import graph_part_table
    from pipeline.formats.selection import nodes_table
    from pipeline.report.near_copies import find_near_copies

    store = Store()
    wd = str(tmp_path)
    # 8 nodes in two parts of 4; k=2. Pruned -> blame (sq distance), by construction:
    #   1 -> 0 (0.30, in 1's row), 5 -> 4 (0.10, only in 4's row), 6 -> 2 (0.05, in 6's row),
    #   3 -> 7 (0.20, only in 7's row); 0, 2, 4, 7 selected (no blame).
    k = 2
    neighbors = np.full((8, k), -1, np.int64)
    sq = np.full((8, k), np.inf, np.float32)
    rows = {0: [(1, 0.30)], 1: [(0, 0.30)], 2: [(6, 0.05)], 3: [(2, 0.01), (1, 0.02)],
            4: [(5, 0.10)], 5: [(6, 0.03), (7, 0.04)], 6: [(2, 0.05)], 7: [(3, 0.20)]}
    for node, edges in rows.items():
        for j, (other, d) in enumerate(edges):
            neighbors[node, j], sq[node, j] = other, d
    blame = np.array([-1, 0, -1, 7, -1, 4, 2, -1])
    parts = []
    for p in range(2):
        lo, hi = 4 * p, 4 * p + 4
        store.write_parquet(join(wd, "graph", f"part-{p:05d}.parquet"),
                            graph_part_table(np.arange(lo, hi), neighbors[lo:hi], sq[lo:hi], np.zeros(4)))
        parts.append(EmbeddingPart(f"part-{p:05d}", join(wd, "embeddings", f"part-{p:05d}.parquet"), 4, lo))
    for f, nodes in enumerate(([0, 2, 5, 7], [1, 3, 4, 6])):  # two partitions, each in node order
        nodes = np.array(nodes)
        store.write_parquet(join(wd, "selection", "nodes", f"part-{f:05d}.parquet"), nodes_table(
            nodes, pa.array([f"{n:032x}" for n in nodes]), np.zeros(4), np.zeros(4, bool), np.full(4, -1),
            np.zeros(4), np.zeros(4), blame[nodes], np.where(blame[nodes] >= 0, 1.0, 0.0)))
    sel_dir, graph_dir = join(wd, "selection"), join(wd, "graph")

    found = find_near_copies(store, sel_dir, graph_dir, parts, n=3)
    assert [(c.pruned, c.kept) for c in found.pairs] == [(6, 2), (5, 4), (3, 7)]
    np.testing.assert_allclose([c.sq_distance for c in found.pairs], [0.05, 0.10, 0.20], rtol=1e-6)
    assert found.exact and found.unmatched == 0
    found = find_near_copies(store, sel_dir, graph_dir, parts, n=10)
    assert [(c.pruned, c.kept) for c in found.pairs] == [(6, 2), (5, 4), (3, 7), (1, 0)]
    # one waiting pair at most: 3 -> 7 (bound 0.02) is kept over 5 -> 4 (bound 0.04), which is closer
    # than the farthest pair shown: said, not hidden
    capped = find_near_copies(store, sel_dir, graph_dir, parts, n=3, pending_cap=1)
    assert not capped.exact and (5, 4) not in [(c.pruned, c.kept) for c in capped.pairs]
    # no nodes files: no gallery
    assert find_near_copies(store, join(wd, "nowhere"), graph_dir, parts) is None
