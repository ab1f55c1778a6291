"""``OUTPUT/``: the filtered pool as the write stage commits it, in img2dataset's layout so that
DataComp's resharder and training code, webdataset and Ray Data read it as they read a pool.

Layout under ``output.url`` (``NNNNN``: ``output.shard_name_width`` digits; DataComp uses 8)::

    shards/NNNNN.tar         the kept samples: every original tar member, original bytes (no re-encoding)
    shards/NNNNN_stats.json  img2dataset's per-shard stats: ``successes`` = samples in the tar (what
                             DataComp's resharder reads to size a shard)
    shards/NNNNN.parquet     that shard's metadata (:data:`METADATA_COLUMNS`, one row per sample in tar
                             order); written last, it is the shard's commit
    shards/sizes.json        {"NNNNN.tar": samples} of every shard (the resharder's and open_clip's
                             shard table), written once every shard is committed and checked
    _PLAN.json               which job the output belongs to (fingerprint, workdir, shard count, samples)
    _stats.json              the job's stats (written when every shard is committed and checked)

Metadata columns: ``uid``; ``key`` (the sample's key in the output tar); ``text`` (the caption, as
img2dataset and DataComp's metadata name it); ``url``, ``original_width``, ``original_height``,
``sha256`` from the sample's json (null where the json has none); ``clip_score``; ``rank`` (0 =
selected first); ``source_shard`` and ``source_key`` (where the sample came from).

Sample keys in the output are the uids when they are safe tar names (else the md5 of the uid),
since keys of different input shards may collide.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..storage import Store, join

SHARDS_DIR = "shards"
OUTPUT_PLAN = "_PLAN.json"
STATS = "_stats.json"
SIZES = "sizes.json"
METADATA_COLUMNS = ("uid", "key", "text", "url", "original_width", "original_height", "sha256", "clip_score",
                    "rank", "source_shard", "source_key")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class OutputLayout:
    """Where output shard `index`'s files are, for an output URL and shard name width."""

    url: str
    width: int = 5

    @property
    def shards_dir(self) -> str:
        return join(self.url, SHARDS_DIR)

    def name(self, index: int) -> str:
        return f"{index:0{self.width}d}"

    def tar(self, index: int) -> str:
        return join(self.shards_dir, self.name(index) + ".tar")

    def stats(self, index: int) -> str:
        return join(self.shards_dir, self.name(index) + "_stats.json")

    def metadata(self, index: int) -> str:
        return join(self.shards_dir, self.name(index) + ".parquet")

    def committed(self, store: Store, index: int) -> bool:
        """Output shard `index` is committed: its metadata (written last), stats and tar exist."""
        return all(store.exists(u) for u in (self.metadata(index), self.stats(index), self.tar(index)))

    def missing(self, store: Store, n_shards: int) -> list[int]:
        """Indices of the output shards 0..n_shards-1 that are not committed (one listing)."""
        names = set(store.ls(self.shards_dir))
        suffixes = (".parquet", "_stats.json", ".tar")
        return [i for i in range(n_shards) if not all(self.name(i) + s in names for s in suffixes)]


def output_key(uid: str) -> str:
    return uid if _SAFE_KEY.match(uid) else hashlib.md5(uid.encode()).hexdigest()


def json_fields(meta: dict[str, Any] | None) -> dict[str, Any]:
    """url, original_width, original_height, sha256 from a sample's json (None where absent)."""
    meta = meta or {}

    def integer(value):
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    def text(value):
        return str(value) if value is not None else None

    return {"url": text(meta.get("url")), "original_width": integer(meta.get("original_width")),
            "original_height": integer(meta.get("original_height")), "sha256": text(meta.get("sha256"))}


def metadata_table(rows: dict[str, list]):
    """One output shard's metadata parquet from columns (:data:`METADATA_COLUMNS`; ``key`` is
    derived from ``uid``), rows in the shard's sample order."""
    import pyarrow as pa

    types = {"uid": pa.string(), "key": pa.string(), "text": pa.string(), "url": pa.string(),
             "original_width": pa.int32(), "original_height": pa.int32(), "sha256": pa.string(),
             "clip_score": pa.float32(), "rank": pa.int64(), "source_shard": pa.string(), "source_key": pa.string()}
    columns = dict(rows, key=[output_key(u) for u in rows["uid"]])
    return pa.table({name: pa.array(columns[name], types[name]) for name in METADATA_COLUMNS})


def shard_stats(samples: int) -> dict[str, int]:
    """img2dataset's per-shard stats for a shard of `samples` samples, all present."""
    return {"count": samples, "successes": samples, "failed_to_download": 0, "failed_to_resize": 0}


def read_metadata_uids(store: Store, layout: OutputLayout, index: int) -> list[str]:
    return store.read_parquet(layout.metadata(index), columns=["uid"]).column("uid").to_pylist()
