"""What a partition worker holds of one partition, phase by phase, and the arithmetic that takes
a partition from one phase to the next (:mod:`.hosts` runs it and carries the messages).

A partition moves through the select stage's steps in this order, each step a function from one
phase to the next, so a field exists exactly in the phases that declare it::

    Loaded ──prefilter──▶ Kept ──shift──▶ Shifted ──build (D2)──▶ Built ──exact_picks──▶ Picked
                                             │                      │                      │
                                             └─cut / adopt (baselines)──▶ Picked     no_reverse / final scores
                                                                                           ▼
                                                                                       Finished

* :class:`Pool`: the owned nodes as loaded (ids, raw scores, basic-filter codes); the same object
  from load to outputs (the nodes file lists every owned node).
* :class:`Halo` (D2 only): the partition's graph rows and its halo's raw scores, until the D2
  state is built from them.
* :class:`Picks`: a run of picks in ranking order (what the merge into ``selected.parquet`` reads).
* :class:`Finished`: the final scores and blame of the kept nodes, what the outputs write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from ..core import coreset, d2
from ..core.d2_exact import PartitionState
from ..core.partition import PartitionRows, positions_of

# the search kind of the β pre-filter's threshold (a cut selector's kinds are methods.Cut)
PREFILTER = "prefilter"


@dataclass
class Pool:
    """A partition's owned nodes as loaded, pre-filtered ones included."""

    pid: int
    owned: np.ndarray  # int64 node ids, ascending
    raw: np.ndarray  # their raw scores
    basic: np.ndarray | None  # int8 basic-filter code of each (-1 passes); None: no basic filter
    # the owned nodes' uids (pyarrow strings), read once when the outputs start: the run of picks
    # and the outputs both need them, and reading them is most of either step's time at 10^7
    uids: Any = None

    def passes(self) -> np.ndarray:
        """Owned nodes that pass the basic filter (all without one): the pool selected from."""
        return np.ones(self.owned.size, bool) if self.basic is None else self.basic < 0


@dataclass
class Halo:
    """D2: the partition's rows of the graph and what it learns about the nodes it sees owned
    elsewhere (the halo): their raw scores and whether they pass the basic filter."""

    rows: PartitionRows
    raw: np.ndarray  # NaN until the owners' boundary scores arrive
    passes: np.ndarray | None = None


@dataclass
class Loaded:
    pool: Pool
    halo: Halo | None
    runs: dict[Any, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # sorted search runs by kind


@dataclass
class Kept:
    """After the pre-filter: the survivors (basic filter, then β)."""

    pool: Pool
    keep: np.ndarray  # bool per owned node
    halo: Halo | None
    keep_halo: np.ndarray | None  # D2: bool per halo node


@dataclass
class Shifted:
    """The survivors' shifted scores (``raw + offset``, all >= 0); a cut selector's picks so far."""

    pool: Pool
    keep: np.ndarray
    shifted: np.ndarray  # per kept owned node
    halo: Halo | None
    keep_halo: np.ndarray | None
    groups: np.ndarray | None = None  # a cut selector's group of each survivor (CCS: its stratum)
    cut: list[np.ndarray] = field(default_factory=list)
    runs: dict[Any, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def kept_ids(self) -> np.ndarray:
        return self.pool.owned[self.keep]


@dataclass
class Built:
    """D2: the partition's state of the distributed greedy (rows, scores, candidate heap)."""

    pool: Pool
    keep: np.ndarray
    shifted: np.ndarray
    state: PartitionState


@dataclass
class Picks:
    """A partition's run of picks in ranking order (major desc, minor asc) with their scores."""

    nodes: np.ndarray
    major: np.ndarray
    minor: np.ndarray
    forward: np.ndarray
    final: np.ndarray

    @staticmethod
    def empty() -> "Picks":
        none = np.zeros(0, np.int64)
        return Picks(none, none, none, np.zeros(0), np.zeros(0))


@dataclass
class Picked:
    pool: Pool
    keep: np.ndarray
    shifted: np.ndarray
    picks: Picks
    state: PartitionState | None  # D2: until the final scores are settled


@dataclass
class Finished:
    """What the outputs write: per kept owned node its forward and final score and blame."""

    pool: Pool
    keep: np.ndarray
    picks: Picks
    forward: np.ndarray
    final: np.ndarray
    blame_node: np.ndarray | None = None  # None: nobody blamed
    blame_amount: np.ndarray | None = None


Phase = Union[Loaded, Kept, Shifted, Built, Picked, Finished]


# -- reports to the driver (O(1) numbers per partition) ---------------------------------------

@dataclass(frozen=True)
class LoadReport:
    nodes: int
    passed: int
    entries: int
    score_min: float | None
    score_max: float | None


@dataclass(frozen=True)
class KeptReport:
    kept: int
    min: float | None  # the lowest raw score kept
    min_node: int | None


@dataclass(frozen=True)
class Negative:
    """A shifted score below 0 (a given ``select.score_offset`` too small)."""

    node: int
    uid: str
    value: float


@dataclass(frozen=True)
class BuildReport:
    nodes: int
    halo: int
    entries: int
    cross_entries: int


@dataclass(frozen=True)
class RoundReport:
    settle: Any  # PartitionState.settle's report for the last round's threshold (None in round 1)
    best: tuple[int, int] | None
    picks: int
    messages: int
    bytes: int
    step_seconds: float


@dataclass(frozen=True)
class ReverseSummary:
    picks: int
    parks: int
    rechecks: int
    late: int


# -- transitions ------------------------------------------------------------------------------

def _at_or_before(raw, ids, key) -> np.ndarray:
    """Nodes at or before ``key`` in the pre-filter's ranking (score desc, id asc); None: all."""
    if key is None:
        return np.ones(len(ids), bool)
    bits = coreset.float_order_bits(raw)
    return (bits > key[0]) | ((bits == key[0]) & (ids <= key[1]))


def take_halo_scores(halo: Halo, pid: int, messages: list) -> None:
    """The owners' boundary scores (sent at load) into the halo."""
    blocks = halo.rows.halo_blocks()
    halo.passes = np.ones(halo.raw.size, bool)
    for src, (gids, values, passes) in messages:
        block = blocks.get(src)
        if block is None or not np.array_equal(halo.rows.halo_ids[block], gids):
            raise RuntimeError(f"partition {pid}: partition {src}'s boundary does not match its halo there "
                               "(the shuffled graph is not symmetric)")
        halo.raw[block] = values
        halo.passes[block] = passes
    if np.isnan(halo.raw).any():
        raise RuntimeError(f"partition {pid}: no score received for some halo nodes")


def prefilter(loaded: Loaded, last_kept) -> tuple[Kept, KeptReport]:
    """Keep the nodes that pass the basic filter and are at or before ``last_kept`` in the β
    pre-filter's ranking (None: all that pass), halo included (its scores taken already)."""
    pool, halo = loaded.pool, loaded.halo
    keep = pool.passes() & _at_or_before(pool.raw, pool.owned, last_kept)
    keep_halo = None
    if halo is not None:
        keep_halo = halo.passes & _at_or_before(halo.raw, halo.rows.halo_ids, last_kept)
        halo.passes = None
    kept = pool.raw[keep]
    if not kept.size:
        report = KeptReport(0, None, None)
    else:
        i = int(np.argmin(kept))
        report = KeptReport(int(kept.size), float(kept[i]), int(pool.owned[keep][i]))
    return Kept(pool, keep, halo, keep_halo), report


def shift(kept: Kept, offset: float) -> tuple[Shifted, int | None]:
    """Shifted scores of the survivors (exactly d2.shift_nonnegative's ``s + offset``); the
    position (in the pool) of the most negative one, if any."""
    s = kept.pool.raw[kept.keep] + offset
    worst = None
    if s.size and s.min() < 0:
        worst = int(np.flatnonzero(kept.keep)[int(np.argmin(s))])
    return Shifted(kept.pool, kept.keep, s, kept.halo, kept.keep_halo), worst


def build(shifted: Shifted, offset: float) -> tuple[Built, BuildReport]:
    """The D2 state on the survivors' rows (halo scores shifted the same way)."""
    pool, rows = shifted.pool, shifted.halo.rows
    owned_scores = np.zeros(pool.owned.size)
    owned_scores[shifted.keep] = shifted.shifted
    halo_scores = shifted.halo.raw + offset
    all_kept = bool(shifted.keep.all()) and bool(shifted.keep_halo.all())
    arrays = rows.state_arrays(owned_scores, halo_scores, None if all_kept else shifted.keep,
                               None if all_kept else shifted.keep_halo)
    st = PartitionState(**arrays)
    report = BuildReport(st.n_own, st.n_halo, int(st.indptr[-1]), int(np.count_nonzero(st.neighbors >= st.n_own)))
    return Built(pool, shifted.keep, shifted.shifted, st), report


def exact_picks(built: Built, threshold, limit: int, shift_bits: int) -> Picked:
    """The picks above the rounds' threshold (at most ``limit``: no more can be among the first
    ``limit``), a sorted run for the merge."""
    st = built.state
    gids, qs = st.picks_above(threshold)
    gids, qs = gids[:limit], qs[:limit]
    picks = Picks(gids, qs, gids, st.forward_scores[positions_of(st.owned, gids)],
                  d2.dequantize_scores(qs, shift_bits))
    return Picked(built.pool, built.keep, built.shifted, picks, st)


def settled(picked: Picked, final_q: np.ndarray, shift_bits: int) -> Finished:
    """D2's final scores (fixed point) and blame, settled: the state is freed."""
    st = picked.state
    node, amount = st.blame
    return Finished(picked.pool, picked.keep, picked.picks, st.forward_scores, d2.dequantize_scores(final_q, shift_bits),
                    node.copy(), d2.dequantize_scores(amount, shift_bits))


def no_reverse(phase: Built | Picked) -> Finished:
    """D2 with budget 0 (or nothing left after the pre-filter): the final scores are the forward
    scores, nobody is blamed; an empty run unless rounds ranked nodes for a larger keep rate."""
    picks = phase.picks if isinstance(phase, Picked) else Picks.empty()
    forward = phase.state.forward_scores
    return Finished(phase.pool, phase.keep, picks, forward, forward)


def cut(shifted: Shifted, kind, run: tuple[np.ndarray, np.ndarray], last) -> int:
    """The survivors at or before ``last`` in the sorted run of search ``kind`` join the cut."""
    major, minor = run
    n = 0 if last is None else int(coreset.count_at_or_before(major, minor, ([last[0]], [last[1]]))[0])
    shifted.cut.append(minor[:n])
    shifted.runs.pop(kind, None)
    return n


def ranked_cut(shifted: Shifted, order_keys) -> Picked:
    """A cut selector's picks in its ranking (``order_keys(ids, scores)``: major keys), the
    shifted score as forward and final."""
    gids = np.concatenate(shifted.cut) if shifted.cut else np.zeros(0, np.int64)
    s = shifted.shifted[positions_of(shifted.kept_ids, gids)]
    major = np.asarray(order_keys(gids, s), np.int64)
    order = coreset.ranking_order(major, gids)
    picks = Picks(gids[order], major[order], gids[order], s[order], s[order])
    return Picked(shifted.pool, shifted.keep, shifted.shifted, picks, None)


def adopted(shifted: Shifted, nodes: np.ndarray, major: np.ndarray) -> Picked:
    """Picks made elsewhere (a one-task selector), in their order, the shifted score as scores."""
    s = shifted.shifted[positions_of(shifted.kept_ids, nodes)]
    return Picked(shifted.pool, shifted.keep, shifted.shifted, Picks(nodes, major, nodes, s, s), None)


def finished(phase: Picked | Finished) -> Finished:
    """A phase the outputs can write: a baseline's picks carry the shifted scores as theirs."""
    if isinstance(phase, Finished):
        return phase
    if phase.state is not None:
        raise RuntimeError(f"partition {phase.pool.pid}: D2 picks without final scores")
    return Finished(phase.pool, phase.keep, phase.picks, phase.shifted, phase.shifted)


__all__ = ["BuildReport", "Built", "Finished", "Halo", "KeptReport", "LoadReport", "Loaded", "Negative", "PREFILTER",
           "Phase", "Picked", "Picks", "Pool", "ReverseSummary", "RoundReport", "Shifted", "Kept", "adopted", "build",
           "cut", "exact_picks", "finished", "no_reverse", "prefilter", "ranked_cut", "settled", "shift",
           "take_halo_scores"]
