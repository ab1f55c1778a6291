"""The WebDataset read side: sample grouping, uids, defects, truncation, up-front shard checks,
local and through the S3 endpoint."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter

import pytest

from pipeline.config import InputConfig
from pipeline.formats.tar import split_key
from pipeline.formats.webdataset import (
    DUPLICATE_UID,
    TRUNCATED_TAR,
    UNDECODABLE_IMAGE,
    ImageDecodeError,
    ShardError,
    decode_image,
    fallback_uid,
    iter_shard_samples,
    shard_urls,
    verify_shards,
)
from pipeline.storage import Store
from pipeline.testing import encode_image, render_image, write_pool

INPUT = InputConfig(shards="unused")


def _read_with_decode(store, manifest):
    """Per shard: the usable, decodable samples and the problem counts, as the embed stage sees
    them before cross-shard de-duplication."""
    usable, problems = [], []
    for url in manifest.shards:
        good, counts = [], Counter()
        for sample in iter_shard_samples(store, url, INPUT):
            if sample.problem:
                counts[sample.problem] += 1
                continue
            try:
                decode_image(sample.image_bytes)
            except ImageDecodeError:
                counts[UNDECODABLE_IMAGE] += 1
                continue
            good.append(sample)
        usable.append(good)
        problems.append(counts)
    return usable, problems


def _check_against_manifest(usable, problems, manifest):
    earlier: set[str] = set()
    for shard, (good, counts) in enumerate(zip(usable, problems)):
        kept = manifest.kept[shard]
        cross = [s for s in good if s.uid in earlier]
        # what the reader keeps = the manifest's kept samples + duplicates of earlier shards
        assert [s.uid for s in good if s.uid not in earlier] == [k["uid"] for k in kept]
        assert [s.key for s in good if s.uid not in earlier] == [k["key"] for k in kept]
        assert [s.caption for s in good if s.uid not in earlier] == [k["caption"] for k in kept]
        expected = Counter(manifest.skipped[shard])
        expected[DUPLICATE_UID] -= len(cross)
        assert +counts == +expected, f"shard {shard}"
        earlier.update(k["uid"] for k in kept)


def test_reader_matches_manifest_on_broken_local_pool(tmp_path):
    store = Store()
    manifest = write_pool(str(tmp_path / "pool"), n_shards=3, per_shard=16, seed=3)
    usable, problems = _read_with_decode(store, manifest)
    _check_against_manifest(usable, problems, manifest)
    assert manifest.truncated_shards == [2]
    assert problems[2][TRUNCATED_TAR] == 1
    # sample positions are tar order and survive skipping
    assert all(a.index < b.index for shard in usable for a, b in zip(shard, shard[1:]))


def test_reader_keeps_original_bytes_and_json_uid(tmp_path):
    store = Store()
    manifest = write_pool(str(tmp_path / "pool"), n_shards=1, per_shard=12, seed=4, truncate_last=False)
    samples = list(iter_shard_samples(store, manifest.shards[0], INPUT))
    assert len(samples) == 12
    with tarfile.open(manifest.shards[0]) as tf:
        originals = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for sample in samples:
        for ext, data in sample.members.items():
            assert originals[f"{sample.key}.{ext}"] == data
    no_json = samples[6]  # the pool's sample without a json member
    assert "json" not in no_json.members
    assert no_json.uid == fallback_uid(manifest.shards[0], no_json.key)
    assert len(no_json.uid) == 32 and int(no_json.uid, 16) >= 0
    assert samples[0].uid == samples[0].meta["uid"]


def test_split_key_follows_webdataset():
    assert split_key("000123.jpg") == ("000123", "jpg")
    assert split_key("dir/sub/000123.seg.png") == ("dir/sub/000123", "seg.png")
    assert split_key("dir.v2/000123.txt") == ("dir.v2/000123", "txt")
    assert split_key("README") is None


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(n, rng_seed=0):
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(n):
        image, caption = render_image(rng, 24)
        out += [(f"{i:04d}.png", encode_image(image, "png")), (f"{i:04d}.txt", caption.encode())]
    return out


@pytest.mark.parametrize("damage", ["cut_at_member_boundary", "cut_inside_header", "corrupt_header"])
def test_truncation_that_tarfile_would_hide_is_detected(tmp_path, damage):
    members = _members(4)
    data = _tar_bytes(members)
    # header offset of sample 2's first member: 2 samples x 2 members before it
    offset = 0
    for _, payload in members[:4]:
        offset += 512 + (len(payload) + 511) // 512 * 512
    if damage == "cut_at_member_boundary":
        data = data[:offset]
    elif damage == "cut_inside_header":
        data = data[: offset + 100]
    else:
        data = data[:offset] + b"\x07" * 512 + data[offset + 512:]
    path = tmp_path / "bad.tar"
    path.write_bytes(data)
    samples = list(iter_shard_samples(Store(), str(path), INPUT))
    # sample 0001 is the last one read before the damage: whether members of it were lost cannot
    # be known (a json with its uid could have followed), so it is dropped with the truncation
    assert [s.key for s in samples if s.problem is None] == ["0000"]
    assert samples[-1].problem == TRUNCATED_TAR and samples[-1].key == "0001"


def test_complete_tar_is_not_flagged(tmp_path):
    path = tmp_path / "ok.tar"
    path.write_bytes(_tar_bytes(_members(3)))
    samples = list(iter_shard_samples(Store(), str(path), INPUT))
    assert [s.problem for s in samples] == [None, None, None]


def test_gzipped_shard_is_read(tmp_path):
    import gzip

    path = tmp_path / "ok.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(_members(3))))
    verify_shards(Store(), [str(path)])
    assert [s.key for s in iter_shard_samples(Store(), str(path), INPUT)] == ["0000", "0001", "0002"]


def test_verify_shards_names_every_missing_or_unreadable_shard(tmp_path):
    store = Store()
    good = tmp_path / "00000.tar"
    good.write_bytes(_tar_bytes(_members(1)))
    not_tar = tmp_path / "00001.tar"
    not_tar.write_bytes(b"PAR1" + os.urandom(600))
    empty = tmp_path / "00002.tar"
    empty.write_bytes(b"")
    verify_shards(store, [str(good)])
    urls = [str(good), str(not_tar), str(empty), str(tmp_path / "00003.tar")]
    with pytest.raises(ShardError) as err:
        verify_shards(store, urls)
    message = str(err.value)
    assert "3 of 4" in message
    assert f"{not_tar}: not a tar archive" in message
    assert f"{empty}: not a tar archive" in message
    assert f"{tmp_path / '00003.tar'}: not found" in message
    assert f"{good}:" not in message


def test_shard_urls_expand_braces_in_order():
    cfg = InputConfig(shards=["s3://b/p/{00008..00010}.tar", "s3://b/q/a.tar"])
    assert shard_urls(cfg) == ["s3://b/p/00008.tar", "s3://b/p/00009.tar", "s3://b/p/00010.tar", "s3://b/q/a.tar"]


def test_decode_image_rejects_garbage():
    with pytest.raises(ImageDecodeError):
        decode_image(b"\xff\xd8\xff\xe0 not really a jpeg")
    import numpy as np

    image, _ = render_image(np.random.default_rng(0), 20)
    assert decode_image(encode_image(image, "jpg")).size == (20, 20)


def test_reader_through_s3_endpoint(s3_store, s3_pool):
    usable, problems = _read_with_decode(s3_store, s3_pool)
    _check_against_manifest(usable, problems, s3_pool)
    verify_shards(s3_store, s3_pool.shards)
    missing = s3_pool.shards[0].replace("00000.tar", "09999.tar")
    with pytest.raises(ShardError, match="09999.tar: not found"):
        verify_shards(s3_store, s3_pool.shards + [missing])
