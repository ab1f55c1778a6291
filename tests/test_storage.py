"""Storage helpers and the stage commit protocol (local filesystem; S3 paths are exercised by the
embed/job tests through the moto endpoint)."""

import os

import pyarrow as pa
import pytest

from pipeline.config import config_from_dict
from pipeline.storage import Store, expand_braces, expand_urls, join
from pipeline.job import stage_fingerprints
from pipeline.testing import commit_stage, is_committed
from pipeline.workdir import StaleStageError, claim, stage_dir


def test_expand_braces_ranges_keep_zero_padding():
    assert expand_braces("s3://b/pool/{00000..00002}.tar") == [
        "s3://b/pool/00000.tar",
        "s3://b/pool/00001.tar",
        "s3://b/pool/00002.tar",
    ]
    assert expand_braces("p/{8..10}.tar") == ["p/8.tar", "p/9.tar", "p/10.tar"]


def test_expand_braces_alternatives_and_nesting():
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]


def test_expand_braces_rejects_empty_range():
    with pytest.raises(ValueError, match="empty"):
        expand_braces("p/{5..2}.tar")


def test_expand_urls_deduplicates_in_order():
    assert expand_urls(["x/{0..1}.tar", "x/1.tar", "y.tar"]) == ["x/0.tar", "x/1.tar", "y.tar"]


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    store = Store()
    url = join(str(tmp_path), "a", "b.json")
    store.write_json(url, {"x": 1})
    store.write_json(url, {"x": 2})
    assert store.read_json(url) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]

    table = pa.table({"uid": ["u1", "u2"], "v": [1, 2]})
    store.write_parquet(join(str(tmp_path), "t.parquet"), table)
    assert store.read_parquet(join(str(tmp_path), "t.parquet")).equals(table)


def test_store_is_picklable_and_lists(tmp_path):
    import pickle

    store = pickle.loads(pickle.dumps(Store()))
    store.write_bytes(join(str(tmp_path), "d", "x.bin"), b"abc")
    assert store.ls(join(str(tmp_path), "d")) == ["x.bin"]
    assert store.ls(join(str(tmp_path), "missing")) == []
    assert store.size(join(str(tmp_path), "d", "x.bin")) == 3


def _cfg(tmp_path, **select):
    return config_from_dict(
        {
            "workdir": str(tmp_path / "work"),
            "input": {"shards": str(tmp_path / "pool" / "{00000..00001}.tar")},
            "select": select,
            "output": {"url": str(tmp_path / "out")},
        }
    )


def test_stage_commit_and_fingerprint_change_detected(tmp_path):
    store = Store()
    cfg = _cfg(tmp_path, prune_rate=0.5)
    assert not is_committed(store, cfg, "select")
    claim(store, stage_dir(cfg.workdir, "select"), stage_fingerprints(cfg)["select"], "select")
    commit_stage(store, cfg, "select", {"kept": 3})
    assert is_committed(store, cfg, "select")
    assert store.read_json(join(stage_dir(cfg.workdir, "select"), "_stats.json")) == {"kept": 3}

    changed = _cfg(tmp_path, prune_rate=0.6)
    with pytest.raises(StaleStageError, match="select"):
        is_committed(store, changed, "select")
    with pytest.raises(StaleStageError, match="partial output"):
        claim(store, stage_dir(changed.workdir, "select"), stage_fingerprints(changed)["select"], "select")
    # an earlier stage is unaffected by a later stage's settings
    assert stage_fingerprints(changed)["embed"] == stage_fingerprints(cfg)["embed"]


def test_fingerprint_chains_through_earlier_stages(tmp_path):
    a = _cfg(tmp_path)
    b = config_from_dict(
        {**a.model_dump(), "embed": {**a.embed.model_dump(), "model": "ViT-L-14"}}
    )
    assert stage_fingerprints(a)["embed"] != stage_fingerprints(b)["embed"]
    assert stage_fingerprints(a)["write"] != stage_fingerprints(b)["write"]
    # throughput knobs don't invalidate outputs
    c = config_from_dict({**a.model_dump(), "embed": {**a.embed.model_dump(), "batch_size": 7}})
    assert stage_fingerprints(a)["write"] == stage_fingerprints(c)["write"]
