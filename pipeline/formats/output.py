"""``OUTPUT/``: the filtered pool as the write stage commits it.

Layout under ``output.url``::

    shards/NNNNN.tar       the kept samples: every original tar member, original bytes (no re-encoding)
    shards/NNNNN.parquet   that shard's metadata (:data:`METADATA_COLUMNS`); written after the tar,
                           it is the shard's commit
    _PLAN.json             which job the output belongs to (fingerprint, workdir, shard count, samples)
    _stats.json            the job's stats (written when every shard is committed and checked)

Sample keys in the output are the uids when they are safe tar names (else the md5 of the uid),
since keys of different input shards may collide.
"""

from __future__ import annotations

import hashlib
import re

from ..storage import Store, join

SHARDS_DIR = "shards"
OUTPUT_PLAN = "_PLAN.json"
STATS = "_stats.json"
METADATA_COLUMNS = ("uid", "key", "caption", "clip_score", "rank", "source_shard", "source_key")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def shards_dir(output_url: str) -> str:
    return join(output_url, SHARDS_DIR)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def shard_urls(output_url: str, index: int) -> tuple[str, str]:
    """(tar URL, metadata URL) of output shard `index`."""
    stem = join(shards_dir(output_url), shard_name(index))
    return stem + ".tar", stem + ".parquet"


def shard_committed(store: Store, output_url: str, index: int) -> bool:
    """Output shard `index` is committed: its metadata (written last) and its tar both exist."""
    tar_url, meta_url = shard_urls(output_url, index)
    return store.exists(meta_url) and store.exists(tar_url)


def missing_shards(store: Store, output_url: str, n_shards: int) -> list[int]:
    """Indices of the output shards 0..n_shards-1 that are not committed."""
    return [i for i in range(n_shards) if not shard_committed(store, output_url, i)]


def output_key(uid: str) -> str:
    return uid if _SAFE_KEY.match(uid) else hashlib.md5(uid.encode()).hexdigest()


def metadata_table(uids: list[str], captions: list[str | None], clip_scores, ranks, source_shards: list[str],
                   source_keys: list[str]):
    """One output shard's metadata parquet, rows in the shard's sample order."""
    import pyarrow as pa

    return pa.table({
        "uid": pa.array(uids, pa.string()),
        "key": pa.array([output_key(u) for u in uids], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "clip_score": pa.array(clip_scores, pa.float32()),
        "rank": pa.array(ranks, pa.int64()),
        "source_shard": pa.array(source_shards, pa.string()),
        "source_key": pa.array(source_keys, pa.string()),
    })


def read_metadata_uids(store: Store, output_url: str, index: int) -> list[str]:
    return store.read_parquet(shard_urls(output_url, index)[1], columns=["uid"]).column("uid").to_pylist()
