"""Metadata-only DataComp ("filter before you download"): no input shards, the pool is the rows of
DataComp's metadata (pipeline.testing.write_datacomp_pool's parquet + npz), and the job ends with
subset.npy, selected.parquet, decisions.parquet, the report and OUTPUT/metadata for img2dataset."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError
from pipeline.core.d2 import budget_for
from pipeline.formats.selection import datacomp_subset
from pipeline.job import run_job
from pipeline.stages import stage_fingerprints
from pipeline.storage import Store, join
from pipeline.testing import make_config, write_datacomp_pool

DATACOMP_OUTPUT = ["uid", "url", "text", "original_width", "original_height", "sha256", "clip_score", "rank"]


def _config_file(tmp_path, name, raw_cfg) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw_cfg))
    return str(path)


def _raw(root, pool, name, shards=None, metadata=None, **precomputed):
    raw = {
        "workdir": f"{root}/{name}",
        "input": {"shards": shards},
        "embed": {"encoder": "precomputed", "precomputed": {"metadata": metadata or pool.metadata_dir, **precomputed}},
        "graph": {"k": 3, "index": "flat", "recall_sample": 0},
        "select": {"method": "d2", "prune_rate": 0.5, "score_offset": 1.0},
        "output": {"url": f"{root}/{name}_out", "samples_per_shard": 10},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    if shards is None:
        del raw["input"]
    return raw


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_datacomp_pool(str(tmp_path_factory.mktemp("datacomp")), n_shards=3, per_shard=20, n_metadata_files=2)


def _metadata_rows(store, pool):
    """Every metadata row: (file url, row, table row as dict)."""
    out = []
    for parquet, _ in pool.metadata:
        for r, row in enumerate(store.read_parquet(parquet).to_pylist()):
            out.append((parquet, r, row))
    return out


def test_shards_are_optional_only_for_precomputed_and_the_write_fingerprint_says_which(tmp_path, pool):
    with pytest.raises(ConfigError, match="input.shards is required unless embed.encoder is 'precomputed'"):
        make_config(str(tmp_path / "w"), None)
    shards = join(pool.shards_dir, "{00000000..00000002}.tar")
    with_shards = make_config(str(tmp_path / "w"), shards, embed={"encoder": "precomputed",
                                                                  "precomputed": {"metadata": pool.metadata_dir}})
    alone = make_config(str(tmp_path / "w"), None, embed={"encoder": "precomputed",
                                                           "precomputed": {"metadata": pool.metadata_dir}})
    a, b = stage_fingerprints(with_shards), stage_fingerprints(alone)
    assert a["embed"] != b["embed"] and a["write"] != b["write"]


@pytest.mark.slow
def test_metadata_only_job_accounts_for_every_metadata_row(ray_local, pool, tmp_path):
    store = Store()
    raw = _raw(str(tmp_path), pool, "alone", part_rows=16)
    summary = run_job(_config_file(tmp_path, "alone", raw))
    work, out = raw["workdir"], raw["output"]["url"]
    rows = _metadata_rows(store, pool)
    n_rows = len(rows)

    # the pool: every metadata row once, but the row without uid, the zero vectors and the
    # repeated uid (the first row of a uid wins)
    embed = store.read_json(join(work, "embeddings", "_stats.json"))
    assert embed["metadata_rows"] == n_rows == 60
    assert embed["skipped"] == {"bad_embedding": 1, "duplicate_uid": 1, "no_uid": 1}
    assert embed["samples"] == n_rows - 3
    assert embed["parts"] == sum(-(-len(store.read_parquet(p)) // 16) for p, _ in pool.metadata)
    assert embed["sha256_invalid"] == 0 and embed["input"] == "metadata-only"
    assert not store.exists(join(work, "embeddings", "_meta"))

    # decisions.parquet: one row per metadata row, identified by (metadata file, row)
    decided = pa.concat_tables([store.read_parquet(join(work, "selection", "decisions.parquet", n))
                                for n in sorted(store.ls(join(work, "selection", "decisions.parquet")))]).to_pydict()
    assert sorted(zip(decided["shard"], map(int, decided["key"]))) == [(p, r) for p, r, _ in rows]
    budget = budget_for(n_rows - 3, 0.5)
    counts = {d: decided["decision"].count(d) for d in set(decided["decision"])}
    assert counts == {"selected": budget, "pruned": n_rows - 3 - budget, "skipped": 3}
    skipped = {(s, int(k)): r for s, k, d, r in zip(decided["shard"], decided["key"], decided["decision"],
                                                    decided["reason"]) if d == "skipped"}
    (first, _), (second, _) = pool.metadata  # the planted rows (write_datacomp_pool's docstring)
    assert skipped == {(first, 1): "no_uid", (first, 22): "bad_embedding", (second, 29): "duplicate_uid"}

    # subset.npy is the selection, OUTPUT/metadata exactly the kept rows with DataComp's columns
    selected = store.read_parquet(join(work, "selection", "selected.parquet")).to_pydict()
    kept = [u for u, s in zip(selected["uid"], selected.get("selected", [True] * len(selected["uid"]))) if s]
    assert len(kept) == budget
    subset = np.load(io.BytesIO(store.read_bytes(join(work, "selection", "subset.npy"))))
    assert subset.tobytes() == datacomp_subset(kept).tobytes()
    files = sorted(store.ls(join(out, "metadata")))
    written = pa.concat_tables([store.read_parquet(join(out, "metadata", n)) for n in files])
    assert written.column_names == DATACOMP_OUTPUT
    assert sorted(written.column("uid").to_pylist()) == sorted(kept)
    by_uid = {}
    for p, r, row in rows:
        by_uid.setdefault(row["uid"], row)  # the first row of a uid
    rank = dict(zip(selected["uid"], selected["rank"]))
    for row in written.to_pylist():
        source = by_uid[row["uid"]]
        assert [row[c] for c in ("url", "text", "original_width", "original_height", "sha256")] == \
            [source[c] for c in ("url", "text", "original_width", "original_height", "sha256")]
        assert row["rank"] == rank[row["uid"]]
        assert row["clip_score"] == pytest.approx(source["clip_l14_similarity_score"], abs=1e-6)
    write = store.read_json(join(work, "write", "_stats.json"))
    assert write["samples_written"] == budget and write["io"]["bytes_written"] > 0
    page = store.read_bytes(join(work, "report.html")).decode()
    assert "Metadata-only job" in page and summary["report"] == join(work, "report.html")

    # a rerun with the same config does nothing
    again = run_job(_config_file(tmp_path, "alone", raw))
    assert again["skipped_stages"] == ["embed", "graph", "select", "write"]


@pytest.mark.slow
def test_metadata_only_subset_equals_the_shards_run_on_the_same_pool(ray_local, pool, tmp_path):
    """The pools are the same when the metadata holds exactly the downloaded, usable samples: then
    both runs select the same uids. (On the full metadata they are not the same pool: the
    metadata-only pool also holds the failed downloads, so its selection differs.)"""
    store = Store()
    shards = join(pool.shards_dir, "{00000000..00000002}.tar")
    with_shards = _raw(str(tmp_path), pool, "shards", shards=shards)
    run_job(_config_file(tmp_path, "shards", with_shards), stages=["embed", "graph", "select"])
    downloaded = {s["uid"]: (s["file"], s["row"]) for k in pool.kept for s in k}
    restricted = tmp_path / "restricted"
    restricted.mkdir()
    for f, (parquet, npz) in enumerate(pool.metadata):
        table = store.read_parquet(parquet)
        keep = sorted(r for u, (ff, r) in downloaded.items() if ff == f)
        name = parquet.rsplit("/", 1)[1][: -len(".parquet")]
        store.write_parquet(str(restricted / f"{name}.parquet"), table.take(pa.array(keep, pa.int64())))
        arrays = {k: v[keep] for k, v in pool.arrays[f].items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (restricted / f"{name}.npz").write_bytes(buf.getvalue())
    alone = _raw(str(tmp_path), pool, "alone", metadata=str(restricted))
    run_job(_config_file(tmp_path, "alone", alone), stages=["embed", "graph", "select"])
    a = store.read_bytes(join(with_shards["workdir"], "selection", "subset.npy"))
    b = store.read_bytes(join(alone["workdir"], "selection", "subset.npy"))
    assert len(a) > 128 and a == b


def test_sha256_is_kept_when_64_hex_digits_and_ids_become_uids():
    from pipeline.embed.metadata_only import uid_of
    from pipeline.formats.datacomp import valid_sha256

    good = "AB" * 32
    assert valid_sha256([good, None, "", "xyz", "a" * 63, 7]) == ([good.lower(), None, None, None, None, None], 3)
    hexuid = "0123456789abcdef0123456789ABCDEF"
    assert uid_of(hexuid) == hexuid and uid_of(None) == uid_of("") == ""
    import hashlib

    assert uid_of("https://x.org/1.jpg") == hashlib.md5(b"https://x.org/1.jpg").hexdigest()
    assert uid_of(12) == hashlib.md5(b"12").hexdigest()
