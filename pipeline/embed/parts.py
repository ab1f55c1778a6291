"""Committed embedding parts: cross-shard uid de-duplication, decided in shard order, committed
by writer actors.

The model actors hand their embedded rows to :class:`ShardWriter` actors (a few per run, each
gathering the shards assigned to it, :func:`writer_of`), never to the driver. A writer says when
one of its shards is whole; the driver (:class:`PartCommitter`) then decides the shards *in shard
order*: uids already seen in earlier shards are dropped (recorded as ``duplicate_uid``: the
occurrence in the earliest shard wins), which the uid registry actors answer from the writer's
hashes, passed by reference. The writer commits the part (skip records, stats json, then the part).
Decisions in shard order make that rule deterministic; a part is committed only after the uids of
every shard before it were registered, so a killed run leaves parts a rerun completes exactly (it
redoes every shard without a part, and registers the committed ones below each as it goes). The
driver holds a few numbers per pending shard, never a row; the writers hold the rows of their
shards in flight; the uids seen (8 bytes each) live in one registry actor while the pool is small,
past that split by hash over several (``embed.uid_registry_actors``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..formats.buckets import uid_buckets, uid_hashes
from ..formats.datacomp import uid_notes
from ..formats.embeddings import part_table, skipped_table, skipped_url, write_part, write_skipped
from ..formats.webdataset import DUPLICATE_UID, fallback_uid
from ..storage import Store, join
from ..workdir import part_name

log = logging.getLogger(__name__)


class UidRegistry:
    """Set of uids seen so far, as 64-bit hashes in a few sorted arrays (8 bytes per uid; a
    log-structured merge keeps inserts amortised O(log N) per uid). A 64-bit collision would
    show up as one extra counted `duplicate_uid`, never as a silent loss."""

    def __init__(self) -> None:
        self._levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:  # len() as a method a Ray actor exposes
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
            below = self._levels.pop()
            merged = np.concatenate([below, top])
            del below, top  # the two levels go before the merge allocates more
            # two sorted runs: a stable sort (timsort for 64-bit ints) merges them in linear time,
            # where union1d sorted from scratch (measured: 5M uids in 10k batches 19 s -> 4 s)
            merged.sort(kind="stable")
            repeated = merged[1:] == merged[:-1]
            if repeated.any():
                merged = merged[np.concatenate(([True], ~repeated))]
            self._levels.append(merged)

    def check_and_add(self, hashes: np.ndarray, share: int = 0, shares: int = 1, *after) -> np.ndarray:
        """Which of `hashes` (one shard's uids) were seen before, then all of them as seen; with
        `shares` > 1 only the hashes of this registry's `share` (:func:`uid_buckets`) are looked at
        (False elsewhere): OR-ing every share's answer gives what one registry says. One call per
        shard, in shard order (a Ray actor runs one caller's calls in order). `after`: the previous
        shard's answers, unused here: as arguments they make Ray fail this call when that one
        failed (:meth:`ShardedUidRegistry.check_and_add_refs`)."""
        found = np.zeros(len(hashes), dtype=bool)
        mine = np.flatnonzero(uid_buckets(hashes, shares) == share) if shares > 1 else np.arange(len(hashes))
        if len(mine):
            found[mine] = self.contains(hashes[mine])
            # seen before, or repeated within the shard: either way the set of hashes is the same
            # as adding only the rows the part keeps (the earliest occurrence of each uid)
            self.add(hashes[mine[~found[mine]]])
        return found

    def add_part(self, store: Store, url: str, share: int = 0, shares: int = 1) -> None:
        """Every uid of a committed part (read here, not in the caller) as seen (this `share`'s)."""
        uids = store.read_parquet(url, columns=["uid"]).column("uid").to_pylist()
        hashes = uid_hashes(uids)
        self.add(hashes[uid_buckets(hashes, shares) == share] if shares > 1 else hashes)


# auto: one registry actor per this many uids (400 MB of hashes each)
UIDS_PER_REGISTRY_ACTOR = 50_000_000


class ShardedUidRegistry:
    """A :class:`UidRegistry` split by uid hash over Ray actors, each holding the hashes of its
    share: at 10^9 uids no process holds 8 GB of them. Answers exactly what one registry would.
    Calls from the one driver run in submission order on each actor, so a ``contains`` after an
    ``add`` sees what was added."""

    def __init__(self, n_actors: int):
        import ray

        self.n = int(n_actors)
        actor = ray.remote(num_cpus=0, max_restarts=0)(UidRegistry)
        self.actors = [actor.options(scheduling_strategy="SPREAD").remote() for _ in range(self.n)]
        self._previous: list = []  # the last shard's answers (refs): the next check depends on them

    def _shares(self, hashes: np.ndarray) -> list[np.ndarray]:
        bucket = uid_buckets(hashes, self.n)
        return [np.flatnonzero(bucket == i) for i in range(self.n)]

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        import ray

        found = np.zeros(len(hashes), dtype=bool)
        asked = [(idx, a.contains.remote(hashes[idx])) for a, idx in zip(self.actors, self._shares(hashes)) if len(idx)]
        for idx, ref in asked:
            found[idx] = ray.get(ref)
        return found

    def add(self, hashes: np.ndarray) -> None:
        import ray

        ray.get([a.add.remote(hashes[idx]) for a, idx in zip(self.actors, self._shares(hashes)) if len(idx)])

    def __len__(self) -> int:
        import ray

        return sum(ray.get([a.size.remote() for a in self.actors]))

    def check_and_add_refs(self, hashes) -> list:
        """:meth:`UidRegistry.check_and_add` on every actor, `hashes` being an ObjectRef (or array):
        refs of the actors' answers, to OR where they are needed (the caller never holds the
        hashes nor the answers).

        Each shard's check depends on the previous shard's answers. Why: the hashes come from a
        writer actor, and when that actor is lost (its node dies) the previous shard's call fails
        without adding its uids; a later shard checked anyway would keep a uid the lost shard holds,
        and a rerun (which redoes the lost shard with the earliest-shard rule) would then commit that
        uid twice. With the dependency every later check, hence every later commit, fails too."""
        refs = [a.check_and_add.remote(hashes, k, self.n, *self._previous) for k, a in enumerate(self.actors)]
        self._previous = refs
        return refs

    def add_part_refs(self, store: Store, url: str) -> list:
        """A committed part's uids as seen: each actor reads the part's uid column and adds its share
        (before any later call of this driver on the actor); refs to wait on (a read that failed)."""
        return [a.add_part.remote(store, url, k, self.n) for k, a in enumerate(self.actors)]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def registry_actor_count(setting: int | str, rows_per_shard: int, n_shards: int) -> int:
    """How many actors hold the uids seen: `embed.uid_registry_actors`,
    or for auto one per UIDS_PER_REGISTRY_ACTOR of the estimated pool."""
    if setting != "auto":
        return int(setting)
    return max(1, math.ceil(rows_per_shard * n_shards / UIDS_PER_REGISTRY_ACTOR))


@dataclass
class ShardResult:
    """A complete shard's usable rows (in shard order, at `positions` in the shard) and its skip
    records ((position, key, uid, reason))."""

    uids: list[str]
    keys: list[str]
    scores: np.ndarray
    image: np.ndarray
    text: np.ndarray
    captions: list[str]
    widths: np.ndarray  # original image size (int32)
    heights: np.ndarray
    skips: list[tuple[int, str, str, str]] = field(default_factory=list)
    missing: str | None = None  # why the shard could not be read (input.allow_missing_shards): no rows
    positions: np.ndarray | None = None  # of the rows (tar order; None when there are none)
    sha256s: list[str] | None = None  # of the image members' bytes (None: unknown for every row)

    @classmethod
    def unreadable(cls, reason: str) -> "ShardResult":
        return cls([], [], np.zeros(0, np.float32), np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16),
                   [], np.zeros(0, np.int32), np.zeros(0, np.int32), [], reason)


class ShardAccumulator:
    """Rows of one shard arriving out of order from the actors, until its marker says it is whole."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.expected: int | None = None
        self.skips: list[tuple[int, str, str, str]] = []
        self.error = ""  # the shard could not be read (its marker says why)

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.chunks.append(rows)
        self.rows += len(rows["uid"])

    def drop(self, record: tuple[int, str, str, str]) -> None:
        """A row the actor could not embed (a JPEG neither the device nor PIL decodes, with device
        decode): its skip record (position, key, uid, reason), and counted as arrived (the marker
        counted it as sent)."""
        self.skips.append(record)
        self.rows += 1

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.rows == self.expected

    def result(self) -> ShardResult:
        if not self.chunks:
            return ShardResult([], [], np.zeros(0, np.float32), np.zeros((0, 0), np.float16),
                               np.zeros((0, 0), np.float16), [], np.zeros(0, np.int32), np.zeros(0, np.int32),
                               self.skips)
        cat = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        order = np.argsort(cat["sample_index"], kind="stable")
        return ShardResult([str(u) for u in cat["uid"][order]], [str(k) for k in cat["key"][order]],
                           cat["clip_score"][order], cat["image_embedding"][order],
                           cat["text_embedding"][order], [str(c) for c in cat["caption"][order]],
                           cat["original_width"][order], cat["original_height"][order], self.skips,
                           positions=cat["sample_index"][order],
                           sha256s=[str(d) for d in cat["sha256"][order]] if "sha256" in cat else None)


class ShardWriter:
    """Ray actor (one of a few per stage run): gathers the embedded rows of the shards assigned to it
    (:func:`writer_of`), sent by the model actors, and commits each shard's part when the driver
    says which of its uids earlier shards already hold. It holds only its shards in flight: a shard
    leaves it when committed (or when it could not be read).

    The driver never sees a row: :meth:`add` answers the model actor with an event (a shard now
    complete, with its counts, or unreadable), which the model actor passes on as a small record;
    :meth:`uid_hashes` goes to the uid registry by reference; :meth:`commit` returns the part's
    stats, its commit record."""

    def __init__(self, store: Store, directory: str, urls: dict[int, str], dim: int):
        self.store, self.directory, self.urls, self.dim = store, directory, urls, dim
        self.partial: dict[int, ShardAccumulator] = {}
        self.complete: dict[int, ShardResult] = {}
        self.failed: set[int] = set()  # unreadable shards: their late rows are dropped

    def add(self, index: int, rows: dict[str, np.ndarray] | None, dropped: list[tuple[int, str, str, str]],
            marker: tuple[int, str, str] | None) -> tuple[str, int, int, str] | None:
        """Rows of shard `index` from one model batch (any columns; None: none), the rows the actor
        could not decode ((position, key, uid, reason)), and the shard's end marker when in this
        batch ((samples, skip records json, error)). Returns ("complete", rows, rows + skips, "")
        once every row is in, ("failed", 0, 0, reason) for a shard that could not be read, else None."""
        if index in self.failed:
            return None
        acc = self.partial.setdefault(index, ShardAccumulator())
        url = self.urls[index]
        for position, key, uid, reason in dropped:
            # the json uid only (as every skip record), never the md5 fallback
            acc.drop((position, key, "" if uid == fallback_uid(url, key) else uid, reason))
        if rows is not None:
            acc.add(rows)
        if marker is not None:
            acc.expected = marker[0]
            acc.skips.extend(tuple(r) for r in json.loads(marker[1]))
            acc.error = marker[2]
        if acc.error:
            # a shard that could not be read as a whole: never commit part of it
            self.failed.add(index)
            del self.partial[index]
            return ("failed", 0, 0, acc.error)
        if not acc.complete:
            return None
        result = self.partial.pop(index).result()
        self.complete[index] = result
        return ("complete", len(result.uids), len(result.uids) + len(result.skips), "")

    def uid_hashes(self, index: int) -> np.ndarray:
        """The 64-bit uid hashes of complete shard `index`'s rows, in shard order."""
        return uid_hashes(self.complete[index].uids)

    def commit(self, index: int, missing: str | None, *seen: np.ndarray) -> dict[str, Any]:
        """Commit shard `index` (:func:`commit_part`): its rows less those whose uid an earlier
        shard holds (`seen`: the registry actors' answers, OR-ed) or an earlier row of this
        shard, recorded as `duplicate_uid`; `missing`: the shard could not be read and is
        committed empty (input.allow_missing_shards). Returns the stats, where and by whom written."""
        url = self.urls[index]
        # an unreadable shard stays in `failed`: rows of it still on their way are dropped
        result = ShardResult.unreadable(missing) if missing is not None else self.complete.pop(index)
        skips = list(result.skips)
        hashes = uid_hashes(result.uids)
        keep = np.ones(len(hashes), dtype=bool)
        for found in seen:
            keep &= ~found
        # also within the shard (the reader dedupes already; precomputed files may not be)
        _, first = np.unique(hashes, return_index=True)
        unique = np.zeros(len(hashes), dtype=bool)
        unique[first] = True
        keep &= unique
        for i in np.flatnonzero(~keep).tolist():
            # the json uid, not the md5 fallback (two shards of one basename in two folders share those)
            uid, key = result.uids[i], result.keys[i]
            skips.append((int(result.positions[i]), key, "" if uid == fallback_uid(url, key) else uid, DUPLICATE_UID))
        skips.sort(key=lambda r: r[0])  # shard order (positions are unique within a shard)
        idx = np.flatnonzero(keep)
        # an empty part still has the D-sized list type, so every part has one schema
        image = result.image[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        text = result.text[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        table = part_table(url, [result.uids[i] for i in idx], [result.keys[i] for i in idx],
                           result.scores[idx], image, text, [result.captions[i] for i in idx],
                           result.widths[idx], result.heights[idx],
                           None if result.sha256s is None else [result.sha256s[i] for i in idx])
        stats = commit_part(self.store, self.directory, index, url, table, [r[1:] for r in skips], result.missing)
        return {"index": index, "stats": stats, "pid": os.getpid()}


def writer_of(index: int, n_writers: int) -> int:
    """The writer actor that gathers and commits shard `index`."""
    return index % n_writers


class PartCommitter:
    """The driver's side of the commits: decides them in shard order, the data staying in the
    :class:`ShardWriter` actors.

    A shard reported complete is decided once every shard before it is: its uid hashes go (by
    reference) from its writer to the uid registry actors, which answer which were seen in earlier
    shards and then count them as seen; the answers go (by reference) to the writer's commit
    (`duplicate_uid` for those, the skip records, ``part-NNNNN.stats.json``, then
    ``part-NNNNN.parquet``). Decisions in shard order make the duplicate rule deterministic (the
    earliest shard wins); the commits themselves run in the writers, in parallel, and a part is
    committed only after every uid before it was registered, so a rerun that redoes any shard
    without a part decides exactly as this run did. The driver holds a few numbers per pending
    shard and receives each part's stats (:meth:`poll`)."""

    def __init__(self, store: Store, directory: str, urls: list[str], pending: list[int], committed: list[int],
                 on_part_committed: Callable[[int], None] | None = None, registry_setting: int | str = 1):
        self.store, self.urls = store, urls
        self.directory = directory
        self.queue = sorted(pending)
        self.position = 0
        self.ready: dict[int, tuple[int, int, str | None]] = {}  # complete shard -> (rows, rows + skips, missing)
        # the uids seen: built at the first rows, when the pool's size can be estimated
        self.registry: ShardedUidRegistry | None = None
        self.registry_setting = registry_setting  # embed.uid_registry_actors
        self.on_disk = sorted(committed)  # parts committed by earlier runs, loaded as they come due
        self._disk_position = 0
        self._loading: list = []  # refs of committed parts being loaded into the registry
        self.on_part_committed = on_part_committed
        self.stats: dict[int, dict[str, Any]] = {}
        self.writers: list = []
        self.writer_pids: set[int] = set()
        self.in_flight: dict[Any, int] = {}  # commit ref -> shard
        self._reported = 0  # queue position up to which commits were reported
        self.received_bytes = 0  # commit records received (their json size)
        self.dim: int | None = None

    def start_writers(self, n_writers: int, dim: int) -> None:
        """`n_writers` :class:`ShardWriter` actors (0 CPUs: they wait on the model actors, and
        their parquet writes are what the driver used to do), spread over the cluster; each gets
        the URLs of its pending shards only."""
        import ray

        self.dim = dim
        actor = ray.remote(num_cpus=0, max_restarts=0)(ShardWriter)
        self.writers = [actor.options(scheduling_strategy="SPREAD").remote(
            self.store, self.directory, {i: self.urls[i] for i in self.queue if writer_of(i, n_writers) == w}, dim)
            for w in range(n_writers)]

    def add(self, index: int, rows: int, samples: int, missing: str | None = None) -> None:
        """Shard `index` is complete in its writer (`rows` usable rows, `samples` with the skipped
        ones), or could not be read and is to be committed empty (`missing`: why)."""
        self.ready[index] = (rows, samples, missing)
        while self.position < len(self.queue) and self.queue[self.position] in self.ready:
            index = self.queue[self.position]
            self._register_committed_below(index)
            self._decide(index, *self.ready.pop(index))
            self.position += 1

    def _decide(self, index: int, rows: int, samples: int, missing: str | None) -> None:
        writer = self.writers[writer_of(index, len(self.writers))]
        seen = []
        if rows:
            registry = self._registry(samples)
            if self._loading:  # committed parts below this shard must be in before it is checked
                import ray

                ray.get(self._loading)
                self._loading = []
            seen = registry.check_and_add_refs(writer.uid_hashes.remote(index))
        self.in_flight[writer.commit.remote(index, missing, *seen)] = index

    def poll(self, timeout: float | None = 0) -> None:
        """Take in the commit records that are in (waiting up to `timeout` s for one; None: for all)."""
        import ray

        while self.in_flight:
            refs = list(self.in_flight)
            ready, _ = ray.wait(refs, num_returns=len(refs) if timeout is None else 1,
                                timeout=timeout, fetch_local=True)
            if not ready:
                return
            for ref in ready:
                index = self.in_flight.pop(ref)
                record = ray.get(ref)
                self.received_bytes += len(json.dumps(record))
                self.stats[index] = record["stats"]
                self.writer_pids.add(record["pid"])
            # reported in shard order (progress, hooks): a part reported has every part before it
            while self._reported < len(self.queue) and self.queue[self._reported] in self.stats:
                self._reported += 1
                if self.on_part_committed is not None:
                    self.on_part_committed(self.queue[self._reported - 1])
            if timeout is not None:
                timeout = 0

    @property
    def done(self) -> bool:
        return self.position == len(self.queue)

    @property
    def registry_actors(self) -> int:
        """Actors holding the uids seen (before any rows, what the setting says)."""
        if self.registry is None:
            return registry_actor_count(self.registry_setting, 0, 0)
        return self.registry.n

    def _registry(self, rows: int) -> ShardedUidRegistry:
        if self.registry is None:
            n = registry_actor_count(self.registry_setting, max(rows, 1), len(self.urls))
            self.registry = ShardedUidRegistry(n)
            if n > 1:
                log.info("duplicate-uid check: the uids seen are held by %d Ray actors (split by uid hash)", n)
        return self.registry

    def close(self) -> None:
        """Release the writers and the registry's actors (the uids seen live no longer than the stage)."""
        import ray

        for writer in self.writers:
            ray.kill(writer)
        self.writers = []
        if self.registry is not None:
            self.registry.close()

    @property
    def next_index(self) -> int | None:
        """The shard the next decision waits for (None when every pending shard is decided)."""
        return None if self.done else self.queue[self.position]

    def _register_committed_below(self, index: int) -> None:
        # Only parts *before* this shard decide whether its uids are duplicates, as in a fresh run.
        while self._disk_position < len(self.on_disk) and self.on_disk[self._disk_position] < index:
            done = self.on_disk[self._disk_position]
            name = join(self.directory, part_name(done))
            rows = int(self.store.read_json(name + ".stats.json")["samples"])
            if rows:
                self._loading += self._registry(rows).add_part_refs(self.store, name + ".parquet")
            self._disk_position += 1


def commit_part(store: Store, directory: str, index: int, shard_url: str, table, skips: list[tuple[str, str, str]],
                missing: str | None = None) -> dict[str, Any]:
    """Commit input shard `index`'s part: its skip records (`skips`: (key, uid, reason) per input
    sample not in `table`), its stats json, then the part (the commit). The stats say how many
    rows, why the others were skipped (counted from the records, so the two always agree), and
    how many uids DataComp's resharder cannot
    select (:func:`~pipeline.formats.datacomp.uid_notes`); for a shard that could not be read and
    was skipped (input.allow_missing_shards), why (``missing``). Returns the stats."""
    uids = table.column("uid").to_pylist()
    skipped = Counter(reason for _, _, reason in skips)
    stats: dict[str, Any] = {"shard": shard_url, "samples": table.num_rows,
                             "skipped": dict(sorted((k, int(v)) for k, v in skipped.items() if v))}
    notes = uid_notes(uids, table.column("key").to_pylist(), shard_url)
    if notes:
        stats["uid_notes"] = notes
    if missing is not None:
        stats["missing"] = missing
    name = part_name(index)
    write_skipped(store, skipped_url(directory, name), skipped_table(shard_url, skips))
    store.write_json(join(directory, name + ".stats.json"), stats)
    write_part(store, join(directory, name + ".parquet"), table)
    if missing is not None:
        log.warning("shard %s: skipped as missing (%s), input.allow_missing_shards", shard_url, missing)
    elif stats["skipped"]:
        log.warning("shard %s: %d samples embedded, skipped %s", shard_url, table.num_rows,
                    ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()))
    else:
        log.info("shard %s: %d samples embedded", shard_url, table.num_rows)
    return stats


def committed_indices(store: Store, directory: str, n_shards: int) -> list[int]:
    """Indices of the input shards whose part is committed in `directory`."""
    names = set(store.ls(directory))
    return [i for i in range(n_shards) if part_name(i) + ".parquet" in names]
