"""The embed stage end to end on small broken pools (local and S3), with the tiny open_clip model:
row counts, norms, scores, skip counts, determinism, resume, checkpoint loading (the precomputed
encoder: test_datacomp.py)."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from pipeline.embed import parts
from pipeline.embed.dataset import build_embed_dataset
from pipeline.embed.model import ModelSpec, image_pipeline, preprocess_config
from pipeline.embed.parts import ShardedUidRegistry, UidRegistry, uid_hashes
from pipeline.formats.embeddings import SKIPPED_DIR
from pipeline.formats.webdataset import ShardError
from pipeline.errors import StaleStageError
from pipeline.job import run_one, stage_fingerprints
from pipeline.stage import Hooks
from pipeline.storage import Store, join
from pipeline.testing import (
    TINY_MODEL_CONFIG,
    TINY_MODEL_NAME,
    make_config,
    render_image,
    skip_record_mismatches,
)
from pipeline.workdir import part_name, stage_dir

slow = pytest.mark.slow


def run_embed_stage(cfg, store, on_part_committed=None):
    """The embed stage through the job runner (skip / check / claim / run / commit)."""
    hooks = Hooks(part_committed=(lambda stage, index: on_part_committed(index)) if on_part_committed else None)
    return run_one(cfg, store, "embed", hooks)


def _pool_cfg(workdir, manifest, **sections):
    return make_config(str(workdir), manifest.shards, **sections)


def _read_parts(store, cfg, n):
    directory = stage_dir(cfg.workdir, "embed")
    return [store.read_parquet(join(directory, part_name(i) + ".parquet")) for i in range(n)]


def _vectors(table, column):
    return np.asarray(table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(
        table.num_rows, -1).astype(np.float32)


def _check_against_manifest(store, cfg, manifest, stats):
    parts = _read_parts(store, cfg, len(manifest.shards))
    for i, (table, kept) in enumerate(zip(parts, manifest.kept)):
        assert table.column("uid").to_pylist() == [k["uid"] for k in kept], f"part {i}"
        assert table.column("key").to_pylist() == [k["key"] for k in kept]
        assert set(table.column("shard").to_pylist()) <= {manifest.shards[i]}
        assert table.column("caption").to_pylist() == [k["caption"] for k in kept]
        part_stats = store.read_json(join(stage_dir(cfg.workdir, "embed"), part_name(i) + ".stats.json"))
        notes = {"uid_notes": {"uid_fallback": manifest.without_json_uid[i]}} if manifest.without_json_uid[i] else {}
        assert part_stats == {"shard": manifest.shards[i], "samples": len(kept),
                              "skipped": dict(sorted(manifest.skipped[i].items())), **notes}
    # one skip record per skipped sample, the right samples, in shard order, matching the stats
    assert skip_record_mismatches(store, stage_dir(cfg.workdir, "embed"), manifest) == []
    assert stats["samples"] == manifest.n_kept
    assert stats["skipped"] == dict(sorted(manifest.skipped_total.items()))
    if sum(manifest.without_json_uid):  # said in the stats: subset.npy cannot select these
        assert stats["uid_notes"] == {"uid_fallback": sum(manifest.without_json_uid)}
        assert "DataComp's resharder reads the uid from each sample's json" in stats["subset_file_warning"]
    assert store.exists(join(stage_dir(cfg.workdir, "embed"), "_SUCCESS.json"))
    assert store.read_json(join(stage_dir(cfg.workdir, "embed"), "_stats.json"))["samples"] == manifest.n_kept
    return parts


@pytest.fixture(scope="module")
def local_run(ray_local, small_pool, tmp_path_factory):
    store = Store()
    cfg = _pool_cfg(tmp_path_factory.mktemp("embed") / "work", small_pool)
    stats = run_embed_stage(cfg, store)
    return cfg, stats, _read_parts(store, cfg, len(small_pool.shards))


@slow
def test_embed_local_pool_rows_norms_scores_and_skips(local_run, small_pool):
    cfg, stats, _ = local_run
    parts = _check_against_manifest(Store(), cfg, small_pool, stats)
    schema = parts[0].schema
    assert schema.names == ["uid", "shard", "key", "clip_score", "image_embedding", "text_embedding", "caption",
                            "original_width", "original_height", "sha256"]
    # the sha256 of each image member's bytes, as the reader read them
    digests = [d for p in parts for d in p.column("sha256").to_pylist()]
    assert all(d is not None and re.fullmatch("[0-9a-f]{64}", d) for d in digests)
    # no original size in these jsons: the decoded size (the pool's pictures are 48x48)
    table = pa.concat_tables(parts)
    assert set(table.column("original_width").to_pylist()) == set(table.column("original_height").to_pylist()) == {48}
    dim = TINY_MODEL_CONFIG["embed_dim"]
    assert schema.field("image_embedding").type == pa.list_(pa.float16(), dim)
    assert schema.field("text_embedding").type == pa.list_(pa.float16(), dim)
    assert schema.field("clip_score").type == pa.float32()
    table = pa.concat_tables(parts)
    image, text = _vectors(table, "image_embedding"), _vectors(table, "text_embedding")
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=2e-3)
    score = table.column("clip_score").to_numpy()
    np.testing.assert_allclose(score, (image * text).sum(axis=1), atol=3e-3)
    assert len(set(table.column("uid").to_pylist())) == table.num_rows
    # different pictures get different embeddings (the model actually saw the pixels)
    assert len({row.tobytes() for row in image}) == table.num_rows
    assert stats["samples_this_run"] == small_pool.n_kept and stats["samples_per_s"] > 0
    assert stats["device"] == "cpu" and stats["embedding_dim"] == dim


@slow
def test_embed_is_deterministic(local_run, small_pool, tmp_path):
    cfg, _, first = local_run
    store = Store()
    # a different actor count and read parallelism must not change a single bit (the thread count
    # may, on some CPUs: it is part of the stage's fingerprint instead, checked below)
    again = _pool_cfg(tmp_path / "work", small_pool, embed={"num_actors": 2, "cpus_per_actor": 0.5})
    run_embed_stage(again, store)
    for a, b in zip(first, _read_parts(store, again, len(small_pool.shards))):
        assert a.equals(b)
    threads = _pool_cfg(tmp_path / "work", small_pool, embed={"torch_threads": 2})
    assert stage_fingerprints(threads)["embed"] != stage_fingerprints(cfg)["embed"]
    with pytest.raises(StaleStageError, match="--force-from embed"):
        run_embed_stage(threads, store)  # a resume with another thread count never mixes parts


@slow
def test_resume_after_kill_embeds_each_shard_once(local_run, small_pool, tmp_path):
    _, _, reference = local_run
    store = Store()
    cfg = _pool_cfg(tmp_path / "work", small_pool)
    directory = stage_dir(cfg.workdir, "embed")

    class Killed(Exception):
        pass

    def kill_after_two(index):
        if index == 1:
            raise Killed()

    with pytest.raises(Killed):
        run_embed_stage(cfg, store, on_part_committed=kill_after_two)
    committed = sorted(n for n in os.listdir(directory) if n.endswith(".parquet"))
    # the writer actors commit in parallel: parts after the second may be in too
    assert committed[:2] == ["part-00000.parquet", "part-00001.parquet"]
    # each part after its skip records, in a folder of their own
    assert sorted(os.listdir(os.path.join(directory, SKIPPED_DIR))) == committed
    assert not store.exists(join(directory, "_SUCCESS.json"))
    before = {n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in committed}

    embedded = []
    stats = run_embed_stage(cfg, store, on_part_committed=embedded.append)
    # a writer actor busy when the driver stopped may still commit its part after `committed` was
    # listed (atomically, same bytes): the restart keeps that part too. Each part is embedded once
    # across the two runs, and nothing committed before the restart is touched.
    resumed = [part_name(i) + ".parquet" for i in range(4) if i not in embedded]
    assert not set(committed) - set(resumed) and len(set(embedded)) == len(embedded)
    assert {n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in committed} == before
    assert stats["shards_resumed"] == len(resumed) and stats["shards_embedded"] == 4 - len(resumed)
    assert stats["samples"] == small_pool.n_kept
    assert stats["skipped"] == dict(sorted(small_pool.skipped_total.items()))
    for a, b in zip(reference, _read_parts(store, cfg, len(small_pool.shards))):
        assert a.equals(b)

    # a lost part in the middle is re-embedded with the same cross-shard de-duplication
    os.remove(os.path.join(directory, "part-00002.parquet"))
    os.remove(os.path.join(directory, "_SUCCESS.json"))
    embedded.clear()
    run_embed_stage(cfg, store, on_part_committed=embedded.append)
    assert embedded == [2]
    assert _read_parts(store, cfg, 4)[2].equals(reference[2])

    # a committed stage is not run again
    embedded.clear()
    assert run_embed_stage(cfg, store, on_part_committed=embedded.append)["samples"] == small_pool.n_kept
    assert embedded == []


@slow
def test_embed_through_s3(ray_local, s3_store, s3_pool, s3_bucket, s3_server):
    cfg = make_config(f"{s3_bucket}/work-embed", s3_pool.shards, storage={"endpoint_url": s3_server})
    stats = run_embed_stage(cfg, s3_store)
    parts = _check_against_manifest(s3_store, cfg, s3_pool, stats)
    assert sum(p.num_rows for p in parts) == s3_pool.n_kept
    assert s3_store.ls(stage_dir(cfg.workdir, "embed"))[:1] == ["_FINGERPRINT.json"]


@slow
def test_local_checkpoint_is_loaded(ray_local, small_pool, tiny_checkpoint, local_run, tmp_path):
    import open_clip
    import torch

    from pipeline.embed.model import register_model_config
    from pipeline.formats.webdataset import decode_image, iter_shard_samples

    import io
    import json
    import tarfile

    store = Store()
    # a second shard with no usable sample (captions only): its part is empty but typed like the rest
    no_images = tmp_path / "no-images.tar"
    with tarfile.open(no_images, "w") as tf:
        for i in range(3):
            for ext, data in (("txt", b"a caption"), ("json", json.dumps({"uid": f"x{i}"}).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cfg = make_config(str(tmp_path / "work"), [small_pool.shards[0], str(no_images)],
                      embed={"pretrained": tiny_checkpoint})
    stats = run_embed_stage(cfg, store)
    table, empty = _read_parts(store, cfg, 2)
    assert empty.num_rows == 0 and empty.schema.equals(table.schema)
    assert stats["per_shard"][1]["skipped"] == {"missing_image": 3}
    assert table.column("uid").to_pylist() == [k["uid"] for k in small_pool.kept[0]]
    # the same samples through open_clip directly, with the model loaded from the same file
    register_model_config(TINY_MODEL_NAME, TINY_MODEL_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL_NAME, pretrained=tiny_checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL_NAME)
    samples = {s.uid: s for s in iter_shard_samples(store, small_pool.shards[0], cfg.input) if s.problem is None}
    uids = table.column("uid").to_pylist()[:8]
    images = torch.stack([preprocess(decode_image(samples[u].image_bytes)) for u in uids])
    with torch.no_grad():
        expected_image = torch.nn.functional.normalize(model.encode_image(images), dim=-1).numpy()
        expected_text = torch.nn.functional.normalize(
            model.encode_text(tokenizer([samples[u].caption for u in uids])), dim=-1).numpy()
    np.testing.assert_allclose(_vectors(table, "image_embedding")[:8], expected_image, atol=2e-3)
    np.testing.assert_allclose(_vectors(table, "text_embedding")[:8], expected_text, atol=2e-3)
    # and it is not the seeded random model of the default run
    random_weights = local_run[2][0]
    assert not np.allclose(_vectors(random_weights, "image_embedding")[:8], expected_image, atol=1e-2)


@slow
def test_missing_shard_fails_before_any_work(ray_local, small_pool, tmp_path):
    missing = small_pool.shards[0].replace("00000.tar", "00042.tar")
    cfg = make_config(str(tmp_path / "work"), small_pool.shards + [missing])
    with pytest.raises(ShardError, match="00042.tar: not found"):
        run_embed_stage(cfg, Store())
    assert not os.path.exists(tmp_path / "work")


@slow
def test_decoding_runs_in_tasks_not_in_the_model_actor(ray_local, small_pool, tmp_path):
    import json

    spec = ModelSpec(TINY_MODEL_NAME, None, json.dumps(TINY_MODEL_CONFIG))
    pp_json = json.dumps(preprocess_config(spec))
    cfg = make_config(str(tmp_path / "work"), small_pool.shards, embed={"num_actors": 2, "cpus_per_actor": 0.5})
    shards = list(enumerate(small_pool.shards))
    ds = build_embed_dataset(cfg, Store(), spec, pp_json, shards, gpus=0, threads=1, batch_size=8)
    ds = ds.materialize()
    summary = ds.stats()
    # two physical operators: the read/decode tasks and the actor pool, never one fused worker
    assert "read_and_preprocess)->MapBatches(ClipEmbedder" not in summary
    assert "MapBatches(read_and_preprocess)" in summary and "MapBatches(ClipEmbedder)" in summary
    rows = ds.to_pandas()
    # each shard's rows, its end marker, and filler up to whole batches of 8
    markers = rows[rows.is_marker & (rows.marker_samples >= 0)]
    assert sorted(markers.shard_index) == list(range(len(shards)))
    samples = rows[~rows.is_marker]
    assert len(rows) % 8 == 0 and len(samples) == sum(markers.marker_samples)
    # one chunk = one forward (its rows share the forward's end time), however the blocks of the
    # 4 shards' read tasks reached the 2 actors: never split over two forwards
    forwards = samples.groupby("shard_index").embedded_at.nunique()
    sizes = samples.groupby(["shard_index", "embedded_at"]).size()
    for shard, counts in sizes.groupby(level=0):
        n = int(markers[markers.shard_index == shard].marker_samples.iloc[0])
        assert sorted(counts.tolist(), reverse=True) == [8] * (n // 8) + ([n % 8] if n % 8 else []), shard
        assert forwards[shard] == len(counts)


def test_split_transform_equals_model_transform():
    import open_clip
    import torch

    spec = ModelSpec("ViT-B-32", None)
    pp = preprocess_config(spec)
    pipe = image_pipeline(pp)
    assert pipe.split and pipe.size == (224, 224)
    _, _, full = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, load_weights=False)
    image, _ = render_image(np.random.default_rng(0), 300)
    image = image.resize((300, 260))
    expected = full(image)
    pixels = torch.from_numpy(pipe(image).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(pipe.mean).view(3, 1, 1)
    std = torch.tensor(pipe.std).view(3, 1, 1)
    torch.testing.assert_close((pixels - mean) / std, expected, atol=1e-5, rtol=0)


def test_preprocess_config_matches_a_real_build():
    import open_clip

    from pipeline.embed.model import register_model_config

    register_model_config(TINY_MODEL_NAME, TINY_MODEL_CONFIG)
    spec = ModelSpec(TINY_MODEL_NAME, None, None)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    real = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.visual.preprocess_cfg.items()}
    assert preprocess_config(spec) == real


@pytest.mark.parametrize("actors", [0, 3])
def test_uid_registry_matches_a_set(actors, request):
    """In the driver, and split by uid hash over Ray actors (embed.uid_registry_actors > 1)."""
    if actors:
        request.getfixturevalue("ray_local")
    rng = np.random.default_rng(0)
    registry, reference = (ShardedUidRegistry(actors) if actors else UidRegistry()), set()
    for _ in range(30):
        batch = [f"u{v}" for v in rng.integers(0, 3000, size=int(rng.integers(1, 200)))]
        hashes = uid_hashes(batch)
        assert registry.contains(hashes).tolist() == [u in reference for u in batch]
        registry.add(hashes)
        reference.update(batch)
    assert len(set(uid_hashes(sorted(reference)).tolist())) == len(reference)
    assert len(registry) >= len(reference)  # levels are unique; merged ones dedupe
    if actors:
        assert len(registry.actors) == 3
        registry.close()


def test_uid_registry_actors_auto_follows_the_estimated_pool():
    per_actor = parts.UIDS_PER_REGISTRY_ACTOR
    assert parts.registry_actor_count("auto", 10_000, 1_000) == 1  # 10^7 uids: one actor
    assert parts.registry_actor_count("auto", 10_000, 128_000) == math.ceil(1.28e9 / per_actor)  # DataComp xlarge
    assert parts.registry_actor_count(4, 10, 2) == 4  # asked for: whatever the size


def test_actor_pool_leaves_cpus_to_the_readers_and_refuses_a_minimum_that_cannot():
    from pipeline.config import ConfigError, EmbedConfig
    from pipeline.embed.dataset import actor_pool_bounds

    assert actor_pool_bounds(EmbedConfig(num_actors=1), cpus=2)[:2] == (1, 1)
    assert actor_pool_bounds(EmbedConfig(num_actors=3), cpus=16)[:2] == (1, 3)
    # 4 actors asked, 3 CPUs: 2 actors and one CPU for the read/decode tasks, said so
    low, high, why = actor_pool_bounds(EmbedConfig(num_actors=4), cpus=3)
    assert (low, high) == (1, 2) and "capped to 2" in why and "reader_cpus=1" in why
    assert actor_pool_bounds(EmbedConfig(num_actors=8, cpus_per_actor=2, reader_cpus=2), cpus=10)[:2] == (1, 4)
    # GPUs bound it too
    assert actor_pool_bounds(EmbedConfig(num_actors=8), cpus=64, gpus_per_actor=1, gpus=4)[:2] == (1, 4)
    with pytest.raises(ConfigError, match=r"embed\.min_actors \(2\).*room for 1 actor"):
        actor_pool_bounds(EmbedConfig(num_actors=2, min_actors=2), cpus=2)


def test_auto_gpu_asks_for_a_gpu_the_autoscaler_can_add():
    from pipeline.embed.dataset import actor_gpus

    assert actor_gpus(-1, gpus_now=0, gpus_possible=0) == 0  # no GPU anywhere: CPU
    assert actor_gpus(-1, gpus_now=2, gpus_possible=2) == 1
    # a GPU worker group at minReplicas 0: no GPU up yet, but requesting one starts it
    assert actor_gpus(-1, gpus_now=0, gpus_possible=8) == 1
    assert actor_gpus(0, gpus_now=4, gpus_possible=4) == 0 and actor_gpus(0.5, 0, 0) == 0.5


def test_a_replaced_checkpoint_is_never_served_from_a_stale_cache(ray_local, s3_store, s3_bucket, tmp_path,
                                                                   monkeypatch):
    """Node-local checkpoint copies are keyed by content: a checkpoint replaced at the same URL
    (same size: same architecture) gives its new weights, and so does a replaced local file
    shipped through the object store. (That the commit removes the cache on every node:
    tests/test_cluster.py.)"""
    import json

    import torch

    from pipeline.embed.model import load_model
    from pipeline.runtime import ship_file
    from pipeline.testing import TINY_MODEL_CONFIG, TINY_MODEL_NAME, save_random_checkpoint

    cache = tmp_path / "cache"
    monkeypatch.setenv("D2PRUNE_CACHE_DIR", str(cache))  # this process's node cache
    # one file name (torch.save records it inside the file): two checkpoints of the same size
    first = save_random_checkpoint(str(tmp_path / "first" / "ckpt.pt"), seed=1)
    second = save_random_checkpoint(str(tmp_path / "second" / "ckpt.pt"), seed=2)
    assert os.path.getsize(first) == os.path.getsize(second)
    weights = {p: torch.load(p)["visual.conv1.weight"] for p in (first, second)}
    assert not torch.equal(weights[first], weights[second])

    url = f"{s3_bucket}/models/replaced.pt"
    spec = ModelSpec(TINY_MODEL_NAME, url, json.dumps(TINY_MODEL_CONFIG), cache_namespace="checkpoints-test")
    s3_store.write_local_file(url, first)
    assert torch.equal(load_model(spec, s3_store).state_dict()["visual.conv1.weight"], weights[first])
    s3_store.write_local_file(url, second)  # replaced at the same URL
    assert torch.equal(load_model(spec, s3_store).state_dict()["visual.conv1.weight"], weights[second])

    local = tmp_path / "ship.pt"
    paths = []
    for source in (first, second):
        local.write_bytes(open(source, "rb").read())  # the same driver path, new content
        path = ship_file(str(local)).local_path("checkpoints-test")
        paths.append(path)
        assert torch.equal(torch.load(path)["visual.conv1.weight"], weights[source])
    assert paths[0] != paths[1] and all(p.startswith(str(cache / "checkpoints-test")) for p in paths)
