"""Partition workers: each holds some partitions of the select stage across every step (load,
pre-filter, forward rounds, reverse rounds, final scores, outputs), exchanging messages directly
with the other workers.

Why long-lived workers (Ray actors) and not tasks: a partition's state (its rows, the candidate
heap, parked nodes, the halo bounds) is built once, in O(its share), and then changes a little per
round for tens of rounds; tasks would rebuild or reship it every round. Why several partitions per
worker: P is a property of the data (cells, memory per partition) while the number of processes is
a property of the cluster; a worker (one per CPU by default, ``select.workers``) hosts its share of
the partitions, and parks those that do not fit its memory budget (``select.worker_memory_mb``)
on node-local disk between uses (pickled; loaded again when it is their turn: the "spill").
Node-local, not the workdir: the parked state changes every round and is worthless once the stage
ends, while the durable input (the shuffle files) is in the workdir, so a lost worker costs a
rerun of the stage from those files, never lost data.

Messages never pass through the driver: a worker sends each message to the worker hosting its
destination (``deliver``, which runs on its own thread while the receiver computes), waits for
the receipts before its step returns, and the driver's barrier between steps makes every message of
step t available at step t+1. The driver holds O(partitions) numbers per step.

The same class runs in-process (:class:`LocalHosts`, small pools and tests) and as Ray actors
(:class:`RayHosts`); the arithmetic is the same either way.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import coreset, d2
from ..core.d2_exact import PartitionState
from ..core.partition import PartitionRows
from ..formats.selection import PREFILTER_BETA, PREFILTER_KEPT, hex_uid_pairs
from ..formats.shuffle import ColumnFile, write_columns
from ..runtime import peak_rss_bytes
from .decisions import write_decision_records
from .outputs import read_ranks
from .shuffle import ShuffleJob, edge_sources, read_basic_codes, read_group, read_nodes


@dataclass(frozen=True)
class HostSettings:
    """The select settings a worker needs (picklable)."""

    seed: int
    gamma_forward: float
    gamma_reverse: float
    memory_limit: int | None  # bytes of resident partitions; None = no limit
    spill_dir: str


def _nbytes(obj, seen=None) -> int:
    """Bytes of the numpy arrays an object holds (through nested plain objects)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None else 0
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return _nbytes(vars(obj), seen)
    return 0


# rows per row group of a partition's nodes file
NODES_FILE_ROWS = 1_000_000


class Part:
    """One partition as a worker holds it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.owned: np.ndarray | None = None  # every owned node, pre-filtered ones included
        self.raw: np.ndarray | None = None  # their raw scores
        self.basic: np.ndarray | None = None  # int8 basic-filter code of each (-1 passes); None: no basic filter
        self.halo_pass: np.ndarray | None = None  # halo nodes passing the basic filter
        self.rows: PartitionRows | None = None  # until the state is built
        self.halo_raw: np.ndarray | None = None
        self.keep: np.ndarray | None = None  # owned nodes surviving the pre-filter
        self.keep_halo: np.ndarray | None = None
        self.shifted: np.ndarray | None = None  # shifted scores of the kept owned nodes
        self.state: PartitionState | None = None
        self.runs: dict[Any, tuple[np.ndarray, np.ndarray]] = {}  # sorted keys per search kind
        self.pick_nodes: np.ndarray | None = None  # this partition's run of picks (ranking order)
        self.forward: np.ndarray | None = None  # float64 forward score of the kept owned nodes (state freed)
        self.final: np.ndarray | None = None  # float64 final score of the kept owned nodes
        self.blame_node: np.ndarray | None = None
        self.blame_amount: np.ndarray | None = None


class PartitionHost:
    def __init__(self, host_id: int, job: ShuffleJob, settings: HostSettings):
        self.host_id = host_id
        self.job = job
        self.settings = settings
        self.pids = job.plan.partitions_of(host_id)
        self.parts: dict[int, Part] = {}
        self.parked: dict[int, str] = {}
        self.inbox: dict[tuple, list] = defaultdict(list)
        self.lock = threading.Lock()
        self.peers: list | None = None
        self.remote = False
        self._acks: list = []
        self._exchange = 0.0
        self.spilled_bytes = 0
        self.spill_dir = os.path.join(settings.spill_dir, f"host-{host_id}")

    # ---- messaging ----------------------------------------------------------------------------

    def set_peers(self, peers: list, remote: bool) -> None:
        self.peers, self.remote = peers, remote

    def deliver(self, kind: str, rnd: int, dst: int, src: int, payload) -> None:
        with self.lock:
            self.inbox[(kind, rnd, dst)].append((src, payload))

    def _send(self, kind: str, rnd: int, dst: int, src: int, payload) -> None:
        t0 = time.perf_counter()
        host = self.job.plan.host_of[dst]
        if host == self.host_id:
            self.deliver(kind, rnd, dst, src, payload)
        elif not self.remote:
            self.peers[host].deliver(kind, rnd, dst, src, payload)
        else:
            self._acks.append(self.peers[host].deliver.remote(kind, rnd, dst, src, payload))
        self._exchange += time.perf_counter() - t0

    def _flush(self) -> None:
        t0 = time.perf_counter()
        if self._acks:
            import ray

            ray.get(self._acks)
            self._acks = []
        self._exchange += time.perf_counter() - t0

    def _take(self, kind: str, rnd: int, dst: int) -> list:
        with self.lock:
            got = self.inbox.pop((kind, rnd, dst), [])
        return sorted(got, key=lambda m: m[0])

    # ---- partitions in memory or parked --------------------------------------------------------

    def _get(self, pid: int) -> Part:
        if pid in self.parts:
            return self.parts[pid]
        if pid in self.parked:
            with open(self.parked.pop(pid), "rb") as fh:
                part = pickle.load(fh)
        else:
            part = Part(pid)
        self.parts[pid] = part
        return part

    def _put(self, pid: int) -> None:
        """After using partition pid: park it when the resident partitions exceed the budget (the
        ones used earlier in a step stay resident, so each step loads only the overflow)."""
        limit = self.settings.memory_limit
        if limit is None or len(self.parts) <= 1:
            return
        if sum(_nbytes(p) for p in self.parts.values()) <= limit:
            return
        os.makedirs(self.spill_dir, exist_ok=True)
        path = os.path.join(self.spill_dir, f"part-{pid:05d}.pkl")
        with open(path, "wb") as fh:
            pickle.dump(self.parts.pop(pid), fh, protocol=5)
        self.spilled_bytes += os.path.getsize(path)
        self.parked[pid] = path

    def _each(self):
        for pid in self.pids:
            part = self._get(pid)
            yield pid, part
            self._put(pid)

    def _call(self, fn) -> dict:
        """Run ``fn(pid, part)`` for every hosted partition; the results with the worker's times
        and peak memory."""
        t0 = time.perf_counter()
        self._exchange = 0.0
        out = {pid: fn(pid, part) for pid, part in self._each()}
        self._flush()
        total = time.perf_counter() - t0
        return {"parts": out, "seconds": total, "exchange_seconds": self._exchange, "rss": peak_rss_bytes(),
                "spilled_bytes": self.spilled_bytes, "resident_bytes": sum(_nbytes(p) for p in self.parts.values())}

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------------

    def _node_scores(self, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(owned nodes, raw scores, basic-filter codes or None)."""
        job = self.job
        if job.plan.direct:
            scores = [read_group(job, g, edges=False, uids=False)["score"] for g in range(job.plan.n_groups)]
            codes = read_basic_codes(job, 0, len(job.plan.parts)) if job.basic else None
            return (np.arange(job.plan.n_nodes, dtype=np.int64), np.concatenate(scores) if scores else np.zeros(0),
                    codes)
        got = read_nodes(job, pid, ["node", "score"] + (["basic"] if job.basic else []))
        return got["node"].astype(np.int64), got["score"], got.get("basic")

    @staticmethod
    def _passes(part: Part) -> np.ndarray:
        """Owned nodes that pass the basic filter (all without one): the pool selected from."""
        return np.ones(part.owned.size, bool) if part.basic is None else part.basic < 0

    def _uids(self, part: Part, positions: np.ndarray):
        """uids of owned nodes at ``positions`` (in ``part.owned``, any order), read back from the
        shuffle's node records (or the embedding parts when there is one partition)."""
        import pyarrow as pa

        job = self.job
        positions = np.asarray(positions, np.int64)
        if not job.plan.direct:
            return read_nodes(job, part.pid, ["uid"])["uid"].take(positions)
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        pieces = []
        for g in range(job.plan.n_groups):
            lo, hi = job.plan.group_range(g)
            sel = ordered[np.searchsorted(ordered, lo):np.searchsorted(ordered, hi)]
            if sel.size:
                pieces.append(read_group(job, g, edges=False, uids=True)["uid"].take(sel - lo))
        if not pieces:
            return pa.array([], pa.string())
        return pa.concat_arrays(pieces).take(np.argsort(order, kind="stable"))

    def load(self, edges: bool) -> dict:
        """Owned nodes and raw scores, and (``edges``) the partition's rows from the shuffle."""
        job = self.job

        def fn(pid, part):
            part.owned, part.raw, part.basic = self._node_scores(pid)
            if part.owned.size > 1 and np.any(np.diff(part.owned) <= 0):
                raise RuntimeError(f"partition {pid}: node records are not in node order")
            if edges:
                part.rows = PartitionRows(pid, job.plan.n_partitions, job.plan.n_nodes, part.owned).build(
                    edge_sources(job, pid))
                part.halo_raw = np.full(len(part.rows.halo_ids), np.nan)
            finite = part.raw.size > 0
            return {"nodes": int(part.owned.size), "passed": int(self._passes(part).sum()),
                    "entries": int(part.rows.n_entries) if edges else 0,
                    "score_min": float(part.raw.min()) if finite else None,
                    "score_max": float(part.raw.max()) if finite else None}

        return self._call(fn)

    def send_scores(self) -> dict:
        """Raw scores of each boundary list to the partition that holds those nodes as halo, and
        whether they pass the basic filter (a halo node that does not leaves the graph there too)."""
        def fn(pid, part):
            sent = 0
            passes = self._passes(part)
            for b, rows in part.rows.boundary.items():
                payload = (part.owned[rows], part.raw[rows], passes[rows])
                self._send("scores", 0, b, pid, payload)
                sent += sum(a.nbytes for a in payload)
            return sent

        return self._call(fn)

    def _take_scores(self, pid: int, part: Part) -> None:
        blocks = part.rows.halo_blocks()
        part.halo_pass = np.ones(part.halo_raw.size, bool)
        for src, (gids, values, passes) in self._take("scores", 0, pid):
            block = blocks.get(src)
            if block is None or not np.array_equal(part.rows.halo_ids[block], gids):
                raise RuntimeError(f"partition {pid}: partition {src}'s boundary does not match its halo there "
                                   "(the shuffled graph is not symmetric)")
            part.halo_raw[block] = values
            part.halo_pass[block] = passes
        if np.isnan(part.halo_raw).any():
            raise RuntimeError(f"partition {pid}: no score received for some halo nodes")

    # ---- searches over sorted runs (pre-filter threshold, baselines' cuts, a budget's last pick)

    def _run(self, part: Part, kind) -> tuple[np.ndarray, np.ndarray]:
        if kind not in part.runs:
            part.runs[kind] = self._make_run(part, kind)
        return part.runs[kind]

    def _make_run(self, part: Part, kind) -> tuple[np.ndarray, np.ndarray]:
        if kind == "prefilter":  # the basic filter's passes by raw score: d2.prefilter_mask's ranking
            passes = self._passes(part)
            major, minor = coreset.float_order_bits(part.raw[passes]), part.owned[passes]
        elif kind == "topk":  # survivors by shifted score: selectors.score_topk's ranking
            major, minor = coreset.float_order_bits(part.shifted), part.owned[part.keep]
        elif kind == "random" or (isinstance(kind, tuple) and kind[0] == "ccs"):
            ids = part.owned[part.keep]
            if kind != "random":
                ids = ids[part.strata == kind[1]]
            major, minor = -coreset.random_keys(self.settings.seed, ids), ids
        elif kind == "picks":  # exact picks above the rounds' threshold, best first already
            return part.picks_major, part.pick_nodes
        else:
            raise ValueError(f"unknown search kind {kind!r}")
        order = coreset.ranking_order(major, minor)
        return np.ascontiguousarray(major[order]), np.ascontiguousarray(minor[order])

    def search_samples(self, kind, after, upto, points: int) -> dict:
        return self._call(lambda pid, part: coreset.run_samples(*self._run(part, kind), after, upto, points))

    def search_counts(self, kind, queries) -> dict:
        return self._call(lambda pid, part: coreset.count_at_or_before(*self._run(part, kind), queries))

    def drop_runs(self, kind) -> dict:
        return self._call(lambda pid, part: part.runs.pop(kind, None) is not None)

    # ---- pre-filter, shift, state ----------------------------------------------------------------

    @staticmethod
    def _kept(raw, ids, key) -> np.ndarray:
        if key is None:
            return np.ones(len(ids), bool)
        bits = coreset.float_order_bits(raw)
        return (bits > key[0]) | ((bits == key[0]) & (ids <= key[1]))

    def prefilter(self, last_kept) -> dict:
        """Keep the nodes that pass the basic filter and are at or before ``last_kept`` in the β
        pre-filter's ranking (None: all that pass); report what the shift needs."""
        def fn(pid, part):
            part.keep = self._passes(part) & self._kept(part.raw, part.owned, last_kept)
            if part.rows is not None:
                self._take_scores(pid, part)
                part.keep_halo = part.halo_pass & self._kept(part.halo_raw, part.rows.halo_ids, last_kept)
                part.halo_pass = None
            kept = part.raw[part.keep]
            if not kept.size:
                return {"kept": 0, "min": None}
            i = int(np.argmin(kept))
            return {"kept": int(kept.size), "min": float(kept[i]), "min_node": int(part.owned[part.keep][i])}

        return self._call(fn)

    def shift(self, offset: float) -> dict:
        """Shifted scores of the survivors (exactly d2.shift_nonnegative's ``s + offset``); the
        most negative one if any (a given offset too small)."""
        def fn(pid, part):
            s = part.raw[part.keep] + offset
            part.shifted = s
            if s.size and s.min() < 0:
                i = int(np.argmin(s))
                node = int(part.owned[part.keep][i])
                uid = self._uids(part, np.searchsorted(part.owned, [node]))[0].as_py()
                return {"negative": {"node": node, "uid": uid, "value": float(s[i])}}
            return {"negative": None}

        return self._call(fn)

    def build(self, offset: float) -> dict:
        """The D2 state of each partition on the survivors' rows (halo scores shifted the same way)."""
        def fn(pid, part):
            rows = part.rows
            owned_scores = np.zeros(part.owned.size)
            owned_scores[part.keep] = part.shifted
            halo_scores = part.halo_raw + offset
            all_kept = bool(part.keep.all()) and bool(part.keep_halo.all())
            arrays = rows.state_arrays(owned_scores, halo_scores, None if all_kept else part.keep,
                                       None if all_kept else part.keep_halo)
            part.state = PartitionState(**arrays)
            part.rows = part.halo_raw = part.keep_halo = None  # the state has what it needs
            st = part.state
            return {"nodes": st.n_own, "halo": st.n_halo, "entries": int(st.indptr[-1]),
                    "cross_entries": int(np.count_nonzero(st.neighbors >= st.n_own))}

        return self._call(fn)

    # ---- forward and reverse rounds ------------------------------------------------------------

    def forward_round(self, rnd: int) -> dict:
        gamma = self.settings.gamma_forward

        def fn(pid, part):
            st = part.state
            for src, values in self._take("fwd", rnd - 1, pid):
                st.receive_forward(src, values)
            sent = 0
            for dst, values in st.forward_round(gamma).items():
                self._send("fwd", rnd, dst, pid, values)
                sent += values.nbytes
            return sent

        return self._call(fn)

    def forward_done(self, rounds: int) -> dict:
        def fn(pid, part):
            for src, values in self._take("fwd", rounds, pid):
                part.state.receive_forward(src, values)
            return part.state.max_forward()

        return self._call(fn)

    def start_reverse(self, shift: int) -> dict:
        return self._call(lambda pid, part: part.state.start_reverse(shift))

    def reverse_round(self, rnd: int, settle: bool, threshold, limit: int, remaining: int, dead_level) -> dict:
        """Settle against the last round's threshold (``settle``), then one step
        (:meth:`PartitionState.step`): the round's reports."""
        gamma = self.settings.gamma_reverse

        def fn(pid, part):
            st = part.state
            report = st.settle(threshold, limit) if settle else None
            t0 = time.perf_counter()
            out = st.step(self._take("rev", rnd - 1, pid), remaining, gamma, dead_level)
            step_seconds = time.perf_counter() - t0
            sent = 0
            for dst, msg in out.items():
                self._send("rev", rnd, dst, pid, msg)
                sent += msg.nbytes
            return {"settle": report, "best": st.best_unpicked(), "picks": int(st.last_picks),
                    "messages": len(out), "bytes": sent, "step_seconds": step_seconds}

        return self._call(fn)

    def reverse_summary(self) -> dict:
        return self._call(lambda pid, part: {"picks": part.state.n_picks, "parks": part.state.n_parks,
                                             "rechecks": part.state.n_rechecks,
                                             "late": part.state.late_suppressions})

    # ---- picks -----------------------------------------------------------------------------------

    def exact_picks(self, threshold, limit: int, shift: int) -> dict:
        """This partition's picks above the rounds' threshold (at most ``limit``: no more can be
        among the first ``limit``), as a sorted run for the merge and the searches."""
        def fn(pid, part):
            st = part.state
            gids, qs = st.picks_above(threshold)
            gids, qs = gids[:limit], qs[:limit]
            part.pick_nodes, part.picks_major = gids, qs
            local = np.searchsorted(st.owned, gids)
            part.pick_forward = st.forward_scores[local]
            part.pick_final = d2.dequantize_scores(qs, shift)
            part.pick_minor = gids
            return int(gids.size)

        return self._call(fn)

    def cut_picks(self, kind, last) -> dict:
        """The survivors at or before ``last`` in the ranking of search ``kind`` (a baseline's cut:
        score top-k, random, a CCS stratum), added to this partition's run of picks."""
        def fn(pid, part):
            major, minor = self._run(part, kind)
            n = 0 if last is None else int(coreset.count_at_or_before(major, minor, ([last[0]], [last[1]]))[0])
            prev = part.pick_nodes if part.pick_nodes is not None else np.zeros(0, np.int64)
            part.pick_nodes = np.concatenate([prev, minor[:n]])
            part.runs.pop(kind, None)
            return n

        return self._call(fn)

    def baseline_picks(self, method: str) -> dict:
        """Finish a baseline's run: keys of the merge order, the shifted score as forward and final."""
        def fn(pid, part):
            gids = part.pick_nodes if part.pick_nodes is not None else np.zeros(0, np.int64)
            s = part.shifted[np.searchsorted(part.owned[part.keep], gids)]
            if method == "score_topk":
                major = coreset.float_order_bits(s)
            elif method == "random":
                major = -coreset.random_keys(self.settings.seed, gids)
            else:  # no order of its own: node order
                major = np.zeros(len(gids), np.int64)
            order = coreset.ranking_order(major, gids)
            part.pick_nodes, part.picks_major, part.pick_minor = gids[order], major[order], gids[order]
            part.pick_forward = part.pick_final = s[order]
            return int(gids.size)

        return self._call(fn)

    def ccs_range(self) -> dict:
        return self._call(lambda pid, part: (float(part.shifted.min()), float(part.shifted.max()))
                          if part.shifted.size else None)

    def ccs_strata(self, lo: float, hi: float, strata: int) -> dict:
        def fn(pid, part):
            part.strata = coreset.ccs_strata(part.shifted, lo, hi, strata)
            return np.bincount(part.strata, minlength=strata)

        return self._call(fn)

    def survivors_file(self, template: str) -> dict:
        """The survivors (node, shifted score, partition) for a baseline that runs in one task."""
        def fn(pid, part):
            ids = part.owned[part.keep]
            write_columns(self.job.store, template.format(pid), {"node": ids, "score": part.shifted,
                                                        "owner": np.full(ids.size, pid, np.int32)})
            return int(ids.size)

        return self._call(fn)

    def adopt_picks(self, url: str) -> dict:
        """Picks made elsewhere (a baseline run in one task): this partition's rows of that run."""
        def fn(pid, part):
            with ColumnFile(self.job.store, url) as f:
                got = f.read_rows(0, f.rows, ["node", "major", "owner"])
            mine = got["owner"] == pid
            gids, major = got["node"][mine], got["major"][mine]
            s = part.shifted[np.searchsorted(part.owned[part.keep], gids)]
            part.pick_nodes, part.picks_major, part.pick_minor = gids, major, gids
            part.pick_forward = part.pick_final = s
            return int(gids.size)

        return self._call(fn)

    def approximate_picks(self, budgets: dict) -> dict:
        """The approximate mode: each partition's own greedy on its internal edges with its share
        of the budget; run keys (pick score, partition, position)."""
        gamma = self.settings.gamma_reverse

        def fn(pid, part):
            st = part.state
            sub = coreset.internal_subgraph(st.indptr, st.neighbors, st.distances, st.n_own)
            sel = d2.reverse_select(sub, st.forward_scores, int(budgets.get(pid, 0)), gamma)
            gids = st.owned[sel.order]
            part.approx_final = sel.final_scores
            part.approx_nodes = gids
            part.approx_major = coreset.float_order_bits(sel.final_scores[sel.order])
            part.approx_minor = (np.int64(pid) << np.int64(40)) | np.arange(gids.size, dtype=np.int64)
            part.approx_forward = st.forward_scores[sel.order]
            return int(gids.size)

        return self._call(fn)

    def use_approximate(self) -> dict:
        """Make the approximate picks the run the outputs are written from."""
        def fn(pid, part):
            part.pick_nodes, part.picks_major, part.pick_minor = part.approx_nodes, part.approx_major, part.approx_minor
            part.pick_forward = part.approx_forward
            part.pick_final = part.approx_final[np.searchsorted(part.state.owned, part.approx_nodes)]
            part.final = part.approx_final
            _release_state(part)
            return int(part.pick_nodes.size)

        return self._call(fn)

    def overlap(self, last) -> dict:
        """How many of the approximate picks are among the exact picks at or before ``last``."""
        def fn(pid, part):
            n = int(coreset.count_at_or_before(part.picks_major, part.pick_nodes, ([last[0]], [last[1]]))[0])
            return int(np.intersect1d(part.pick_nodes[:n], part.approx_nodes).size)

        return self._call(fn)

    def write_run(self, template: str) -> dict:
        """This partition's sorted run of picks, for the merge (:mod:`.outputs`)."""
        def fn(pid, part):
            gids = part.pick_nodes if part.pick_nodes is not None else np.zeros(0, np.int64)
            uids = self._uids(part, np.searchsorted(part.owned, gids))
            write_columns(self.job.store, template.format(pid), {
                "major": np.asarray(part.picks_major, np.int64), "minor": np.asarray(part.pick_minor, np.int64),
                "node": gids, "owner": np.full(gids.size, pid, np.int32),
                "forward": np.asarray(part.pick_forward, np.float64), "final": np.asarray(part.pick_final, np.float64),
                "uid": uids})
            return int(gids.size)

        return self._call(fn)

    # ---- final scores ----------------------------------------------------------------------------

    def finish_send(self, last) -> dict:
        gamma = self.settings.gamma_reverse

        def fn(pid, part):
            sent = 0
            for dst, msg in part.state.finish_send(last, gamma).items():
                self._send("final", 0, dst, pid, msg)
                sent += msg.nbytes
            return sent

        return self._call(fn)

    def finish_receive(self, shift: int) -> dict:
        def fn(pid, part):
            st = part.state
            part.final = d2.dequantize_scores(st.finish_receive(self._take("final", 0, pid)), shift)
            node, amount = st.blame
            part.blame_node, part.blame_amount = node.copy(), d2.dequantize_scores(amount, shift)
            _release_state(part)
            return int(np.count_nonzero(node >= 0))

        return self._call(fn)

    def no_reverse(self) -> dict:
        """Budget 0 (or nothing left after the pre-filter): the final scores are the forward
        scores, nobody is blamed; an empty run of picks unless rounds ranked nodes for a larger
        keep rate."""
        def fn(pid, part):
            part.final = part.state.forward_scores
            part.blame_node = part.blame_amount = None
            _release_state(part)
            if part.pick_nodes is None:
                part.pick_nodes = part.picks_major = part.pick_minor = np.zeros(0, np.int64)
                part.pick_forward = part.pick_final = np.zeros(0)
            return 0

        return self._call(fn)

    # ---- outputs ---------------------------------------------------------------------------------

    def write_outputs(self, ranks: str, nodes: str, subsets: list[str], budgets: list[int], d2_scores: bool,
                      decisions: bool = False) -> dict:
        """Per partition: ``selection/nodes/part-P.parquet`` (every owned node: rank, scores, blame),
        one sorted run of subset uids per budget and (``decisions``) the records the decisions
        tasks join (:mod:`.decisions`); returns the non-hex uids met."""
        def fn(pid, part):
            got = read_ranks(self.job.store, ranks.format(pid))
            ranked = part.pick_nodes[: got.size] if got.size else np.zeros(0, np.int64)
            n = part.owned.size
            rank = np.full(n, -1, np.int64)
            rank[np.searchsorted(part.owned, ranked)] = got
            columns = {"forward": np.full(n, np.nan), "final": np.full(n, np.nan),
                       "blame_node": np.full(n, -1, np.int64), "blame_amount": np.zeros(n)}
            if d2_scores:
                columns["forward"][part.keep] = part.forward
                columns["final"][part.keep] = part.final
                if part.blame_node is not None:
                    columns["blame_node"][part.keep] = part.blame_node
                    columns["blame_amount"][part.keep] = part.blame_amount
            elif part.shifted is not None:
                columns["forward"][part.keep] = part.shifted
                columns["final"][part.keep] = part.shifted
            part.final = part.forward = part.blame_node = part.blame_amount = None
            uids = self._uids(part, np.arange(n))
            codes = np.full(n, PREFILTER_KEPT, np.int8) if part.basic is None else part.basic.copy()
            codes[~part.keep & (codes == PREFILTER_KEPT)] = PREFILTER_BETA  # passed the basic filter, not β
            write_nodes_file(self.job.store, nodes.format(pid), part.owned, uids, part.raw, codes, rank, columns)
            if decisions:
                write_decision_records(self.job, pid, part.owned, codes, rank, part.raw, columns["blame_node"],
                                       columns["blame_amount"])
            bad: list[str] = []
            n_bad = 0
            for b, template in zip(budgets, subsets):
                sel = np.flatnonzero((rank >= 0) & (rank < b))
                hi, lo, ok = hex_uid_pairs(uids.take(sel))
                if not ok.all():
                    n_bad = max(n_bad, int((~ok).sum()))
                    bad = [str(u) for u in uids.take(sel[~ok][:5]).to_pylist()]
                order = np.lexsort((lo, hi))
                write_columns(self.job.store, template.format(pid), {"hi": hi[order], "lo": lo[order]})
            return {"bad_uids": n_bad, "bad_examples": bad, "ranked": int(got.size)}

        return self._call(fn)


def _release_state(part: Part) -> None:
    """The rounds are over: keep the forward scores, free the D2 state (most of a partition)."""
    part.forward = part.state.forward_scores
    part.state = None


def write_nodes_file(store, url: str, owned, uids, raw, prefilter_codes, rank, columns: dict) -> None:
    """``nodes/part-P.parquet``, NODES_FILE_ROWS rows per row group (a table of at most that
    many rows at a time)."""
    import pyarrow.parquet as pq

    from ..formats.selection import nodes_table

    def fill(path: str) -> None:
        writer = None
        for lo in range(0, max(len(owned), 1), NODES_FILE_ROWS):
            hi = min(len(owned), lo + NODES_FILE_ROWS)
            table = nodes_table(owned[lo:hi], uids.slice(lo, hi - lo), raw[lo:hi], prefilter_codes[lo:hi], rank[lo:hi],
                                columns["forward"][lo:hi], columns["final"][lo:hi], columns["blame_node"][lo:hi],
                                columns["blame_amount"][lo:hi])
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table)
        writer.close()

    store.write_file(url, fill)


# --------------------------------------------------------------------------------------------
# The driver's handle on the workers
# --------------------------------------------------------------------------------------------


class Hosts:
    """Call a method on every worker: the per-partition results merged, and what the workers
    report about themselves (time in exchange, peak memory)."""

    def __init__(self):
        self.peak_rss = 0
        self.spilled_bytes = 0
        self.seconds: dict[str, float] = defaultdict(float)
        self.exchange_seconds: dict[str, float] = defaultdict(float)

    def _merge(self, method: str, replies: list[dict]) -> dict:
        parts: dict = {}
        for r in replies:
            parts.update(r["parts"])
            self.peak_rss = max(self.peak_rss, r["rss"])
            self.spilled_bytes = max(self.spilled_bytes, r["spilled_bytes"])
        self.seconds[method] += max((r["seconds"] for r in replies), default=0.0)
        self.exchange_seconds[method] += max((r["exchange_seconds"] for r in replies), default=0.0)
        self.last = replies
        return dict(sorted(parts.items()))

    def call(self, method: str, *args) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LocalHosts(Hosts):
    """The workers as objects of this process (one per partition group, same protocol)."""

    def __init__(self, job: ShuffleJob, settings: HostSettings):
        super().__init__()
        self.hosts = [PartitionHost(h, job, settings) for h in range(job.plan.n_hosts)]
        for h in self.hosts:
            h.set_peers(self.hosts, remote=False)

    def call(self, method: str, *args) -> dict:
        return self._merge(method, [getattr(h, method)(*args) for h in self.hosts])

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

    def call(self, method: str, *args) -> dict:
        import ray

        return self._merge(method, ray.get([getattr(h, method).remote(*args) for h in self.hosts]))

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
