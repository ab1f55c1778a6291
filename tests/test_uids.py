import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.uids import hash_buckets, hash_sum, uid_hashes
from pipeline.formats import buckets


def test_the_uid_hash_is_pinned():
    # bucket files of a killed job are resumed by a later process: the hash may never drift
    assert uid_hashes(["a", "b", "", "üüü"]).tolist() == [
        9413272369427828315, 7955382828454826704, 17280346270528514342, 7861365629038198008]


def test_arrow_arrays_and_python_strings_hash_alike():
    uids = [f"{i:032x}" for i in range(1000)] + ["ünï", ""]
    expected = uid_hashes(uids)
    assert np.array_equal(buckets.uid_hashes(uids), expected)
    assert np.array_equal(buckets.uid_hashes(pa.array(uids)), expected)
    assert np.array_equal(buckets.uid_hashes(pa.array(uids, pa.large_string())), expected)
    assert np.array_equal(buckets.uid_hashes(pa.chunked_array([uids[:10], uids[10:]])), expected)
    assert np.array_equal(buckets.uid_hashes(pa.array(uids).slice(5)), expected[5:])


def test_buckets_are_balanced_and_the_hash_sum_ignores_order():
    hashes = uid_hashes([f"{i:032x}" for i in range(40_000)])
    counts = np.bincount(hash_buckets(hashes, 8), minlength=8)
    assert counts.min() > 0.95 * counts.mean()  # the finaliser mixes the low bits
    assert hash_sum(hashes) == hash_sum(hashes[::-1]) == buckets.hash_sum([f"{i:032x}" for i in range(40_000)])


def test_uid_positions_match_one_side_to_the_other():
    keys = pa.array(["x", "y", "z", "y"])
    assert buckets.uid_positions(keys, ["z", "q", "y", "x"]).tolist() == [2, -1, 1, 0]  # a repeated key: its first
    assert buckets.uid_positions(["a", "b"], np.array(["b"], dtype=object)).tolist() == [1]
    assert buckets.uid_positions([], ["a"]).tolist() == [-1]
    assert buckets.repeated_uids(["a", "b", "a", "c", "b", "a"]) == ["a", "b"]
    assert buckets.repeated_uids(pa.array(["a"])) == []


def test_a_uid_join_through_bucketed_files(tmp_path):
    from pipeline.storage import Store

    store = Store()
    left = pa.table({"uid": [f"u{i}" for i in range(50)], "x": list(range(50))})
    right = pa.table({"uid": [f"u{i}" for i in range(0, 100, 2)], "y": [float(i) for i in range(0, 100, 2)]})
    urls = {}
    for name, table in (("left", left), ("right", right)):
        writer = buckets.BucketedWriter(table.schema, 3)
        writer.add_by_uid(table)
        urls[name] = str(tmp_path / f"{name}.bkt")
        assert writer.commit(store, urls[name]) == (tmp_path / f"{name}.bkt").stat().st_size
    joined = {}
    for b in range(3):
        l_rows = buckets.gather_bucket(store, [urls["left"]], b)
        r_rows = buckets.gather_bucket(store, [urls["right"]], b)
        where = buckets.uid_positions(r_rows.column("uid"), l_rows.column("uid"))
        for x, w in zip(l_rows.column("x").to_pylist(), where.tolist()):
            joined[x] = None if w < 0 else r_rows.column("y")[w].as_py()
    assert joined == {x: (float(x) if x % 2 == 0 else None) for x in range(50)}
    with pytest.raises(ValueError, match="at least one file"):
        buckets.gather_bucket(store, [], 0)
