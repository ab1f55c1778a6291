"""Bad input never crashes the job, never vanishes silently: the tar reader under fuzzing (hypothesis),
every defect of the bad-input corpus counted under its reason, and the corpus through the whole
job with exact counts (pipeline.testing.write_bad_input_pool / write_repeated_keys_pool know what
they broke; the expected numbers come from their construction)."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig
from pipeline.formats.tar import TarWriter, iter_tar_groups
from pipeline.formats.webdataset import (
    DUPLICATE_UID,
    TOO_LARGE,
    UNDECODABLE_IMAGE,
    ImageDecodeError,
    ImageTooLargeError,
    NotATarError,
    ShardError,
    decode_image,
    iter_shard_samples,
    verify_shards,
)
from pipeline.storage import Store, join
from pipeline.testing import (
    CORPUS_INPUT,
    make_config,
    skip_record_mismatches,
    odd_mode_images,
    write_bad_input_pool,
    write_repeated_keys_pool,
)

CORPUS = InputConfig(shards="unused", **CORPUS_INPUT)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with TarWriter(buf) as tar:
        for name, data in members:
            tar.add(name, data)
    return buf.getvalue()


# -- the tar reader ---------------------------------------------------------------------------------

def test_key_repeated_back_to_back_is_two_samples_never_merged():
    data = _tar([("d1.jpg", b"A"), ("d1.txt", b"a"), ("d1.jpg", b"B"), ("d1.txt", b"b"), ("e1.jpg", b"C")])
    groups = list(iter_tar_groups(io.BytesIO(data)))
    assert [(g.key, g.members, g.error) for g in groups] == [
        ("d1", {"jpg": b"A", "txt": b"a"}, None), ("d1", {"jpg": b"B", "txt": b"b"}, None),
        ("e1", {"jpg": b"C"}, None)]


def test_key_repeated_later_is_its_own_sample():
    data = _tar([("e1.jpg", b"A"), ("e2.jpg", b"B"), ("e1.jpg", b"C")])
    assert [(g.key, g.members) for g in iter_tar_groups(io.BytesIO(data))] == [
        ("e1", {"jpg": b"A"}), ("e2", {"jpg": b"B"}), ("e1", {"jpg": b"C"})]


def test_oversized_member_is_not_read():
    class CountingReader(io.BytesIO):
        largest = 0

        def read(self, n=-1):
            out = super().read(n)
            CountingReader.largest = max(CountingReader.largest, len(out))
            return out

    data = _tar([("a.jpg", b"x" * 100), ("a.bin", b"y" * 50_000), ("b.jpg", b"z")])
    groups = list(iter_tar_groups(CountingReader(data), max_member_bytes=10_000))
    assert [(g.key, g.members, g.oversized) for g in groups] == [("a", {"jpg": b"x" * 100}, ("bin",)),
                                                                 ("b", {"jpg": b"z"}, ())]
    assert CountingReader.largest < 50_000  # the big member's data was skipped, never read


def test_empty_archive_is_a_valid_shard_without_samples(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(_tar([]))
    verify_shards(Store(), [str(path)])
    assert list(iter_shard_samples(Store(), str(path), CORPUS)) == []
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="zero.tar: not a tar archive"):
        verify_shards(Store(), [str(tmp_path / "zero.tar")])
    with pytest.raises(NotATarError, match="zero.tar: not a tar archive"):
        list(iter_shard_samples(Store(), str(tmp_path / "zero.tar"), CORPUS))


names = st.tuples(st.sampled_from(["a", "b", "k1", "k 2", "dir/x", "ü"]), st.sampled_from(["jpg", "txt", "json", "seg.png"]))
members_strategy = st.lists(st.tuples(names, st.binary(max_size=600)), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=members_strategy, cut=st.floats(0, 1), flip=st.integers(0, 2**31))
def test_tar_reader_fuzz_never_raises_never_merges_never_loses(members, cut, flip):
    """Any member sequence reads back member for member, in order, with no sample holding an
    extension twice; any cut or flipped byte gives a prefix of it and a damage report, never an
    exception and never a member that was not in the archive."""
    flat = [(f"{key}.{ext}", data) for (key, ext), data in members]
    buf = io.BytesIO()
    with TarWriter(buf) as tar:
        for name, payload in flat:
            tar.add(name, payload)
        end_of_members = tar.offset  # the end-of-archive block starts here (then zero padding)
    data = buf.getvalue()
    groups = list(iter_tar_groups(io.BytesIO(data)))
    assert all(g.error is None for g in groups)
    got = [(f"{g.key}.{ext}", payload) for g in groups for ext, payload in g.members.items()]
    assert got == flat
    for a, b in zip(groups, groups[1:]):  # a new group with the same key only when an extension repeats
        assert a.key != b.key or set(a.members) & set(b.members)

    damaged = bytearray(data[: int(len(data) * cut)])
    if damaged and flip % 3 == 0:
        damaged[flip % len(damaged)] ^= 0xFF
    out = list(iter_tar_groups(io.BytesIO(bytes(damaged))))  # must not raise
    read = [(f"{g.key}.{ext}", payload) for g in out for ext, payload in g.members.items()]
    if flip % 3 != 0:  # only cut: what is read is a prefix of what was written
        assert read == flat[: len(read)]
        if len(damaged) < end_of_members + 512:  # cut before one whole end-of-archive block
            assert out and out[-1].error is not None
    assert all(g.error is None for g in out[:-1])


# -- the corpus, sample by sample ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_bad_input_pool(str(tmp_path_factory.mktemp("corpus")), seed=5)


def test_corpus_every_defect_counted_under_its_reason(corpus):
    """The reader + decoder (as the embed stage's read task uses them) against the manifest; the one
    cross-shard duplicate is the embed stage's business and is checked in the whole job."""
    store = Store()
    earlier: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's palette / bomb warnings must not escape
        for shard, url in enumerate(corpus.shards):
            counts, kept = Counter(), []
            for sample in iter_shard_samples(store, url, CORPUS):
                if sample.problem:
                    counts[sample.problem] += 1
                    continue
                try:
                    decode_image(sample.image_bytes, CORPUS.max_image_pixels)
                except ImageTooLargeError:
                    counts[TOO_LARGE] += 1
                    continue
                except ImageDecodeError:
                    counts[UNDECODABLE_IMAGE] += 1
                    continue
                if sample.uid in earlier:
                    counts[DUPLICATE_UID] += 1
                    continue
                kept.append(sample.uid)
            assert kept == [k["uid"] for k in corpus.manifest.kept[shard]], f"shard {shard}"
            assert dict(counts) == corpus.manifest.skipped[shard], f"shard {shard}"
            earlier.update(kept)
    assert "1" in corpus.manifest.kept_uids  # the string uid "1" is kept, the number 1 is not merged with it
    with pytest.raises(ShardError) as err:
        verify_shards(store, corpus.shards + list(corpus.unreadable))
    for url, reason in corpus.unreadable.items():
        assert f"{url}: {reason}" in str(err.value)


def test_every_odd_mode_decodes_to_rgb_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, (_, data) in odd_mode_images(np.random.default_rng(0)).items():
            image = decode_image(data)
            assert image.mode == "RGB" and image.size == (48, 48), name
    # 16-bit grey is scaled to 8 bits, not clipped to white (PIL's own convert clips)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(buf, format="PNG")
    assert np.asarray(decode_image(buf.getvalue()))[0, 0].tolist() == [4, 4, 4]


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    from PIL import ImageFile

    from pipeline.testing import _png_header_only

    def no_decoding(self):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match="8000x8000"):
        decode_image(_png_header_only(8000, 8000), max_pixels=50_000_000)
    with pytest.raises(ImageTooLargeError):  # past PIL's own bomb error (2 x 89 Mpx): still ours
        decode_image(_png_header_only(30000, 30000), max_pixels=10**10)


def test_non_string_uids_never_collide(tmp_path):
    rows = [("a", 1), ("b", "1"), ("c", 1.0), ("d", True), ("e", {"x": 1}), ("f", None), ("g", "")]
    members = []
    for key, uid in rows:
        members += [(f"{key}.txt", b"caption"), (f"{key}.png", b"png"), (f"{key}.json", json.dumps({"uid": uid}).encode())]
    path = tmp_path / "uids.tar"
    path.write_bytes(_tar(members))
    samples = {s.key: s for s in iter_shard_samples(Store(), str(path), CORPUS)}
    assert {k: s.problem for k, s in samples.items()} == {
        "a": "bad_uid", "b": None, "c": "bad_uid", "d": "bad_uid", "e": "bad_uid", "f": None, "g": None}
    assert samples["b"].uid == "1"
    assert samples["f"].uid != samples["g"].uid and len(samples["f"].uid) == 32  # no uid: the md5 fallback


def test_repeated_keys_read_as_separate_samples(tmp_path):
    manifest = write_repeated_keys_pool(str(tmp_path))
    samples = list(iter_shard_samples(Store(), manifest.shards[0], CORPUS))
    assert [s.key for s in samples if s.problem is None] == [k["key"] for k in manifest.kept[0]]
    assert Counter(s.problem for s in samples if s.problem) == Counter(manifest.skipped[0])
    assert [s.key for s in samples].count("d1") == 2 and [s.key for s in samples].count("e1") == 2


# -- through the whole job ------------------------------------------------------------------------------

def _job_config(tmp_path, shards, tiny_model_config, **select) -> str:
    import yaml

    raw = {
        "workdir": str(tmp_path / "work"),
        "input": {"shards": shards, **CORPUS_INPUT},
        "embed": {"model": "d2prune-tiny", "model_config_path": tiny_model_config, "pretrained": None,
                  "batch_size": 8, "cpus_per_actor": 1, "torch_threads": 1},
        "graph": {"k": 4, "index": "flat", "recall_sample": 0},
        "select": {"prune_rate": 0.5, **select},
        "output": {"url": str(tmp_path / "out"), "samples_per_shard": 5},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
def test_bad_input_corpus_through_the_whole_job_with_exact_counts(tmp_path, corpus, tiny_model_config, ray_local,
                                                                  capsys):
    from pipeline.cli import main
    from pipeline.core.d2 import budget_for
    from pipeline.workdir import part_name

    shards = corpus.shards + list(corpus.unreadable)
    config = _job_config(tmp_path, shards, tiny_model_config)
    # the zero-byte and the garbage shard: named, exit 2, nothing written
    assert main(["run", config]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    for url, reason in corpus.unreadable.items():
        assert f"{url}: {reason}" in line
    assert "input.allow_missing_shards" in line and not (tmp_path / "work").exists()

    assert main(["run", config, "--set", "input.allow_missing_shards=true"]) == 0
    out = capsys.readouterr().out
    store = Store()
    stats = store.read_json(str(tmp_path / "work" / "embeddings" / "_stats.json"))
    manifest = corpus.manifest
    assert stats["samples"] == manifest.n_kept
    assert stats["skipped"] == dict(sorted(manifest.skipped_total.items()))
    assert stats["shards_missing"] == 2 and stats["shards_empty"] == 1
    for i, shard_stats in enumerate(stats["per_shard"]):
        if i < len(manifest.shards):
            assert shard_stats["samples"] == len(manifest.kept[i]) and shard_stats["skipped"] == manifest.skipped[i]
            part = store.read_parquet(str(tmp_path / "work" / "embeddings" / f"{part_name(i)}.parquet"))
            assert part.column("uid").to_pylist() == [k["uid"] for k in manifest.kept[i]]
        else:
            assert shard_stats["samples"] == 0 and shard_stats["missing"].startswith(corpus.unreadable[shards[i]])
    for reason, count in manifest.skipped_total.items():
        assert f"dropped    : {count} (unreadable: {reason})" in out
    assert "missing    : 2 input shard(s) skipped" in out
    written = store.read_json(str(tmp_path / "out" / "_stats.json"))
    assert written["samples_written"] == budget_for(manifest.n_kept, 0.5) and written["integrity"].startswith("ok")


@pytest.mark.slow
@pytest.mark.parametrize("registry_actors", [1, 3])
def test_bad_input_corpus_skip_records_name_every_skipped_sample(tmp_path, corpus, ray_local, registry_actors):
    """Per shard, part-NNNNN.skipped.parquet holds one row per input sample not in the part: the
    sample the corpus broke (key, json uid) under the reason the stats count; the damaged tar's
    one truncated_tar row has no key; a missing shard has an empty file. The same with the uids
    seen split over 3 Ray actors (the cross-shard duplicate is found by its actor)."""
    from pipeline.formats.embeddings import list_parts, read_skipped, skipped_url
    from pipeline.job import run_one
    from pipeline.workdir import part_name, stage_dir

    shards = corpus.shards + list(corpus.unreadable)
    cfg = make_config(str(tmp_path / "work"), shards, input={**CORPUS_INPUT, "allow_missing_shards": True},
                      embed={"batch_size": 8, "uid_registry_actors": registry_actors})
    store = Store()
    run_one(cfg, store, "embed")
    directory = stage_dir(cfg.workdir, "embed")
    assert store.read_json(join(directory, "_stats.json"))["uid_registry_actors"] == registry_actors
    assert skip_record_mismatches(store, directory, corpus.manifest) == []
    for i in range(len(corpus.shards), len(shards)):  # the shards skipped as missing: no samples
        assert read_skipped(store, skipped_url(directory, part_name(i))).num_rows == 0
    # the skip records are no parts: the graph's node order is the parts' alone
    assert [p.name for p in list_parts(store, directory)[0]] == [part_name(i) for i in range(len(shards))]
    bad_key = [r for r in read_skipped(store, skipped_url(directory, part_name(0))).to_pylist()
               if r["reason"] == "bad_key"]
    assert len(bad_key) == 1 and bad_key[0]["key"] == "" and bad_key[0]["uid"]  # named by its json uid


@pytest.fixture(scope="module")
def repeated_keys_job(tmp_path_factory, tiny_model_config, ray_local):
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("repeated")
    manifest = write_repeated_keys_pool(str(tmp / "pool"))
    config = _job_config(tmp, manifest.shards, tiny_model_config, prune_rate=0.0)  # every sample is written
    assert main(["embed", config]) == 0
    return tmp, manifest, config


@pytest.mark.slow
def test_repeated_keys_are_separate_samples_in_the_embed_stage(repeated_keys_job):
    tmp, manifest, _ = repeated_keys_job
    store = Store()
    part = store.read_parquet(str(tmp / "work" / "embeddings" / "part-00000.parquet"))
    assert part.column("uid").to_pylist() == [k["uid"] for k in manifest.kept[0]]
    assert part.column("key").to_pylist() == [k["key"] for k in manifest.kept[0]]
    stats = store.read_json(str(tmp / "work" / "embeddings" / "_stats.json"))
    assert stats["skipped"] == manifest.skipped[0] == {DUPLICATE_UID: 1}


@pytest.mark.slow
def test_repeated_keys_through_the_whole_job(repeated_keys_job):
    """Every sample of a shard with repeated keys is written, each with its own original bytes (the
    write stage finds samples by uid; by (shard, key) it failed on every rerun)."""
    from pipeline.job import run_job

    tmp, manifest, config = repeated_keys_job
    run_job(config)
    store = Store()
    written = store.read_json(str(tmp / "out" / "_stats.json"))
    assert written["samples_written"] == manifest.n_kept and written["integrity"].startswith("ok")
    originals = {s.uid: s.members for s in iter_shard_samples(store, manifest.shards[0], CORPUS) if s.problem is None}
    copies = {}
    for path in sorted((tmp / "out").rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                copies.setdefault(key, {})[ext] = tar.extractfile(member).read()
    by_uid = {json.loads(m["json"])["uid"] if "json" in m else None: m for m in copies.values()}
    for uid, members in originals.items():
        if "json" in members:  # n1 has no json: its copy is matched by its caption and image below
            assert {ext: by_uid[uid][ext] for ext in members} == members
    assert sorted(m["png"] for m in copies.values()) == sorted(m["png"] for m in originals.values())
