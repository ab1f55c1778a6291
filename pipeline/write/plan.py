"""The write plan: which selected sample goes into which output shard, fixed before anything is
written and saved as ``WORKDIR/write/plan.parquet`` (one row group per output shard).

Kept samples in source order (input shard index, then position in the shard), cut into runs of
``output.samples_per_shard``: each output shard then reads only a contiguous run of input shards
(usually one or two), and a resumed run writes exactly the same shards.
"""

from __future__ import annotations

import io

import numpy as np

from ..config import JobConfig
from ..formats.embeddings import list_parts
from ..formats.selection import read_selected
from ..formats.webdataset import shard_urls
from ..storage import Store
from ..workdir import stage_dir

PLAN = "plan.parquet"


def build_plan(store: Store, cfg: JobConfig):
    """The selected samples in source order with their output shard (a pyarrow table)."""
    import pandas as pd
    import pyarrow as pa

    selected = read_selected(store, stage_dir(cfg.workdir, "select"), columns=["uid", "rank"]).to_pandas()
    if selected["uid"].duplicated().any():
        dup = selected["uid"][selected["uid"].duplicated()].unique()[:5].tolist()
        raise ValueError(f"selected.parquet lists uids more than once, e.g. {dup}")
    n_inputs = len(shard_urls(cfg.input))
    frames = []
    parts, _ = list_parts(store, stage_dir(cfg.workdir, "embed"))
    for part in parts:
        table = store.read_parquet(part.url, columns=["uid", "shard", "key", "clip_score"]).to_pandas()
        table["source_index"] = part.index
        table["position"] = np.arange(len(table))
        frames.append(table)
    pool = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["uid", "shard", "key", "clip_score", "source_index", "position"])
    joined = selected.merge(pool, on="uid", how="left", validate="one_to_many")
    lost = joined["shard"].isna()
    if lost.any():
        raise ValueError(f"{int(lost.sum())} selected uids are not in the embedding parts, "
                         f"e.g. {joined['uid'][lost].head(5).tolist()}")
    if joined["uid"].duplicated().any():
        dup = joined["uid"][joined["uid"].duplicated()].unique()[:5].tolist()
        raise ValueError(f"selected uids appear in more than one pool sample, e.g. {dup}")
    if (joined["source_index"] >= n_inputs).any():
        raise ValueError(f"embedding parts index input shards beyond the {n_inputs} of input.shards")
    joined = joined.sort_values(["source_index", "position"], kind="stable").reset_index(drop=True)
    joined["out_shard"] = np.arange(len(joined)) // cfg.output.samples_per_shard
    return pa.table({
        "uid": pa.array(joined["uid"].astype(str).tolist(), pa.string()),
        "rank": pa.array(joined["rank"].to_numpy(np.int64)),
        "clip_score": pa.array(joined["clip_score"].to_numpy(np.float32)),
        "source_shard": pa.array(joined["shard"].astype(str).tolist(), pa.string()),
        "source_key": pa.array(joined["key"].astype(str).tolist(), pa.string()),
        "source_index": pa.array(joined["source_index"].to_numpy(np.int64)),
        "out_shard": pa.array(joined["out_shard"].to_numpy(np.int64)),
    })


def write_plan(store: Store, url: str, table, samples_per_shard: int) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    # one row group per output shard: a shard's task reads only its own rows (a single chunk, so
    # the writer cuts row groups at exactly every samples_per_shard rows)
    pq.write_table(table.combine_chunks(), buf, row_group_size=samples_per_shard, compression="zstd")
    buf.seek(0)
    meta = pq.ParquetFile(buf).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if any(size != samples_per_shard for size in sizes[:-1]):
        raise RuntimeError(f"plan row groups {sizes[:5]}... are not {samples_per_shard} rows each")
    store.write_bytes(url, buf.getvalue())


def read_plan_shard(store: Store, url: str, index: int) -> dict[str, list]:
    """Row group `index` of the plan: the rows of output shard `index`."""
    import pyarrow.parquet as pq

    with store.open(url, "rb") as fh:
        return pq.ParquetFile(fh).read_row_group(index).to_pydict()
