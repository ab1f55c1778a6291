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


def _make_workdir(tmp_path, n_samples: int = 200, samples_per_shard: int = 100, selected_n: int = 60) -> dict:
    """A committed-looking work dir over a generated demo pool, one embedding part per shard (as
    the embed stage writes them); the first `selected_n` samples selected."""
    import pyarrow.parquet as pq

    pool_dir = str(tmp_path / "pool")
    manifest = generate_pool(pool_dir, PoolSpec(n_samples=n_samples, samples_per_shard=samples_per_shard, seed=3))
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
                     {"samples": n_samples, "skipped": {"undecodable_image": 2}, "seconds": 1.5})
    store.write_json(join(wd, "graph", "_stats.json"), {"n_nodes": n_samples, "k": 5, "recall_at_k": 0.97})
    selected = gt.column("uid").to_pylist()[:selected_n]
    _write_selection(store, wd, selected, n_samples)
    for stage_dir in ("embeddings", "graph"):
        store.write_json(join(wd, stage_dir, "_SUCCESS.json"), {"stage": stage_dir, "fingerprint": "x",
                                                                "committed_at": 0})
    return {"workdir": wd, "manifest": manifest, "selected": selected}


def _write_selection(store, wd: str, selected: list[str], n_samples: int) -> None:
    """selected.parquet (without decisions.parquet: a selection committed before it existed) and
    the select stage's stats."""
    b = len(selected)
    store.write_parquet(join(wd, "selection", "selected.parquet"), pa.table({
        "uid": pa.array(selected, pa.string()), "rank": pa.array(np.arange(b, dtype=np.int64)),
        "forward_score": pa.array(np.ones(b)), "final_score": pa.array(np.ones(b)),
        "partition": pa.array(np.zeros(b, np.int32)),
    }))
    store.write_json(join(wd, "selection", "_stats.json"),
                     {"method": "d2", "budget": b, "selected": b, "pruned": n_samples - b, "prefiltered": 0,
                      "overlap_with_exact": 0.95})
    store.write_json(join(wd, "selection", "_SUCCESS.json"), {"stage": "selection", "fingerprint": "x",
                                                              "committed_at": 0})


@pytest.fixture()
def workdir(tmp_path):
    """A committed-looking work dir over a 200-sample demo pool; the first 60 samples selected."""
    return _make_workdir(tmp_path)


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


# -- memory: the pool is read one embedding part at a time -------------------------------------------

SKIPS_PER_PART = 2


def _write_decisions(store, wd: str, selected: list[str]) -> None:
    """selection/decisions.parquet as the select stage writes it: per embedding part its rows in
    order (selected or pruned), then SKIPS_PER_PART skip records of its shard."""
    from pipeline.core.decide import PRUNED, SELECTED, SKIPPED
    from pipeline.formats.selection import decisions_table

    rank_of = {u: i for i, u in enumerate(selected)}
    for url in sorted(store.glob(join(wd, "embeddings", "part-*.parquet"))):
        part = store.read_parquet(url, columns=["uid", "shard", "key"]).to_pydict()
        uids, k = part["uid"], SKIPS_PER_PART
        n = len(uids) + k

        def strings(values):
            return pa.array(values, pa.string())

        table = decisions_table(
            strings(part["shard"] + part["shard"][:1] * k), strings(part["key"] + [f"bad{i}" for i in range(k)]),
            strings(uids + [""] * k), np.array([SELECTED if u in rank_of else PRUNED for u in uids] + [SKIPPED] * k),
            strings([""] * len(uids) + ["undecodable_image"] * k),
            np.array([rank_of.get(u, -1) for u in uids] + [-1] * k), np.zeros(n), strings([""] * n), np.zeros(n))
        store.write_parquet(join(wd, "selection", "decisions.parquet", os.path.basename(url)), table)


def _whole_pool(store, wd: str, selected: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What the report computed before it streamed: every part's scores concatenated, kept by uid."""
    tables = [store.read_parquet(u, columns=["uid", "clip_score"])
              for u in sorted(store.glob(join(wd, "embeddings", "part-*.parquet")))]
    uids = np.concatenate([t.column("uid").to_numpy(zero_copy_only=False) for t in tables]).astype(str)
    scores = np.concatenate([t.column("clip_score").to_numpy() for t in tables]).astype(float)
    return scores, np.isin(uids, np.array(selected, str))


def _without_build_time(page: str) -> str:
    return re.sub(r"built \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", page)


def test_report_reads_one_part_at_a_time_and_shows_what_the_whole_pool_gives(tmp_path, monkeypatch):
    """Six parts of 40 rows, a random third selected: no read returns more than one part's rows
    (decisions: plus its skip records), no vector column is read whole, and the histogram counts,
    the map's rows and the example rows are those the whole pool in memory gives."""
    import pipeline.formats.embeddings as embeddings
    import pipeline.report as report
    from pipeline.formats.embeddings import list_parts, read_vectors_at
    from pipeline.report.plots import map_rows

    rows_per_part = 40
    made = _make_workdir(tmp_path, n_samples=240, samples_per_shard=rows_per_part)
    store, wd = Store(), made["workdir"]
    uids = [u for url in sorted(store.glob(join(wd, "embeddings", "part-*.parquet")))
            for u in store.read_parquet(url, columns=["uid"]).column("uid").to_pylist()]
    selected = [str(u) for u in np.random.default_rng(1).choice(uids, 80, replace=False)]
    _write_selection(store, wd, selected, len(uids))
    _write_decisions(store, wd, selected)
    scores, kept = _whole_pool(store, wd, selected)

    reads = []
    real_read = Store.read_parquet

    def counted_read(self, url, columns=None):
        table = real_read(self, url, columns)
        reads.append((url, tuple(columns or ()), table.num_rows))
        return table

    def whole_column(*args, **kwargs):
        raise AssertionError("the report read a column of the whole pool")

    drawn, asked = {}, []
    real_histogram, real_map, real_samples = report.score_histogram, report.embedding_map, report.read_samples

    def histogram(*args):
        drawn["histogram"] = args
        return real_histogram(*args)

    def embedding_map(*args):
        drawn["map"] = args
        return real_map(*args)

    def samples(store_, parts, rows):
        asked.append(np.asarray(rows).tolist())
        return real_samples(store_, parts, rows)

    monkeypatch.setattr(Store, "read_parquet", counted_read)
    monkeypatch.setattr(embeddings, "read_column", whole_column)
    monkeypatch.setattr(report, "score_histogram", histogram)
    monkeypatch.setattr(report, "embedding_map", embedding_map)
    monkeypatch.setattr(report, "read_samples", samples)
    page = open(build_report(wd, store), encoding="utf-8").read()
    _assert_self_contained(page)
    report_reads = list(reads)

    # bounded: one part's rows per read (decisions files: plus the shard's skip records)
    assert report_reads and max(n for _, _, n in report_reads) <= rows_per_part + SKIPS_PER_PART
    assert not any("image_embedding" in cols or "text_embedding" in cols for _, cols, _ in report_reads)
    assert not any(url.endswith("selected.parquet") for url, _, _ in report_reads)  # no uid join
    # the histogram: the old whole-pool bins and counts (integers: no floating-point tolerance)
    edges, kept_counts, dropped_counts, kept_n, dropped_n = drawn["histogram"]
    np.testing.assert_array_equal(edges, np.linspace(scores.min(), scores.max() + 1e-9, 40))
    np.testing.assert_array_equal(kept_counts, np.histogram(scores[kept], edges)[0])
    np.testing.assert_array_equal(dropped_counts, np.histogram(scores[~kept], edges)[0])
    assert (kept_n, dropped_n) == (80, 160) == (kept_counts.sum(), dropped_counts.sum())
    # the map: the same seeded rows, their kept flags and vectors
    vectors, map_kept, n = drawn["map"]
    assert n == 240
    np.testing.assert_array_equal(map_kept, kept[map_rows(240)])
    parts, _ = list_parts(store, join(wd, "embeddings"), "image")
    np.testing.assert_array_equal(vectors, read_vectors_at(store, parts, "image", map_rows(240)))
    # the example grids: the rows the whole-pool sampling drew (same seed, same draws)
    rng = np.random.default_rng(0)
    kept_rows, dropped_rows = np.flatnonzero(kept), np.flatnonzero(~kept)
    assert asked == [np.sort(rng.choice(kept_rows, 16, replace=False)).tolist(),
                     np.sort(rng.choice(dropped_rows, 16, replace=False)).tolist(),
                     dropped_rows[np.argsort(scores[dropped_rows], kind="stable")][:16].tolist()]
    lowest = re.search(r"Dropped with the lowest CLIP scores</h3>(.*?)</div>", page, re.S).group(1)
    assert re.findall(r"score (\d\.\d{3})", lowest) == [f"{scores[r]:.3f}" for r in asked[2]]

    # a selection committed before decisions.parquet: joined by uid, the same page
    store.rm(join(wd, "selection", "decisions.parquet"), recursive=True)
    legacy = open(build_report(wd, store), encoding="utf-8").read()
    assert _without_build_time(legacy) == _without_build_time(page)

    # a decisions file that does not start with its part's rows is named, not trusted
    _write_decisions(store, wd, selected)
    url = join(wd, "selection", "decisions.parquet", "part-00002.parquet")
    store.write_parquet(url, real_read(store, url).slice(0, 10))
    broken = open(build_report(wd, store), encoding="utf-8").read()
    assert "embeddings or selection unreadable" in broken and "part-00002" in broken
