"""A remote workdir's FAISS index is cached on each node; a cache left behind by an earlier run (a
killed job never clears it) must never be served for another index: after an image run,
``--force`` of the graph stage with text vectors gives the text graph's recall, and another
dimension runs instead of dying on a stale index (issue 13, item 4)."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from pipeline.cli import main
from pipeline.storage import join, node_cache_root
from pipeline.testing import write_pool

pytestmark = pytest.mark.slow


def test_graph_on_other_vectors_never_uses_a_stale_cached_index(tmp_path, s3_server, s3_bucket, s3_store,
                                                                tiny_model_config, ray_local, monkeypatch):
    """Over 60 s when the cores are shared: the embed stage, then the graph stage three times on S3
    (image, text, image+text vectors), each after a run that left its node caches behind."""
    pool = write_pool(f"{s3_bucket}/gcache/pool", store=s3_store, n_shards=2, per_shard=30, seed=3, broken=False)
    raw = {
        "workdir": f"{s3_bucket}/gcache/work",
        "storage": {"endpoint_url": s3_server},
        "input": {"shards": pool.shards},
        "embed": {"model": "d2prune-tiny", "model_config_path": tiny_model_config, "pretrained": None,
                  "batch_size": 16, "cpus_per_actor": 1, "torch_threads": 1},
        # every list probed: the IVF search is exact, so the recall must be (close to) 1
        "graph": {"k": 5, "index": "ivfflat", "nlist": 4, "nprobe": 4, "train_size": 1000, "recall_sample": 40},
        "output": {"url": f"{s3_bucket}/gcache/out"},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    # as a killed job leaves it: the node-local cache of the image index is not cleared
    monkeypatch.setattr("pipeline.runtime.clear_node_caches", lambda namespaces: None)
    cached_before = set(glob.glob(os.path.join(node_cache_root(), "*", "*")))
    assert main(["embed", str(config)]) == 0
    assert main(["graph", str(config), "--set", "graph.vector=image"]) == 0
    stats_url = join(raw["workdir"], "graph", "_stats.json")
    assert s3_store.read_json(stats_url)["recall_at_k"] >= 0.99
    left_behind = set(glob.glob(os.path.join(node_cache_root(), "*", "*"))) - cached_before
    from pipeline.graph import tasks

    if hasattr(tasks, "cache_namespace"):  # this graph stage caches its merged index per node
        assert left_behind, "the image run left no cached index: the test would not test a stale cache"

    for vector, dim in (("text", 32), ("image+text", 64)):
        assert main(["graph", str(config), "--set", f"graph.vector={vector}", "--force"]) == 0
        stats = s3_store.read_json(stats_url)
        assert (stats["vector"], stats["dim"]) == (vector, dim)
        assert stats["recall_at_k"] >= 0.99, f"{vector}: recall {stats['recall_at_k']} (a stale index?)"
    assert left_behind <= set(glob.glob(os.path.join(node_cache_root(), "*", "*")))  # the stale copy was there
