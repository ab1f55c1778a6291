"""Partition workers: each holds some partitions of the select stage across every step (load,
pre-filter, shift, the method's rounds or cuts, final scores, outputs), exchanging messages
directly with the other workers (:mod:`.mailbox`), and the driver's typed handle on them
(:class:`Hosts`).

Why long-lived workers (Ray actors) and not tasks: a partition's state (its rows, the candidate
heap, parked nodes, the halo bounds) is built once, in O(its share), and then changes a little per
round for tens of rounds; tasks would rebuild or reship it every round. Why several partitions per
worker: P is a property of the data (cells, memory per partition) while the number of processes is
a property of the cluster; a worker (one per CPU by default, ``select.workers``) hosts its share of
the partitions and parks those that do not fit its memory (:class:`.mailbox.Resident`).

Each step takes every partition of a worker from one phase to the next (:mod:`.phases`: the
fields of each phase are declared there) and returns a small report per partition; a step given
a partition in another phase than it expects fails naming both. The driver holds O(partitions)
numbers per step.

The same class runs in-process (:class:`LocalHosts`, small pools and tests) and as Ray actors
(:class:`RayHosts`); the arithmetic is the same either way.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import numpy as np

from ..core import coreset
from ..core.partition import PartitionRows
from ..formats.shuffle import ColumnFile, write_columns
from ..runtime import peak_rss_bytes
from . import partition_io, phases
from .mailbox import Mailbox, Resident
from .methods import Cut, CutSelector, selector
from .phases import (PREFILTER, BuildReport, Built, Finished, Halo, Kept, KeptReport, LoadReport, Loaded, Negative,
                     Picked, ReverseSummary, RoundReport, Shifted)
from .shuffle import ShuffleJob, edge_sources

T = TypeVar("T")


@dataclass(frozen=True)
class HostSettings:
    """The select settings a worker needs (picklable)."""

    seed: int
    gamma_forward: float
    gamma_reverse: float
    memory_limit: int | None  # bytes of resident partitions; None = no limit
    spill_dir: str


@dataclass
class Reply(Generic[T]):
    """A worker's answer to one step: a report per partition, and its own times and memory."""

    parts: dict[int, T]
    seconds: float
    exchange_seconds: float
    rss: int
    spilled_bytes: int
    resident_bytes: int


def _expect(pid: int, held, kinds: tuple[type, ...]) -> None:
    if not isinstance(held, kinds):
        have = type(held).__name__ if held is not None else "nothing"
        raise RuntimeError(f"partition {pid}: this step needs phase {' or '.join(k.__name__ for k in kinds)}, "
                           f"the worker holds {have} (steps called out of order)")


class PartitionHost:
    """One worker: its partitions' phases, its mailbox; one method per step."""

    def __init__(self, host_id: int, job: ShuffleJob, settings: HostSettings):
        self.host_id = host_id
        self.job = job
        self.settings = settings
        self.mail = Mailbox(host_id, job.plan.host_of)
        self.held = Resident(job.plan.partitions_of(host_id), settings.memory_limit,
                             os.path.join(settings.spill_dir, f"host-{host_id}"))

    # ---- running a step over the partitions ----------------------------------------------------

    def _step(self, kinds: tuple[type, ...] | None, fn: Callable[[int, Any], tuple[Any, T]]) -> Reply[T]:
        """``fn(pid, phase) -> (next phase, report)`` for every hosted partition (each in one of
        ``kinds``; None: none loaded yet), then wait for the step's messages to be delivered."""
        t0 = time.perf_counter()
        self.mail.reset()

        def checked(pid, held):
            if kinds is not None:
                _expect(pid, held, kinds)
            return fn(pid, held)

        out = self.held.step(checked)
        self.mail.flush()
        return Reply(out, time.perf_counter() - t0, self.mail.exchange, peak_rss_bytes(), self.held.spilled_bytes,
                     self.held.resident_bytes())

    def _read(self, kinds: tuple[type, ...], fn: Callable[[int, Any], T]) -> Reply[T]:
        """A step that keeps every partition in its phase: ``fn(pid, phase) -> report``."""
        return self._step(kinds, lambda pid, held: (held, fn(pid, held)))

    def set_peers(self, peers: list, remote: bool) -> None:
        self.mail.set_peers(peers, remote)

    def deliver(self, kind: str, rnd: int, dst: int, src: int, payload) -> None:
        self.mail.deliver(kind, rnd, dst, src, payload)

    def close(self) -> None:
        self.held.close()

    # ---- load, pre-filter, shift ----------------------------------------------------------------

    def load(self, edges: bool) -> Reply[LoadReport]:
        """Owned nodes and raw scores, and (``edges``) the partition's rows from the shuffle."""
        job = self.job

        def load(pid, _):
            pool = partition_io.read_pool(job, pid)
            halo = None
            if edges:
                rows = PartitionRows(pid, job.plan.n_partitions, job.plan.n_nodes, pool.owned).build(
                    edge_sources(job, pid))
                halo = Halo(rows, np.full(len(rows.halo_ids), np.nan))
            some = pool.raw.size > 0
            return Loaded(pool, halo), LoadReport(
                int(pool.owned.size), int(pool.passes().sum()), int(halo.rows.n_entries) if edges else 0,
                float(pool.raw.min()) if some else None, float(pool.raw.max()) if some else None)

        return self._step(None, load)

    def send_scores(self) -> Reply[int]:
        """Raw scores of each boundary list to the partition that holds those nodes as halo, and
        whether they pass the basic filter (a halo node that does not leaves the graph there too)."""
        def send_scores(pid, loaded: Loaded):
            pool, sent = loaded.pool, 0
            passes = pool.passes()
            for b, rows in loaded.halo.rows.boundary.items():
                payload = (pool.owned[rows], pool.raw[rows], passes[rows])
                self.mail.send("scores", 0, b, pid, payload)
                sent += sum(a.nbytes for a in payload)
            return sent

        return self._read((Loaded,), send_scores)

    def prefilter(self, last_kept) -> Reply[KeptReport]:
        """The basic filter's and the β pre-filter's survivors (phases.prefilter)."""
        def prefilter(pid, loaded: Loaded):
            if loaded.halo is not None:
                phases.take_halo_scores(loaded.halo, pid, self.mail.take("scores", 0, pid))
            return phases.prefilter(loaded, last_kept)

        return self._step((Loaded,), prefilter)

    def shift(self, offset: float) -> Reply[Negative | None]:
        def shift(pid, kept: Kept):
            shifted, worst = phases.shift(kept, offset)
            if worst is None:
                return shifted, None
            uid = partition_io.read_uids(self.job, pid, [worst])[0].as_py()
            return shifted, Negative(int(kept.pool.owned[worst]), uid, float(kept.pool.raw[worst] + offset))

        return self._step((Kept,), shift)

    # ---- D2: state, forward and reverse rounds, final scores -----------------------------------

    def build(self, offset: float) -> Reply[BuildReport]:
        return self._step((Shifted,), lambda pid, shifted: phases.build(shifted, offset))

    def forward_round(self, rnd: int) -> Reply[int]:
        gamma = self.settings.gamma_forward

        def forward_round(pid, built: Built):
            st = built.state
            for src, values in self.mail.take("fwd", rnd - 1, pid):
                st.receive_forward(src, values)
            sent = 0
            for dst, values in st.forward_round(gamma).items():
                self.mail.send("fwd", rnd, dst, pid, values)
                sent += values.nbytes
            return sent

        return self._read((Built,), forward_round)

    def forward_done(self, rounds: int) -> Reply[float]:
        def forward_done(pid, built: Built):
            for src, values in self.mail.take("fwd", rounds, pid):
                built.state.receive_forward(src, values)
            return built.state.max_forward()

        return self._read((Built,), forward_done)

    def start_reverse(self, shift: int) -> Reply[None]:
        return self._read((Built,), lambda pid, built: built.state.start_reverse(shift))

    def reverse_round(self, rnd: int, settle: bool, threshold, limit: int, remaining: int,
                      dead_level) -> Reply[RoundReport]:
        """Settle against the last round's threshold (``settle``), then one step
        (:meth:`PartitionState.step`): the round's reports."""
        gamma = self.settings.gamma_reverse

        def reverse_round(pid, built: Built):
            st = built.state
            report = st.settle(threshold, limit) if settle else None
            t0 = time.perf_counter()
            out = st.step(self.mail.take("rev", rnd - 1, pid), remaining, gamma, dead_level)
            step_seconds = time.perf_counter() - t0
            sent = 0
            for dst, msg in out.items():
                self.mail.send("rev", rnd, dst, pid, msg)
                sent += msg.nbytes
            return RoundReport(report, st.best_unpicked(), int(st.last_picks), len(out), sent, step_seconds)

        return self._read((Built,), reverse_round)

    def reverse_summary(self) -> Reply[ReverseSummary]:
        return self._read((Built,), lambda pid, built: ReverseSummary(
            built.state.n_picks, built.state.n_parks, built.state.n_rechecks, built.state.late_suppressions))

    def exact_picks(self, threshold, limit: int, shift: int) -> Reply[int]:
        def exact_picks(pid, built: Built):
            picked = phases.exact_picks(built, threshold, limit, shift)
            return picked, int(picked.picks.nodes.size)

        return self._step((Built,), exact_picks)

    def finish_send(self, last) -> Reply[int]:
        gamma = self.settings.gamma_reverse

        def finish_send(pid, picked: Picked):
            sent = 0
            for dst, msg in picked.state.finish_send(last, gamma).items():
                self.mail.send("final", 0, dst, pid, msg)
                sent += msg.nbytes
            return sent

        return self._read((Picked,), finish_send)

    def finish_receive(self, shift: int) -> Reply[int]:
        def finish_receive(pid, picked: Picked):
            done = phases.settled(picked, picked.state.finish_receive(self.mail.take("final", 0, pid)), shift)
            return done, int(np.count_nonzero(done.blame_node >= 0))

        return self._step((Picked,), finish_receive)

    def no_reverse(self) -> Reply[int]:
        return self._step((Built, Picked), lambda pid, held: (phases.no_reverse(held), 0))

    # ---- searches over sorted runs (the pre-filter's threshold, a cut selector's cuts) ---------

    def _sorted_run(self, held, kind) -> tuple[np.ndarray, np.ndarray]:
        if kind in held.runs:
            return held.runs[kind]
        if kind == PREFILTER:  # the basic filter's passes by raw score: d2.prefilter_mask's ranking
            passes = held.pool.passes()
            major, minor = coreset.float_order_bits(held.pool.raw[passes]), held.pool.owned[passes]
        elif isinstance(kind, Cut) and isinstance(held, Shifted):
            minor, scores = held.kept_ids, held.shifted
            if kind.group is not None:
                member = held.groups == kind.group
                minor, scores = minor[member], scores[member]
            major = np.asarray(selector(kind.method).cut_keys(self.settings.seed, minor, scores), np.int64)
        else:
            raise ValueError(f"no search {kind!r} in phase {type(held).__name__}")
        order = coreset.ranking_order(major, minor)
        held.runs[kind] = (np.ascontiguousarray(major[order]), np.ascontiguousarray(minor[order]))
        return held.runs[kind]

    def search_samples(self, kind, after, upto, points: int) -> Reply[tuple]:
        return self._read((Loaded, Shifted), lambda pid, held: coreset.run_samples(
            *self._sorted_run(held, kind), after, upto, points))

    def search_counts(self, kind, queries) -> Reply[np.ndarray]:
        return self._read((Loaded, Shifted), lambda pid, held: coreset.count_at_or_before(
            *self._sorted_run(held, kind), queries))

    def drop_runs(self, kind) -> Reply[bool]:
        return self._read((Loaded, Shifted), lambda pid, held: held.runs.pop(kind, None) is not None)

    # ---- baselines: cuts, one-task picks ---------------------------------------------------------

    def score_range(self) -> Reply[tuple[float, float] | None]:
        """The survivors' lowest and highest shifted score (None: no survivor)."""
        return self._read((Shifted,), lambda pid, s: (float(s.shifted.min()), float(s.shifted.max()))
                          if s.shifted.size else None)

    def set_groups(self, method: str, params) -> Reply[np.ndarray]:
        """Label the survivors with the cut selector's groups (CCS: strata); survivors per group."""
        def set_groups(pid, shifted: Shifted):
            shifted.groups, counts = selector(method).groups(shifted.shifted, params)
            return counts

        return self._read((Shifted,), set_groups)

    def cut_picks(self, kind: Cut, last) -> Reply[int]:
        """The survivors at or before ``last`` in the ranking of search ``kind`` join the cut."""
        return self._read((Shifted,), lambda pid, s: phases.cut(s, kind, self._sorted_run(s, kind), last))

    def rank_cut(self, method: str) -> Reply[int]:
        """The cut, ranked by the selector's order keys: this partition's run of picks."""
        chosen = selector(method)
        if not isinstance(chosen, CutSelector):
            raise TypeError(f"select.method {method!r} does not cut")
        seed = self.settings.seed

        def rank_cut(pid, shifted: Shifted):
            picked = phases.ranked_cut(shifted, lambda ids, s: chosen.order_keys(seed, ids, s))
            return picked, int(picked.picks.nodes.size)

        return self._step((Shifted,), rank_cut)

    def survivors_file(self, template: str) -> Reply[int]:
        """The survivors (node, shifted score, partition) for a selector that runs in one task."""
        def survivors_file(pid, shifted: Shifted):
            ids = shifted.kept_ids
            write_columns(self.job.store, template.format(pid), {"node": ids, "score": shifted.shifted,
                                                                 "owner": np.full(ids.size, pid, np.int32)})
            return int(ids.size)

        return self._read((Shifted,), survivors_file)

    def adopt_picks(self, url: str) -> Reply[int]:
        """Picks made in one task: this partition's rows of that run, in its order."""
        def adopt_picks(pid, shifted: Shifted):
            with ColumnFile(self.job.store, url) as f:
                got = f.read_rows(0, f.rows, ["node", "major", "owner"])
            mine = got["owner"] == pid
            picked = phases.adopted(shifted, got["node"][mine], got["major"][mine])
            return picked, int(picked.picks.nodes.size)

        return self._step((Shifted,), adopt_picks)

    def memory(self) -> Reply[None]:
        """Nothing done: the worker's peak memory and spill, reported."""
        return Reply({}, 0.0, 0.0, peak_rss_bytes(), self.held.spilled_bytes, self.held.resident_bytes())

    # ---- outputs ---------------------------------------------------------------------------------

    def write_run(self, template: str) -> Reply[int]:
        """This partition's sorted run of picks, for the merge (:mod:`.outputs`)."""
        return self._read((Picked, Finished), lambda pid, held: partition_io.write_run(
            self.job, template.format(pid), held.pool, held.picks))

    def write_outputs(self, ranks: str, nodes: str, subsets: list[str], budgets: list[int],
                      decisions: bool = False) -> Reply[dict]:
        """The partition's outputs (:func:`.partition_io.write_outputs`); the partition is freed."""
        def write_outputs(pid, held):
            return None, partition_io.write_outputs(self.job, phases.finished(held), ranks.format(pid),
                                                    nodes.format(pid), [t.format(pid) for t in subsets], budgets,
                                                    decisions)

        return self._step((Picked, Finished), write_outputs)


# --------------------------------------------------------------------------------------------
# The driver's handle on the workers
# --------------------------------------------------------------------------------------------


class Hosts(ABC):
    """Run a step on every worker: the per-partition reports merged (by partition id), and what
    the workers report about themselves (seconds per step, time in exchange, peak memory)."""

    def __init__(self):
        self.peak_rss = 0
        self.spilled_bytes = 0
        self.seconds: dict[str, float] = defaultdict(float)
        self.exchange_seconds: dict[str, float] = defaultdict(float)
        self.last: list[Reply] = []

    @abstractmethod
    def _replies(self, method: Callable[..., Reply[T]], args: tuple) -> list[Reply[T]]:
        """Every worker's reply to ``method(*args)``."""

    def each(self, method: Callable[..., Reply[T]], *args) -> dict[int, T]:
        """``method`` (a :class:`PartitionHost` step) on every worker."""
        replies = self._replies(method, args)
        parts: dict[int, T] = {}
        for r in replies:
            parts.update(r.parts)
            self.peak_rss = max(self.peak_rss, r.rss)
            self.spilled_bytes = max(self.spilled_bytes, r.spilled_bytes)
        self.seconds[method.__name__] += max((r.seconds for r in replies), default=0.0)
        self.exchange_seconds[method.__name__] += max((r.exchange_seconds for r in replies), default=0.0)
        self.last = replies
        return dict(sorted(parts.items()))

    @abstractmethod
    def close(self) -> None:
        """Stop the workers and remove their parked partitions."""

    @property
    def actors(self) -> list | None:
        """The workers as Ray actors that run a step's tasks (:func:`pipeline.steps.run_step`);
        None in process."""
        return None

    # typed steps (PartitionHost's methods of the same name)
    def load(self, edges: bool) -> dict[int, LoadReport]:
        return self.each(PartitionHost.load, edges)

    def send_scores(self) -> dict[int, int]:
        return self.each(PartitionHost.send_scores)

    def prefilter(self, last_kept) -> dict[int, KeptReport]:
        return self.each(PartitionHost.prefilter, last_kept)

    def shift(self, offset: float) -> dict[int, Negative | None]:
        return self.each(PartitionHost.shift, offset)

    def build(self, offset: float) -> dict[int, BuildReport]:
        return self.each(PartitionHost.build, offset)

    def forward_round(self, rnd: int) -> dict[int, int]:
        return self.each(PartitionHost.forward_round, rnd)

    def forward_done(self, rounds: int) -> dict[int, float]:
        return self.each(PartitionHost.forward_done, rounds)

    def start_reverse(self, shift: int) -> None:
        self.each(PartitionHost.start_reverse, shift)

    def reverse_round(self, rnd: int, settle: bool, threshold, limit: int, remaining: int,
                      dead_level) -> dict[int, RoundReport]:
        return self.each(PartitionHost.reverse_round, rnd, settle, threshold, limit, remaining, dead_level)

    def reverse_summary(self) -> dict[int, ReverseSummary]:
        return self.each(PartitionHost.reverse_summary)

    def exact_picks(self, threshold, limit: int, shift: int) -> dict[int, int]:
        return self.each(PartitionHost.exact_picks, threshold, limit, shift)

    def finish_send(self, last) -> dict[int, int]:
        return self.each(PartitionHost.finish_send, last)

    def finish_receive(self, shift: int) -> dict[int, int]:
        return self.each(PartitionHost.finish_receive, shift)

    def no_reverse(self) -> None:
        self.each(PartitionHost.no_reverse)

    def search_samples(self, kind, after, upto, points: int) -> dict[int, tuple]:
        return self.each(PartitionHost.search_samples, kind, after, upto, points)

    def search_counts(self, kind, queries) -> dict[int, np.ndarray]:
        return self.each(PartitionHost.search_counts, kind, queries)

    def drop_runs(self, kind) -> None:
        self.each(PartitionHost.drop_runs, kind)

    def score_range(self) -> dict[int, tuple[float, float] | None]:
        return self.each(PartitionHost.score_range)

    def set_groups(self, method: str, params) -> dict[int, np.ndarray]:
        return self.each(PartitionHost.set_groups, method, params)

    def cut_picks(self, kind: Cut, last) -> dict[int, int]:
        return self.each(PartitionHost.cut_picks, kind, last)

    def rank_cut(self, method: str) -> dict[int, int]:
        return self.each(PartitionHost.rank_cut, method)

    def survivors_file(self, template: str) -> dict[int, int]:
        return self.each(PartitionHost.survivors_file, template)

    def adopt_picks(self, url: str) -> dict[int, int]:
        return self.each(PartitionHost.adopt_picks, url)

    def write_run(self, template: str) -> dict[int, int]:
        return self.each(PartitionHost.write_run, template)

    def write_outputs(self, ranks: str, nodes: str, subsets: list[str], budgets: list[int],
                      decisions: bool) -> dict[int, dict]:
        return self.each(PartitionHost.write_outputs, ranks, nodes, subsets, budgets, decisions)

    def memory(self) -> None:
        self.each(PartitionHost.memory)


class LocalHosts(Hosts):
    """The workers as objects of this process (same protocol)."""

    def __init__(self, job: ShuffleJob, settings: HostSettings):
        super().__init__()
        self.hosts = [PartitionHost(h, job, settings) for h in range(job.plan.n_hosts)]
        for h in self.hosts:
            h.set_peers(self.hosts, remote=False)

    def _replies(self, method, args: tuple) -> list[Reply]:
        return [method(h, *args) for h in self.hosts]

    def close(self) -> None:
        for h in self.hosts:
            h.close()


class RayHosts(Hosts):
    """The workers as Ray actors: ``deliver`` runs in its own concurrency group, so a worker
    receives messages while it computes; one CPU each (less when ``select.workers`` asks for more
    workers than the cluster has CPUs)."""

    def __init__(self, job: ShuffleJob, settings: HostSettings, cpus: float):
        super().__init__()
        import ray

        actor = ray.remote(concurrency_groups={"io": 4})(_RayHost)
        n = job.plan.n_hosts
        per = min(1.0, max(0.01, cpus / n)) if cpus else 1.0
        self.hosts = [actor.options(num_cpus=per).remote(h, job, settings) for h in range(n)]
        ray.get([h.set_peers.remote(self.hosts, True) for h in self.hosts])

    def _replies(self, method, args: tuple) -> list[Reply]:
        import ray

        return ray.get([getattr(h, method.__name__).remote(*args) for h in self.hosts])

    @property
    def actors(self) -> list:
        return list(self.hosts)

    def close(self) -> None:
        import ray

        try:
            ray.get([h.close.remote() for h in self.hosts])
        finally:
            for h in self.hosts:
                ray.kill(h)


class _RayHost(PartitionHost):
    """PartitionHost as an actor: ``deliver`` on the "io" threads, every other method on the
    default group's one thread (one step at a time)."""

    def deliver(self, kind, rnd, dst, src, payload):
        return PartitionHost.deliver(self, kind, rnd, dst, src, payload)

    deliver.__ray_concurrency_group__ = "io"

    def run_task(self, fn, i, *args):
        """One task of a stage step, on this worker's already warm process (between the steps of
        the method, in the default group: never beside one)."""
        return i, fn(*args)


__all__ = ["HostSettings", "Hosts", "LocalHosts", "PartitionHost", "RayHosts", "Reply"]
