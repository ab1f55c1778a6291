"""The embed stage's skip records have a folder of their own (embeddings/_skipped/), so a dataset
over embeddings/ holds the parts' one schema; a workdir embedded before (records beside the parts
as part-NNNNN.skipped.parquet) is still read. Fast: parts committed directly, no model."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as ds

from pipeline.embed.parts import commit_part
from pipeline.formats.embeddings import (
    COLUMNS,
    SKIPPED_COLUMNS,
    list_parts,
    part_skipped_url,
    part_table,
    read_part_skipped,
    skipped_table,
)
from pipeline.storage import Store, join
from pipeline.workdir import committed_parts, part_name

DIM = 4


def commit_parts(directory: str, rows: list[int], skips: list[list[tuple[str, str, str]]]) -> None:
    """Parts of `rows` rows each, with their skip records, as the embed stage commits them."""
    store = Store()
    rng = np.random.default_rng(0)
    for index, (n, skipped) in enumerate(zip(rows, skips)):
        shard = f"/pool/{index:05d}.tar"
        vectors = rng.normal(size=(n, DIM)).astype(np.float16)
        table = part_table(shard, [f"u{index}-{i}" for i in range(n)], [f"k{i}" for i in range(n)],
                           rng.random(n), vectors, vectors, ["a caption"] * n, [64] * n, [48] * n)
        commit_part(store, directory, index, shard, table, skipped)


SKIPS = [[("k7", "", "decode_error"), ("k9", "u-dup", "duplicate_uid")], [], [("", "", "truncated_tar")]]


def test_skip_records_are_written_in_their_own_folder(tmp_path):
    directory = str(tmp_path / "embeddings")
    commit_parts(directory, [5, 0, 3], SKIPS)
    names = sorted(os.listdir(directory))
    assert names == ["_skipped"] + [f"{part_name(i)}{ext}" for i in range(3) for ext in (".parquet", ".stats.json")]
    assert sorted(os.listdir(join(directory, "_skipped"))) == [f"{part_name(i)}.parquet" for i in range(3)]
    store = Store()
    parts, _ = list_parts(store, directory)
    for part, skips in zip(parts, SKIPS):
        assert part_skipped_url(store, part) == join(directory, "_skipped", f"{part.name}.parquet")
        records = read_part_skipped(store, part)
        assert tuple(records.column_names) == SKIPPED_COLUMNS
        assert [(r["key"], r["uid"], r["reason"]) for r in records.to_pylist()] == skips


def test_a_workdir_in_the_layout_before_is_still_read(tmp_path):
    """Records beside the parts (part-NNNNN.skipped.parquet) are found, and are not taken for parts."""
    directory = str(tmp_path / "embeddings")
    commit_parts(directory, [5, 0, 3], SKIPS)
    store = Store()
    for i in range(3):  # move them back to where the embed stage wrote them before
        name = part_name(i)
        os.replace(join(directory, "_skipped", f"{name}.parquet"), join(directory, f"{name}.skipped.parquet"))
    os.remove(join(directory, f"{part_name(1)}.skipped.parquet"))  # and a part embedded before skip records existed
    parts, _ = list_parts(store, directory)
    assert [p.name for p in parts] == [part_name(i) for i in range(3)] and [p.rows for p in parts] == [5, 0, 3]
    assert part_skipped_url(store, parts[0]) == join(directory, f"{part_name(0)}.skipped.parquet")
    assert [r["reason"] for r in read_part_skipped(store, parts[2]).to_pylist()] == ["truncated_tar"]
    assert part_skipped_url(store, parts[1]) is None and read_part_skipped(store, parts[1]) is None


def test_a_dataset_over_the_embeddings_folder_sees_the_parts_only(tmp_path):
    directory = str(tmp_path / "embeddings")
    commit_parts(directory, [5, 0, 3], SKIPS)
    dataset = ds.dataset(directory, format="parquet", exclude_invalid_files=True)  # the stats json are not parquet
    assert sorted(os.path.basename(f) for f in dataset.files) == [f"{part_name(i)}.parquet" for i in range(3)]
    assert tuple(dataset.schema.names) == COLUMNS
    assert dataset.count_rows() == 8  # the embedded samples, none of the 3 skipped
    assert [os.path.basename(u) for u in committed_parts(Store(), directory)] == sorted(
        os.path.basename(f) for f in dataset.files)
    skipped = ds.dataset(join(directory, "_skipped"), format="parquet")
    assert tuple(skipped.schema.names) == SKIPPED_COLUMNS and skipped.count_rows() == 3
    assert skipped_table("/pool/x.tar", []).schema.equals(skipped.schema)
