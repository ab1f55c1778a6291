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
