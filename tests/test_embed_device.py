"""Device decode and GPU sizing of the embed stage, checked on CPU: the device path
(:mod:`pipeline.embed.device_preprocess`) is device-agnostic, so with device="cpu" the very code a
GPU actor runs is what these tests run. (GPU throughput: benchmarks/gpu/run_embed_gpu.sh.)"""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest

from pipeline.config import EmbedConfig
from pipeline.embed.dataset import ClipEmbedder, actor_gpus, actor_pool_bounds
from pipeline.embed.device_preprocess import DevicePreprocessor, device_jpeg_size, unsupported_reason
from pipeline.embed.model import ModelSpec, image_pipeline, preprocess_config, probe_batch_size
from pipeline.embed.read import read_and_preprocess
from pipeline.errors import StaleStageError
from pipeline.formats.tar import TarWriter
from pipeline.formats.webdataset import UNDECODABLE_IMAGE, decode_image
from pipeline.job import run_one, stage_fingerprints
from pipeline.stage import Hooks
from pipeline.storage import Store, join
from pipeline.testing import TINY_MODEL_CONFIG, TINY_MODEL_NAME, encode_image, make_config, render_image
from pipeline.workdir import committed_parts, part_name, stage_dir

slow = pytest.mark.slow
TINY = ModelSpec(TINY_MODEL_NAME, None, json.dumps(TINY_MODEL_CONFIG))


def _pp_json(spec=TINY) -> str:
    return json.dumps(preprocess_config(spec), sort_keys=True)


def _jpeg(rng, size, **save) -> bytes:
    image, _ = render_image(rng, size)
    image = image.resize((size, int(size * 0.75)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["ViT-B-32", TINY_MODEL_NAME])
def test_device_pixels_are_close_to_the_pil_path(model):
    spec = ModelSpec(model, None) if model == "ViT-B-32" else TINY
    pp = preprocess_config(spec)
    pil, device = image_pipeline(pp), DevicePreprocessor(pp, "cpu")
    rng = np.random.default_rng(1)
    # down- and up-scaling, odd sizes, a progressive and a grey JPEG
    jpegs = [_jpeg(rng, s) for s in (300, 97, 33, 640)] + [_jpeg(rng, 200, progressive=True)]
    grey = io.BytesIO()
    render_image(rng, 120)[0].convert("L").save(grey, format="JPEG")
    jpegs.append(grey.getvalue())
    out, failed = device(jpegs)
    assert failed == [] and tuple(out.shape) == (len(jpegs), 3, *pil.size)
    grouped, _ = device(jpegs, group=4)  # decoded in groups: the same pixels
    assert (grouped == out).all()
    reference = np.stack([pil(decode_image(j)) for j in jpegs]).transpose(0, 3, 1, 2).astype(np.int16)
    diff = np.abs(out.numpy().astype(np.int16) - reference)
    # not bit-equal (torch's antialiased bicubic is not PIL's), but within rounding almost everywhere
    assert diff.mean() < 0.5 and diff.max() <= 8


def test_device_decoded_embeddings_match_the_cpu_path():
    store = Store()
    pp_json = _pp_json()
    cpu = ClipEmbedder(TINY, store, pp_json)
    dev = ClipEmbedder(TINY, store, pp_json, device_decode=True)
    rng = np.random.default_rng(2)
    jpegs = [_jpeg(rng, int(s)) for s in rng.integers(40, 400, size=16)]
    tokens = np.zeros((16, cpu.context), dtype=np.int32)
    a = cpu.encode(np.stack([cpu.images(decode_image(j)) for j in jpegs]), tokens)[0]
    images, rows, dropped = dev._prepare({"image": np.array(jpegs, dtype=object), "jpeg": np.ones(16, bool)},
                                         np.arange(16))
    assert rows.tolist() == list(range(16)) and dropped == {}
    b = dev.collect(dev.forward(images, tokens))[0]
    assert _cosine(a, b).min() > 0.99


def _mixed_shard(path, rng) -> dict[str, str]:
    """A shard of every kind of image the device path must route: what each should become."""
    good = _jpeg(rng, 80)
    cmyk = io.BytesIO()
    render_image(rng, 64)[0].convert("CMYK").save(cmyk, format="JPEG")
    samples = {
        "jpeg": (good, "jpg"),
        "png": (encode_image(render_image(rng, 64)[0], "png"), "png"),
        "corrupt_jpeg": (b"\xff\xd8\xff\xe0 this is not a jpeg " + rng.bytes(64) + b"\xff\xd9", "jpg"),
        "truncated_jpeg": (good[: len(good) // 2], "jpg"),
        "png_named_jpg": (encode_image(render_image(rng, 50)[0], "png"), "jpg"),
        "cmyk_jpeg": (cmyk.getvalue(), "jpg"),
        "jpeg_2": (_jpeg(rng, 120, progressive=True), "jpg"),
    }
    with open(path, "wb") as fh, TarWriter(fh) as tar:
        for i, (name, (data, ext)) in enumerate(samples.items()):
            tar.add(f"{i:04d}.{ext}", data)
            tar.add(f"{i:04d}.txt", f"a picture {name}".encode())
            tar.add(f"{i:04d}.json", json.dumps({"uid": name}).encode())
    return {name: ext for name, (_, ext) in samples.items()}


def _skipped(chunks) -> Counter:
    """The skip counts of the shard's end marker (the marker row that is not filler), from its
    skip records (position, key, uid, reason)."""
    c = chunks[-1]
    row = int(np.flatnonzero(c["is_marker"] & (c["marker_samples"] >= 0))[0])
    return Counter(record[3] for record in json.loads(c["marker_skipped"][row]))


def _read(cfg, url, device_decode, chunk=4):
    batch = {"shard_index": np.array([0]), "shard": np.array([url], dtype=object)}
    return list(read_and_preprocess(batch, Store(), cfg.input, TINY, _pp_json(), chunk, device_decode=device_decode))


def test_mixed_shard_gives_the_same_samples_and_skips_with_and_without_device_decode(tmp_path):
    url = str(tmp_path / "mixed.tar")
    _mixed_shard(url, np.random.default_rng(3))
    cfg = make_config(str(tmp_path / "work"), [url])
    cpu, dev = _read(cfg, url, False), _read(cfg, url, True)
    for chunks in (cpu, dev):  # the same chunking: whole batches, the last with the marker and filler
        assert [c["chunk"].tolist() for c in chunks] == [[0] * 4, [1, -1, -1, -1]]
    kept = [c["uid"][~c["is_marker"]].tolist() for c in cpu]
    assert [c["uid"][~c["is_marker"]].tolist() for c in dev] == kept == [
        ["jpeg", "png", "png_named_jpg", "cmyk_jpeg"], ["jpeg_2"]]
    assert _skipped(cpu) == _skipped(dev) == {UNDECODABLE_IMAGE: 2}
    # only whole RGB/grey JPEGs travel undecoded; the PNG (even named .jpg) and CMYK ones as pixels
    assert np.concatenate([c["jpeg"][~c["is_marker"]] for c in dev]).tolist() == [True, False, False, False, True]
    assert not np.concatenate([c["jpeg"] for c in cpu]).any()
    for c_cpu, c_dev in zip(cpu, dev):
        assert c_dev["original_width"].tolist() == c_cpu["original_width"].tolist()
        # the rows the read task preprocessed are the CPU path's pixels, byte for byte
        for pixels, payload, jpeg, marker in zip(c_cpu["image"], c_dev["image"], c_dev["jpeg"], c_dev["is_marker"]):
            if not jpeg and not marker:
                assert payload == pixels.tobytes()

    # through the actor: the same embeddings within the resize difference, in the same rows
    store, pp_json = Store(), _pp_json()
    a, b = ClipEmbedder(TINY, store, pp_json), ClipEmbedder(TINY, store, pp_json, device_decode=True)
    for c_cpu, c_dev in zip(cpu, dev):
        ea, eb = a(c_cpu), b(c_dev)
        assert (eb["skip_reason"] == "").all()
        real = ~c_cpu["is_marker"]
        if real.any():
            cos = _cosine(ea["image_embedding"][real].astype(np.float32), eb["image_embedding"][real].astype(np.float32))
            assert cos.min() > 0.99
            np.testing.assert_array_equal(ea["text_embedding"], eb["text_embedding"])


def test_a_jpeg_the_device_rejects_is_decoded_with_pil_or_counted(tmp_path, monkeypatch):
    """The actor-side fallback: a JPEG whose header PIL reads but the device decoder refuses is
    decoded by PIL in the actor; if PIL refuses it too the row comes back as undecodable."""
    rng = np.random.default_rng(4)
    good, bad = _jpeg(rng, 90), _jpeg(rng, 90)
    broken = bad[:600] + b"\x00" * 64 + b"\xff\xd9"  # header intact, scan data gone
    try:
        decode_image(broken)
        pytest.skip("this PIL decodes the broken JPEG: no row to drop")
    except Exception:  # noqa: BLE001
        pass
    embedder = ClipEmbedder(TINY, Store(), _pp_json(), device_decode=True)
    real_decode = embedder.device_preprocess.decode
    # the device decoder refuses both (as nvJPEG may refuse what libjpeg-turbo takes)
    monkeypatch.setattr(embedder.device_preprocess, "decode",
                        lambda jpegs: [None if j in (broken, good) else img
                                       for j, img in zip(jpegs, real_decode(jpegs))])
    third = _jpeg(rng, 70)
    batch = {"image": np.array([good, broken, third], dtype=object), "jpeg": np.ones(3, bool),
             "tokens": np.zeros((3, embedder.context), dtype=np.int32), "is_marker": np.zeros(3, bool),
             "shard_index": np.zeros(3, np.int64), "chunk": np.zeros(3, np.int64)}
    batch.update({k: np.zeros(3, np.int64) for k in ("sample_index", "original_width", "original_height",
                                                     "marker_samples")})
    batch.update({k: np.array([""] * 3, dtype=object) for k in ("uid", "key", "caption", "marker_skipped",
                                                              "marker_error")})
    out = embedder(batch)
    assert out["skip_reason"].tolist() == ["", UNDECODABLE_IMAGE, ""]
    assert out["embedded_at"][1] == 0 and (out["embedded_at"][[0, 2]] > 0).all()
    # the PIL-decoded row is the CPU path's pixels exactly
    cpu = ClipEmbedder(TINY, Store(), _pp_json())
    expected = cpu.encode(np.stack([cpu.images(decode_image(good))]), batch["tokens"][:1])[0]
    assert _cosine(out["image_embedding"][:1].astype(np.float32), expected).min() > 0.999


def test_device_path_routing_and_supported_preprocessing():
    rng = np.random.default_rng(5)
    jpeg = _jpeg(rng, 64)
    assert device_jpeg_size(jpeg) == (64, 48)
    assert device_jpeg_size(jpeg[:-2]) is None  # no end-of-image marker: the CPU path decides
    assert device_jpeg_size(encode_image(render_image(rng, 32)[0], "png")) is None
    base = preprocess_config(TINY)
    assert unsupported_reason(base) is None and unsupported_reason({**base, "resize_mode": "squash"}) is None
    assert "longest" in unsupported_reason({**base, "resize_mode": "longest"})
    assert "non-square" in unsupported_reason({**base, "size": [32, 48]})


def test_batch_size_probe_doubles_until_memory_and_backs_off():
    gib = 2**30

    def model(per_sample, fixed=gib, oom_above=None):
        def try_batch(b):
            if oom_above is not None and b > oom_above:
                raise MemoryError("CUDA out of memory")
            return fixed + b * per_sample
        return try_batch

    # 10 GiB budget, 1 GiB fixed, 40 MiB a sample: 128 fits (6 GiB), 256 would not (11 GiB)
    assert probe_batch_size(model(40 * 2**20), 10 * gib) == 128
    assert probe_batch_size(model(40 * 2**20, oom_above=64), 10 * gib) == 64  # an OOM counts as over
    assert probe_batch_size(model(2**10), 10 * gib) == 1024  # capped
    assert probe_batch_size(model(gib), 10 * gib) == 8  # even 32 does not fit: halve
    assert probe_batch_size(model(gib, fixed=20 * gib), 10 * gib) == 1  # nothing fits: the smallest


def test_gpu_sharing_settings():
    assert actor_gpus(-1, gpus_now=2, gpus_possible=2, actors_per_gpu=4) == 0.25
    assert actor_gpus(-1, gpus_now=0, gpus_possible=0, actors_per_gpu=4) == 0
    assert actor_pool_bounds(EmbedConfig(num_actors=16), cpus=64, gpus_per_actor=0.25, gpus=2)[:2] == (1, 8)
    assert EmbedConfig(num_gpus_per_actor=0.5).num_gpus_per_actor == 0.5
    for bad, match in (({"num_gpus_per_actor": 0.4}, "1/n"), ({"num_gpus_per_actor": -2}, "-1"),
                       ({"num_gpus_per_actor": 1, "actors_per_gpu": 2}, "actors_per_gpu"),
                       ({"batch_size": 0}, "greater than 0"), ({"batch_size": "big"}, "auto")):
        with pytest.raises(ValueError, match=match):
            EmbedConfig(**bad)


def test_resolved_settings_enter_the_fingerprint(tmp_path):
    def fp(**embed):
        return stage_fingerprints(make_config(str(tmp_path / "w"), ["/x/00000.tar"], embed=embed))["embed"]

    assert fp(device_decode=True) != fp(device_decode=False)
    # auto on CPU actors resolves to off, and batch auto on CPU to 256: the same bits, the same print
    assert fp(device_decode="auto", num_gpus_per_actor=0) == fp(device_decode=False, num_gpus_per_actor=0)
    assert fp(device_decode="auto", num_gpus_per_actor=1) == fp(device_decode=True, num_gpus_per_actor=1)
    assert fp(batch_size="auto", num_gpus_per_actor=0) == fp(batch_size=256, num_gpus_per_actor=0)
    assert fp(batch_size="auto", num_gpus_per_actor=1) != fp(batch_size=256, num_gpus_per_actor=1)
    # sharing a GPU is throughput only
    assert fp(actors_per_gpu=4) == fp(actors_per_gpu=1)


def test_a_resume_on_another_device_or_decode_is_refused(tmp_path):
    from pipeline.embed.stage import RESOLVED, resolve_run_settings

    store = Store()
    directory = str(tmp_path / "embed")
    store.makedirs(directory)
    cfg = make_config(str(tmp_path / "w"), ["/x/00000.tar"], embed={"batch_size": "auto", "device_decode": "auto"})
    first = resolve_run_settings(cfg, store, directory, TINY, _pp_json(), gpus=0)
    assert first == {"device": "cpu", "device_decode": False, "batch_size": 256}
    assert store.read_json(join(directory, RESOLVED)) == first
    # a GPU run would have recorded its warm-up's batch size: a resume reuses it, no new warm-up
    store.write_json(join(directory, RESOLVED), {**first, "batch_size": 512})
    assert resolve_run_settings(cfg, store, directory, TINY, _pp_json(), gpus=0)["batch_size"] == 512
    store.write_json(join(directory, RESOLVED), {"device": "cuda", "device_decode": True, "batch_size": 512})
    with pytest.raises(StaleStageError, match="device: cuda then, cpu now.*--force-from embed"):
        resolve_run_settings(cfg, store, directory, TINY, _pp_json(), gpus=0)
    # no part committed yet: the record binds nothing and is replaced
    assert resolve_run_settings(cfg, store, directory, TINY, _pp_json(), gpus=0, resuming=False) == first
    assert store.read_json(join(directory, RESOLVED)) == first


# -- the stage with device decode forced on, on CPU ----------------------------------------------

def _parts(store, cfg, n):
    directory = stage_dir(cfg.workdir, "embed")
    return [store.read_parquet(join(directory, part_name(i) + ".parquet")) for i in range(n)]


@pytest.fixture(scope="module")
def device_run(ray_local, small_pool, tmp_path_factory):
    store = Store()
    cfg = make_config(str(tmp_path_factory.mktemp("dev") / "work"), small_pool.shards,
                      embed={"device_decode": True, "batch_size": 16})
    stats = run_one(cfg, store, "embed")
    return cfg, stats, _parts(store, cfg, len(small_pool.shards))


@slow
def test_device_decode_stage_keeps_the_cpu_paths_samples_and_skips(device_run, small_pool, tmp_path):
    cfg, stats, parts = device_run
    assert stats["device_decode"] is True and stats["batch_size"] == 16
    assert stats["samples"] == small_pool.n_kept
    assert stats["skipped"] == dict(sorted(small_pool.skipped_total.items()))
    for table, kept in zip(parts, small_pool.kept):
        assert table.column("uid").to_pylist() == [k["uid"] for k in kept]
    # against the CPU path: the same rows, embeddings within the resize difference
    store = Store()
    cpu_cfg = make_config(str(tmp_path / "cpu"), small_pool.shards, embed={"device_decode": False, "batch_size": 16})
    run_one(cpu_cfg, store, "embed")
    cpu_parts = _parts(store, cpu_cfg, len(small_pool.shards))
    for a, b in zip(cpu_parts, parts):
        assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
        va = np.stack(a.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        vb = np.stack(b.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        assert _cosine(va, vb).min() > 0.99
        assert not a.column("image_embedding").equals(b.column("image_embedding"))  # other bits: fingerprinted


@slow
def test_device_decode_stage_is_deterministic_and_resumes(device_run, small_pool, tmp_path):
    _, _, reference = device_run
    store = Store()
    cfg = make_config(str(tmp_path / "work"), small_pool.shards,
                      embed={"device_decode": True, "batch_size": 16, "num_actors": 2, "cpus_per_actor": 0.5})

    class Killed(Exception):
        pass

    def kill_after_two(stage, index):
        if index == 1:
            raise Killed()

    with pytest.raises(Killed):
        run_one(cfg, store, "embed", Hooks(part_committed=kill_after_two))
    directory = stage_dir(cfg.workdir, "embed")
    # the writer actors commit in parallel: parts after the second may be in too
    committed = [int(u.rsplit("-", 1)[-1].split(".")[0]) for u in committed_parts(store, directory)]
    assert committed[:2] == [0, 1]
    embedded = []
    stats = run_one(cfg, store, "embed", Hooks(part_committed=lambda stage, i: embedded.append(i)))
    # a writer actor busy when the driver stopped may still commit its part after `committed` was
    # listed (atomically, same bytes): the resumed run then keeps it too. Every part is embedded
    # exactly once across the two runs, and nothing committed before the restart is redone.
    resumed = [i for i in range(4) if i not in embedded]
    assert not set(committed) - set(resumed)
    assert len(set(embedded)) == len(embedded) and stats["shards_resumed"] == len(resumed)
    assert Counter(stats["skipped"]) == Counter(small_pool.skipped_total)
    # another run (other actor count, interrupted and resumed) gives the same bytes
    for a, b in zip(reference, _parts(store, cfg, len(small_pool.shards))):
        assert a.equals(b)


def test_bad_input_corpus_keeps_and_skips_the_same_samples_with_device_decode(tmp_path):
    """Every kind of bad input (odd modes, truncated, oversized, not images...) through the read
    task and the actor with device decode: the samples kept and the skip counts are the CPU path's."""
    from pipeline.testing import CORPUS_INPUT, write_bad_input_pool

    corpus = write_bad_input_pool(str(tmp_path / "corpus"), seed=5)
    cfg = make_config(str(tmp_path / "work"), corpus.shards, input=CORPUS_INPUT)
    embedder = ClipEmbedder(TINY, Store(), _pp_json(), device_decode=True)
    routed = 0
    for url in corpus.shards:
        cpu, dev = _read(cfg, url, False), _read(cfg, url, True)
        kept_cpu = [u for c in cpu for u, m in zip(c["uid"], c["is_marker"]) if not m]
        skipped_cpu = _skipped(cpu)
        kept_dev, skipped_dev = [], _skipped(dev)
        for chunk in dev:
            out = embedder(chunk)
            routed += int(chunk["jpeg"].sum())
            for uid, marker, reason in zip(chunk["uid"], chunk["is_marker"], out["skip_reason"]):
                if reason:
                    skipped_dev[reason] += 1
                elif not marker:
                    kept_dev.append(uid)
        assert kept_dev == kept_cpu, url
        assert skipped_dev == skipped_cpu, url
    assert routed > 0  # the corpus's healthy JPEGs did take the device path


def test_the_dataset_of_gpu_actors_can_be_built(ray_local, tmp_path):
    """Ray Data refuses `num_gpus` on a map without an int batch size: the stage must give one
    (batches of exactly one chunk, read.py); building the plan is where it was refused."""
    from pipeline.embed.dataset import build_embed_dataset

    cfg = make_config(str(tmp_path / "work"), ["/x/00000.tar"], embed={"num_gpus_per_actor": 0.5})
    ds = build_embed_dataset(cfg, Store(), TINY, _pp_json(), [(0, "/x/00000.tar")], gpus=0.5, threads=1,
                             batch_size=8, device_decode=True)
    assert ds is not None


def test_the_image_tower_alone_gives_the_image_vectors_of_the_whole_forward():
    """ClipEncoder.encode_images (the evaluation sets' embedding: no caption) against encode."""
    from pipeline.embed.model import ClipEncoder

    encoder = ClipEncoder(TINY, Store(), _pp_json(), torch_threads=1)
    rng = np.random.default_rng(4)
    pixels = np.stack([encoder.images(render_image(rng, 40 + 7 * i)[0]) for i in range(5)])
    image, _, _ = encoder.encode(pixels, np.zeros((len(pixels), encoder.context), np.int32))
    assert np.array_equal(encoder.encode_images(pixels), image)
