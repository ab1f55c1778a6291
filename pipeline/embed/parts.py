"""Committed embedding parts: cross-shard uid de-duplication and commits in shard order.

Complete shards are committed *in shard order* (stats json, then the part), skipping uids already
seen in earlier shards (counted as ``duplicate_uid``: the occurrence in the earliest shard wins).
Commits in shard order make that rule deterministic and keep committed parts a prefix, which
resume relies on; the driver holds only the rows of shards in flight.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..formats.embeddings import part_table
from ..formats.webdataset import DUPLICATE_UID
from ..storage import Store, join
from ..workdir import part_name

log = logging.getLogger(__name__)


def uid_hashes(uids) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uids),
        dtype=np.uint64, count=len(uids),
    )


class UidRegistry:
    """Set of uids seen so far, as 64-bit hashes in a few sorted arrays (8 bytes per uid; a
    log-structured merge keeps inserts amortised O(log N) per uid). A 64-bit collision would
    show up as one extra counted `duplicate_uid`, never as a silent loss."""

    def __init__(self) -> None:
        self._levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for level in self._levels:  # never empty (add skips empty input)
            pos = np.searchsorted(level, hashes)
            pos[pos == len(level)] = 0
            found |= level[pos] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        self._levels.append(np.unique(hashes))
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            top = self._levels.pop()
            self._levels[-1] = np.union1d(self._levels[-1], top)


@dataclass
class ShardResult:
    """A complete shard's usable rows (in shard order) and its skip counts."""

    uids: list[str]
    keys: list[str]
    scores: np.ndarray
    image: np.ndarray
    text: np.ndarray
    skipped: Counter = field(default_factory=Counter)


class ShardAccumulator:
    """Rows of one shard arriving out of order from the actors, until its marker says it is whole."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.expected: int | None = None
        self.skipped: Counter = Counter()

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.chunks.append(rows)
        self.rows += len(rows["uid"])

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.rows == self.expected

    def result(self) -> ShardResult:
        if not self.chunks:
            return ShardResult([], [], np.zeros(0, np.float32), np.zeros((0, 0), np.float16),
                               np.zeros((0, 0), np.float16), self.skipped)
        cat = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        order = np.argsort(cat["sample_index"], kind="stable")
        return ShardResult([str(u) for u in cat["uid"][order]], [str(k) for k in cat["key"][order]],
                           cat["clip_score"][order], cat["image_embedding"][order],
                           cat["text_embedding"][order], self.skipped)


class PartCommitter:
    """Commits complete shards in shard order: drops uids seen in earlier shards (counted as
    `duplicate_uid`), writes ``part-NNNNN.stats.json`` then ``part-NNNNN.parquet``."""

    def __init__(self, store: Store, directory: str, urls: list[str], pending: list[int], committed: list[int],
                 on_part_committed: Callable[[int], None] | None = None):
        self.store, self.urls = store, urls
        self.directory = directory
        self.queue = sorted(pending)
        self.position = 0
        self.ready: dict[int, ShardResult] = {}
        self.registry = UidRegistry()
        self.on_disk = sorted(committed)  # parts committed by earlier runs, loaded as they come due
        self._disk_position = 0
        self.on_part_committed = on_part_committed
        self.stats: dict[int, dict[str, Any]] = {}
        self.dim: int | None = None

    def add(self, index: int, result: ShardResult) -> None:
        self.ready[index] = result
        while self.position < len(self.queue) and self.queue[self.position] in self.ready:
            index = self.queue[self.position]
            self._register_committed_below(index)
            self._commit(index, self.ready.pop(index))
            self.position += 1

    @property
    def done(self) -> bool:
        return self.position == len(self.queue)

    def _register_committed_below(self, index: int) -> None:
        # Only parts *before* this shard decide whether its uids are duplicates, as in a fresh run.
        while self._disk_position < len(self.on_disk) and self.on_disk[self._disk_position] < index:
            done = self.on_disk[self._disk_position]
            uids = self.store.read_parquet(join(self.directory, part_name(done) + ".parquet"), columns=["uid"])
            self.registry.add(uid_hashes(uids.column("uid").to_pylist()))
            self._disk_position += 1

    def _commit(self, index: int, result: ShardResult) -> None:
        url = self.urls[index]
        skipped = Counter(result.skipped)
        hashes = uid_hashes(result.uids)
        keep = ~self.registry.contains(hashes)
        # also within the shard (the reader dedupes already; precomputed files may not be)
        _, first = np.unique(hashes, return_index=True)
        unique = np.zeros(len(hashes), dtype=bool)
        unique[first] = True
        keep &= unique
        if (~keep).any():
            skipped[DUPLICATE_UID] += int((~keep).sum())
        idx = np.flatnonzero(keep)
        if result.image.ndim == 2 and result.image.shape[1] > 0:
            self.dim = result.image.shape[1]
        if self.dim is None:
            raise RuntimeError(f"embedding dimension unknown for the empty shard {url}")
        # an empty part still has the D-sized list type, so every part has one schema
        image = result.image[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        text = result.text[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        table = part_table(url, [result.uids[i] for i in idx], [result.keys[i] for i in idx],
                           result.scores[idx], image, text)
        stats = {"shard": url, "samples": len(idx), "skipped": dict(sorted(skipped.items()))}
        name = part_name(index)
        self.store.write_json(join(self.directory, name + ".stats.json"), stats)
        self.store.write_parquet(join(self.directory, name + ".parquet"), table)
        self.registry.add(hashes[idx])
        self.stats[index] = stats
        if skipped:
            log.warning("shard %s: %d samples embedded, skipped %s", url, len(idx),
                        ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
        else:
            log.info("shard %s: %d samples embedded", url, len(idx))
        if self.on_part_committed is not None:
            self.on_part_committed(index)


def committed_indices(store: Store, directory: str, n_shards: int) -> list[int]:
    """Indices of the input shards whose part is committed in `directory`."""
    names = set(store.ls(directory))
    return [i for i in range(n_shards) if part_name(i) + ".parquet" in names]
