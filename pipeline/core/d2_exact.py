"""Exact D2 selection across partitions (docs/d2.md#10-the-exact-partitioned-greedy): the sequential greedy's result, bit for bit.

Pure numpy + numba; no Ray, no I/O. :func:`pipeline.d2.d2_select` is the definition; this module
computes the same :class:`~pipeline.d2.Selection` (same order, same final and forward scores, bit
for bit) from partitions that each hold only their own nodes' rows and a halo, exchanging small
messages in rounds. A Ray actor per partition can hold one :class:`PartitionState` and make one
call per round; :func:`partitioned_d2_select` is the same protocol run in-process.

Why it is exact
---------------
Scores are the reverse pass's int64 fixed point (``d2.fixed_point_shift``; S comes from the global
maximum forward score, one number per partition). A picked node suppresses its neighbours by
``suppression(w, max(q, 0)) >= 0``, so scores only ever fall, and the sequential greedy picks in
strictly decreasing *priority* (q desc, then global id asc: unique).

1. *Certified picks.* An unpicked node u whose priority beats every unpicked neighbour's current
   priority is picked by the sequential greedy with exactly its current score, before any of those
   neighbours: only a neighbour's pick changes u, and no neighbour can be picked while u beats it
   (they only fall). Picking it now instead of later changes nothing else: the nodes the greedy
   picks before u are not its neighbours, and integer suppression commutes. Two certifiable nodes
   are never adjacent, and picking one never makes another uncertifiable (it only lowers nodes that
   were already below both), so a partition may certify in any order, here: best first.
2. *Stale bounds.* A partition knows the exact current score of its own nodes except for
   suppression from remote picks not yet delivered. For a halo node it keeps an upper bound: the
   owner's last reported score minus what this partition has sent it since (the owner computed
   that report before applying those). A halo node counts as an unpicked neighbour with priority =
   its bound until known picked. Certifying against upper bounds is certifying against the truth.
3. *Same-round picks in different partitions are never adjacent.* Suppose x (partition a) and y
   (partition b) are adjacent and both certified in one round. Take x the earliest such pick in
   a's round, and y the earliest of x's such partners in b's round. When x was certified, a's bound
   of y had not been lowered by a's own picks this round (they would be earlier partners of y), so
   it was >= y's score at y's pick; likewise b's bound of x at y's certification. Then prio(x) >
   bound(y) >= prio(y) > bound(x) >= prio(x): impossible. So a partition's picks never need a
   remote pick of the same round, its own scores are exact when it certifies, and lowering its
   bound of a halo node by the suppression it just sent is valid (the sequential run applies that
   suppression too: the halo node is not picked this round).
4. *Termination.* Each round a partition reports its best unpicked (non-dead, see 5) priority; T is
   the max. Every future pick has priority <= T, so once ``settled`` = #picks with priority > T is
   >= B, the top B picks by priority are the sequential greedy's first B, in order.
5. *Dead nodes.* A node with >= B picks above it can never be among the first B, nor can a node
   it blocks (that one is below it); such nodes are *dead*: never certified, never reported, and 4
   still holds. Each partition keeps a dead level (nodes strictly below it are dead), raised two
   ways, both from ``remaining = B - settled`` of the last round (the ``settled`` picks lie above
   T, every later pick below it): (a) within a round a partition's picks come best first (a pick
   only frees lower nodes; checked when merging them), so once it has made ``remaining`` picks in
   the round, its last pick is a dead level; (b) each partition reports a fixed-size sketch of its
   unsettled picks ("the k-th best is (q, id)"), from which the driver derives the highest level
   with ``remaining`` unsettled picks provably at or above it (:func:`dead_level_from_sketches`)
   and broadcasts it. Without them P = 1 would order all N nodes for any B, and P > 1 would pick
   far below the B-th.
6. *Final scores.* Picks beyond the B-th suppressed their neighbours; the sequential run with budget
   B did not. So at the end each partition recomputes its unselected nodes' scores as
   ``suppress(q0, sum of suppression from the first B picks)`` (the floor and saturating sums keep
   this equal to the sequential, one-at-a-time result), sending halo sums to their owners once.

How a partition certifies (cost proportional to the work)
---------------------------------------------------------
The unpicked owned nodes are either *candidates*, in an indexed max-heap by priority (keys updated
in place; they only sift down), or *parked* on one unpicked neighbour above them (owned or halo),
in that neighbour's watch list. The heap top is examined: a scan of its row finds a neighbour above
it (then it parks there) or none (then it is certified: picked, its suppression applied to owned
neighbours at once and summed for halo ones). When a node is picked or falls (own pick, received
suppression, lower bound), the nodes parked on it that it no longer blocks are examined again at
once (park elsewhere, or back into the heap). Every certifiable node is in the heap, so the top is
the best of them. Work: O(degree) per examination plus heap moves, i.e. like the sequential heap
kernel plus a row scan per pick and per re-examination; nothing is rescanned per round except one
pass over the owned records for the report.

Protocol (BSP: every message produced in round t is delivered at the start of round t+1)
-----------------------------------------------------------------------------------------
::

    states = [PartitionState(...) for each partition]
    for r in range(forward_rounds):                # forward pass, docs/d2.md §4
        out = [s.forward_round(gamma_f) for s]     # {dst: float64[...]} boundary values
        deliver: s.receive_forward(src, values)
    S = d2.fixed_point_shift(max(s.max_forward() for s))
    s.start_reverse(S) for s
    remaining, level = B, None
    loop:                                          # reverse rounds
        out = [s.step(inbox, remaining, gamma_r, level) for s]   # {dst: RoundMessage}
        T = max(s.best_unpicked() for s)           # (q, id); None = nothing left
        reports = [s.settle(T, remaining) for s]   # (#picks above T, sketch of the rest)
        settled = sum of the counts
        if settled >= B: break
        remaining = B - settled
        level = dead_level_from_sketches(sketches, remaining) or the previous level
    top B = k-way merge of s.picks_above(T) (each best first); thr = priority of the B-th
    out = [s.finish_send(thr, gamma_r) for s]      # {dst: FinalMessage}
    final q of owned nodes = s.finish_receive(inbox); final_scores = q / 2**S

The driver holds O(partitions) numbers per round (a best priority, a count and a 64-point sketch
each), never the picks until the final merge. A Ray driver can fold ``best_unpicked`` and
``settle`` into the next ``step`` call, one round late: an older ``remaining`` or dead level is
still valid, only looser.

Messages
--------
Partitions a and b agree, without talking, on the *pair list* ``L(a->b)``: the a-owned nodes that
have a neighbour owned by b (= b's halo nodes owned by a), in ascending global id. Every message
refers to nodes by their position (*slot*, int32, or int64 past 2**31) in a pair list. (A
partition stores its halo owner-major, so a slot of ``L(a->b)`` is, at b, simply the offset in
the block of halo records owned by a; at a it is looked up once per entry.)

* forward (a -> b): float64[len(L(a->b))], the current forward values of all of ``L(a->b)``;
* :class:`RoundMessage` (a -> b), only the non-empty ones:
  ``dec_slots`` / ``dec_values`` (int64): suppression a's picks sent to b-owned nodes since the
  last message, summed per node (saturating at 2**53, which keeps the result exact, see d2),
  slots in ``L(b->a)``; ``state_slots`` / ``state_values`` (int64): the current q of the a-owned
  nodes of ``L(a->b)`` that changed since the last message, or ``PICKED`` (int64 min) for those
  picked since. A pick's flag always travels with its suppression (same message).
* final (a -> b): :class:`FinalMessage`: (slots in ``L(b->a)``, int64 sums) of the first B picks'
  suppression, and per node the largest single suppression by one of a's first B picks and its id
  (each node's *blame*: the selected neighbour that lowered it most).

Public API
----------
:class:`PartitionState` (one partition: ``forward_round``/``receive_forward``, ``start_reverse``,
``step``, ``best_unpicked``, ``settle``, ``picks_above``, ``finish_send``/``finish_receive``),
:class:`RoundMessage`, :data:`PICKED`, :func:`partitioned_d2_select` (the in-process driver),
:func:`dead_level_from_sketches`, :func:`graph_partition_arrays` (split a CSRGraph by labels),
:func:`certified_rounds` (rounds of the unpartitioned scheme, the benchmark's yardstick).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from .d2 import (
    CSRGraph,
    Selection,
    check_budget,
    check_gamma,
    check_graph,
    check_scores,
    dequantize_scores,
    edge_weight,
    fixed_point_shift,
    quantize_scores,
    suppress,
    suppression,
)

__all__ = [
    "PICKED",
    "FinalMessage",
    "PartitionState",
    "ReverseRounds",
    "RoundMessage",
    "certified_rounds",
    "dead_level_from_sketches",
    "graph_partition_arrays",
    "partitioned_d2_select",
]

# state value meaning "this node has been picked"
PICKED = np.iinfo(np.int64).min
# Sums of suppression saturate here: with q <= 2**44 and the floor at -(2**52 - 1),
# suppress(q, min(sum, 2**53)) == suppress(q, sum) for any sum, and nothing overflows.
DECREMENT_CAP = 2**53
_INT32_LIMIT = np.iinfo(np.int32).max
_NO_LEVEL_Q = np.iinfo(np.int64).min  # dead level "none": below every real priority
_NO_LEVEL_G = np.iinfo(np.int64).max

# meta[] slots of a partition's scalar state (one int64 array, so kernels can update it)
_M_HEAP = 0  # ready-heap size
_M_PICKS = 1  # picks so far
_M_OWN_DIRTY = 2  # owned boundary nodes changed since the last outbox
_M_HALO_DIRTY = 3  # halo nodes suppressed this round (their sums are kept one round: see step)
_M_DEAD_Q = 4  # dead level (q, gid): owned nodes strictly below it are dead
_M_DEAD_G = 5
_M_LATE = 6  # suppression that arrived for an already-picked node (must stay 0; a check)
_M_PARKS = 7  # candidates examined and parked (blocked), a work counter
_M_RECHECKS = 8  # parked nodes examined again when their blocker fell, a work counter
_M_PENDING = 9  # released nodes waiting for _examine_pending
_M_SIZE = 10


class FinalMessage(NamedTuple):
    """The final-score pass's message from partition a to the owner b of halo nodes a's first B
    picks suppressed (see the module docstring)."""

    slots: np.ndarray  # slots in L(b->a)
    sums: np.ndarray  # int64 summed suppression
    blame_amounts: np.ndarray  # int64 largest single suppression of each node by one of a's picks
    blame_nodes: np.ndarray  # int64 global id of that pick

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self))


class RoundMessage(NamedTuple):
    """One round's message from partition a to partition b (see the module docstring)."""

    dec_slots: np.ndarray  # slots in L(b->a)
    dec_values: np.ndarray  # int64 summed suppression
    state_slots: np.ndarray  # slots in L(a->b)
    state_values: np.ndarray  # int64 current q, or PICKED

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _higher(qa, ga, qb, gb):
    """Priority order: higher q first, then lower global id."""
    return qa > qb or (qa == qb and ga < gb)


# Per-node record of a partition, one row of ``node`` (int64[n_own + n_halo, 4]) so that touching
# a neighbour costs one cache line:
#   _Q     current q (owned: exact; halo: upper bound); PICKED once picked (an owned node's score
#          at its pick is kept in qpick)
#   _POS   owned: slot in the candidate heap, _PICKED_POS once picked, _PARKED_POS while parked,
#          _PENDING_POS while released and waiting to be examined again
#   _WATCH head of the list (linked through watch_next) of owned nodes parked on this node, or -1
#   _AUX   owned: 0 = no remote neighbour, 1 = boundary node, 2 = boundary node changed since the
#          last outbox (listed in own_dirty); halo: suppression sent to it this round (summed)
_Q = 0
_POS = 1
_WATCH = 2
_AUX = 3
_PICKED_POS = -1
_PARKED_POS = -2
_PENDING_POS = -3


@numba.njit(cache=True, nogil=True, inline="always")
def _above(node, gid, y, qu, gu):
    """Is local node y above priority (qu, gu)? Reads y's global id only on a tie. A picked node
    (q = PICKED) is above nothing."""
    qy = node[y, _Q]
    if qy != qu:
        return qy > qu
    return gid[y] < gu


# The candidates: an indexed binary max-heap over the unpicked owned nodes that are not parked,
# keyed by (current q, local id); local ids of owned nodes are in global id order, so the local
# id breaks ties exactly like the global one. Keys are exact (updated in place): q only falls, so
# an update only sifts down; a node entering (at start, or released from parking) sifts up.


@numba.njit(cache=True, nogil=True, inline="always")
def _sift_down(hkey, hnode, node, p, size):
    key = hkey[p]
    u = hnode[p]
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        if c + 1 < size and _higher(hkey[c + 1], hnode[c + 1], hkey[c], hnode[c]):
            c += 1
        if _higher(hkey[c], hnode[c], key, u):
            hkey[p] = hkey[c]
            hnode[p] = hnode[c]
            node[hnode[p], _POS] = p
            p = c
        else:
            break
    hkey[p] = key
    hnode[p] = u
    node[u, _POS] = p


@numba.njit(cache=True, nogil=True, inline="always")
def _heap_insert(u, hkey, hnode, node, meta):
    p = meta[_M_HEAP]
    meta[_M_HEAP] = p + 1
    key = node[u, _Q]
    while p > 0:
        parent = (p - 1) >> 1
        if _higher(key, u, hkey[parent], hnode[parent]):
            hkey[p] = hkey[parent]
            hnode[p] = hnode[parent]
            node[hnode[p], _POS] = p
            p = parent
        else:
            break
    hkey[p] = key
    hnode[p] = u
    node[u, _POS] = p


@numba.njit(cache=True, nogil=True, inline="always")
def _find_blocker(u, qu, gu, indptr, nbr, node, gid):
    """A neighbour of owned u above priority (qu, gu) (the first in its row), or -1."""
    for e in range(indptr[u], indptr[u + 1]):
        y = nbr[e]
        if _above(node, gid, y, qu, gu):
            return y
    return -1


@numba.njit(cache=True, nogil=True)
def _release_watchers(b, node, gid, watch_next, pending, meta):
    """Blocker ``b`` (owned or halo local id) was picked or fell: the nodes parked on it that it
    no longer blocks become pending (examined once, by :func:`_examine_pending`, when the current
    pick or inbox is fully applied: a node released several times meanwhile is scanned once).
    Callers test ``node[b, _WATCH] != -1`` first (the common case: nobody parked on b)."""
    w = node[b, _WATCH]
    node[b, _WATCH] = -1
    qb = node[b, _Q]
    gb = gid[b]
    while w != -1:
        nxt = watch_next[w]
        if _higher(qb, gb, node[w, _Q], gid[w]):  # false once b is picked (q = PICKED)
            watch_next[w] = node[b, _WATCH]
            node[b, _WATCH] = w
        else:
            node[w, _POS] = _PENDING_POS
            pending[meta[_M_PENDING]] = w
            meta[_M_PENDING] += 1
        w = nxt


@numba.njit(cache=True, nogil=True)
def _examine_pending(indptr, nbr, node, gid, watch_next, hkey, hnode, pending, meta):
    """Each pending node parks on a neighbour above it or, if none is, goes back into the heap."""
    for i in range(meta[_M_PENDING]):
        w = pending[i]
        meta[_M_RECHECKS] += 1
        blocker = _find_blocker(w, node[w, _Q], gid[w], indptr, nbr, node, gid)
        if blocker >= 0:
            node[w, _POS] = _PARKED_POS
            watch_next[w] = node[blocker, _WATCH]
            node[blocker, _WATCH] = w
        else:
            _heap_insert(w, hkey, hnode, node, meta)
    meta[_M_PENDING] = 0


@numba.njit(cache=True, nogil=True, inline="always")
def _owned_fell(u, new, node, gid, watch_next, hkey, hnode, own_dirty, pending, meta):
    """Owned unpicked u's q fell to ``new``: update its record, heap slot, watchers, dirtiness."""
    node[u, _Q] = new
    p = node[u, _POS]
    if p >= 0:
        hkey[p] = new
        _sift_down(hkey, hnode, node, p, meta[_M_HEAP])
    if node[u, _WATCH] != -1:
        _release_watchers(u, node, gid, watch_next, pending, meta)
    if node[u, _AUX] == 1:
        node[u, _AUX] = 2
        own_dirty[meta[_M_OWN_DIRTY]] = u
        meta[_M_OWN_DIRTY] += 1


@numba.njit(cache=True, nogil=True)
def _init_records(n_own, q, nd_ptr):
    node = np.empty((q.shape[0], 4), np.int64)
    for x in range(q.shape[0]):
        node[x, _Q] = q[x]
        node[x, _POS] = 0
        node[x, _WATCH] = -1
        node[x, _AUX] = 1 if x < n_own and nd_ptr[x + 1] > nd_ptr[x] else 0
    return node


@numba.njit(cache=True, nogil=True)
def _init_heap(n_own, node, hkey, hnode, meta):
    for u in range(n_own):
        hkey[u] = node[u, _Q]
        hnode[u] = u
        node[u, _POS] = u
    meta[_M_HEAP] = n_own
    for p in range((n_own >> 1) - 1, -1, -1):
        _sift_down(hkey, hnode, node, p, n_own)


@numba.njit(cache=True, nogil=True)
def _apply_inbox(
    dec_seg, dec_slot, dec_val, st_seg, st_slot, st_val,
    n_own, indptr, nbr, bnd_off, bnd_lid, halo_off,
    node, gid, watch_next, hkey, hnode, meta, own_dirty, halo_dirty, pending,
):  # fmt: skip
    """Apply one round's received messages, then forget what this partition sent last round.
    ``*_seg`` is int64[k, 3]: (source partition, first entry, end) of each message's entries."""
    for s in range(dec_seg.shape[0]):
        base = bnd_off[dec_seg[s, 0]]
        for i in range(dec_seg[s, 1], dec_seg[s, 2]):
            u = bnd_lid[base + dec_slot[i]]
            qu = node[u, _Q]
            if qu == PICKED:
                meta[_M_LATE] += 1  # impossible by claim 3 of the module docstring: a check
                continue
            new = suppress(qu, dec_val[i])
            if new != qu:
                _owned_fell(u, new, node, gid, watch_next, hkey, hnode, own_dirty, pending, meta)
    for s in range(st_seg.shape[0]):
        base = n_own + halo_off[st_seg[s, 0]]  # the halo is owner-major: slot = offset in block
        for i in range(st_seg[s, 1], st_seg[s, 2]):
            hl = base + st_slot[i]
            qh = node[hl, _Q]
            if qh == PICKED:
                continue
            v = st_val[i]
            if v == PICKED:
                new = v
            else:
                # The owner computed v before applying what this partition sent it last round
                # (_AUX, still held): v minus that is an upper bound of the node's true score,
                # and so is the old bound; keep the smaller.
                new = suppress(v, node[hl, _AUX])
            if new < qh:
                node[hl, _Q] = new
                if node[hl, _WATCH] != -1:
                    _release_watchers(hl, node, gid, watch_next, pending, meta)
    _examine_pending(indptr, nbr, node, gid, watch_next, hkey, hnode, pending, meta)
    for i in range(meta[_M_HALO_DIRTY]):
        node[halo_dirty[i], _AUX] = 0
    meta[_M_HALO_DIRTY] = 0


@numba.njit(cache=True, nogil=True)
def _certify(
    cap, gamma, n_own, indptr, nbr, dist,
    node, gid, qpick, watch_next, hkey, hnode, meta, pick_lid, own_dirty, halo_dirty, pending,
):  # fmt: skip
    """Certify to a fixpoint, best first, at most ``cap`` picks (then set the dead level).

    The heap top u is the best candidate. If an unpicked neighbour is above it (a parked owned
    node or a halo bound: the heap's owned nodes are all below), u is parked on that neighbour
    (it can only become certifiable once that neighbour is picked or falls below it, which
    releases it back into the heap); otherwise u is certified and picked. Every certifiable node
    is in the heap, so picks come best first. Returns the number of picks.
    """
    n_round = 0
    while meta[_M_HEAP] > 0 and n_round < cap:
        u = hnode[0]
        qu = hkey[0]
        gu = gid[u]
        if _higher(meta[_M_DEAD_Q], meta[_M_DEAD_G], qu, gu):
            break  # every candidate left is dead
        blocker = _find_blocker(u, qu, gu, indptr, nbr, node, gid)
        # remove u from the heap top
        size = meta[_M_HEAP] - 1
        meta[_M_HEAP] = size
        if size > 0:
            hkey[0] = hkey[size]
            hnode[0] = hnode[size]
            _sift_down(hkey, hnode, node, 0, size)
        if blocker >= 0:
            meta[_M_PARKS] += 1
            node[u, _POS] = _PARKED_POS
            watch_next[u] = node[blocker, _WATCH]
            node[blocker, _WATCH] = u
            continue
        # Pick u: it beats every unpicked neighbour (owned: exact; halo: upper bound).
        node[u, _POS] = _PICKED_POS
        node[u, _Q] = PICKED
        qpick[u] = qu
        pick_lid[meta[_M_PICKS]] = u
        meta[_M_PICKS] += 1
        if node[u, _AUX] == 1:
            node[u, _AUX] = 2
            own_dirty[meta[_M_OWN_DIRTY]] = u
            meta[_M_OWN_DIRTY] += 1
        if node[u, _WATCH] != -1:
            _release_watchers(u, node, gid, watch_next, pending, meta)
        if qu > 0:
            for e in range(indptr[u], indptr[u + 1]):
                y = nbr[e]
                qy = node[y, _Q]
                if qy == PICKED:
                    continue  # picked (u itself, for a self edge): frozen
                amount = suppression(edge_weight(gamma, dist[e]), qu)
                if amount == 0:
                    continue
                new = suppress(qy, amount)
                if y < n_own:
                    if new != qy:
                        _owned_fell(y, new, node, gid, watch_next, hkey, hnode, own_dirty, pending, meta)
                    continue
                sent = node[y, _AUX]
                if sent == 0:
                    halo_dirty[meta[_M_HALO_DIRTY]] = y
                    meta[_M_HALO_DIRTY] += 1
                total = sent + amount
                node[y, _AUX] = total if total < DECREMENT_CAP else DECREMENT_CAP
                # Lower our bound by what we just sent: the sequential run applies this
                # suppression too (y is not picked this round, claim 3), so the bound stays
                # >= y's true score.
                if new != qy:
                    node[y, _Q] = new
                    if node[y, _WATCH] != -1:
                        _release_watchers(y, node, gid, watch_next, pending, meta)
        if meta[_M_PENDING]:
            _examine_pending(indptr, nbr, node, gid, watch_next, hkey, hnode, pending, meta)
        n_round += 1
        if n_round >= cap:
            meta[_M_DEAD_Q] = qu
            meta[_M_DEAD_G] = gu
    return n_round


@numba.njit(cache=True, nogil=True)
def _collect_outbox(
    n_parts, n_own, node, meta, halo_owner, halo_off, halo_dirty,
    nd_ptr, nd_dest, nd_slot, bnd_off, own_dirty, slot_template,
):  # fmt: skip
    """This round's messages in one pass, each destination's entries in its own range of flat
    arrays (a destination receives at most one entry per node of its pair list).
    Returns (dec counts, dec slots, dec values, state counts, state slots, state values):
    destination d's decrements are ``dec_*[halo_off[d] : halo_off[d] + dec_counts[d]]``, its
    states ``st_*[bnd_off[d] : bnd_off[d] + st_counts[d]]``."""
    # Entries go out in ascending local id, i.e. ascending slot per destination: the receiver
    # then walks its records in order instead of at random (the dirty lists are in pick order).
    n_dec = meta[_M_HALO_DIRTY]
    halo_dirty[:n_dec].sort()
    dec_cnt = np.zeros(n_parts, np.int64)
    dec_slot = np.empty(halo_off[n_parts], slot_template.dtype)
    dec_val = np.empty(halo_off[n_parts], np.int64)
    for i in range(n_dec):
        hl = halo_dirty[i]
        o = halo_owner[hl - n_own]
        k = halo_off[o] + dec_cnt[o]
        dec_slot[k] = hl - n_own - halo_off[o]
        dec_val[k] = node[hl, _AUX]
        dec_cnt[o] += 1
    st_cnt = np.zeros(n_parts, np.int64)
    st_slot = np.empty(bnd_off[n_parts], slot_template.dtype)
    st_val = np.empty(bnd_off[n_parts], np.int64)
    n_dirty = meta[_M_OWN_DIRTY]
    if 8 * n_dirty > n_own:  # dense: rebuild the list in order by scanning the records
        n_dirty = 0
        for u in range(n_own):
            if node[u, _AUX] == 2:
                own_dirty[n_dirty] = u
                n_dirty += 1
    else:
        own_dirty[:n_dirty].sort()
    for i in range(n_dirty):
        u = own_dirty[i]
        v = node[u, _Q]  # PICKED once picked
        for k in range(nd_ptr[u], nd_ptr[u + 1]):
            d = nd_dest[k]
            j = bnd_off[d] + st_cnt[d]
            st_slot[j] = nd_slot[k]
            st_val[j] = v
            st_cnt[d] += 1
        node[u, _AUX] = 1
    meta[_M_OWN_DIRTY] = 0
    return dec_cnt, dec_slot, dec_val, st_cnt, st_slot, st_val


@numba.njit(cache=True, nogil=True)
def _best_unpicked(n_own, node, gid, meta):
    """(found, q, gid) of the best unpicked owned node that is not dead."""
    found = False
    bq = _NO_LEVEL_Q
    bg = _NO_LEVEL_G
    dq = meta[_M_DEAD_Q]
    dg = meta[_M_DEAD_G]
    for u in range(n_own):
        qu = node[u, _Q]
        if qu == PICKED:
            continue
        gu = gid[u]
        if _higher(dq, dg, qu, gu):
            continue
        if not found or _higher(qu, gu, bq, bg):
            found = True
            bq = qu
            bg = gu
    return found, bq, bg


@numba.njit(cache=True, nogil=True)
def _merge_run(sq, sg, n_sorted, run, qpick, gid):
    """Merge one round's picks ``run`` (local ids, best first) into the best-first sorted picks
    (sq, sg: q and global id, capacity n_own). Returns (new count, whether the run really was
    best first: claim 5 of the module docstring, checked here)."""
    m = run.shape[0]
    ok = True
    for j in range(1, m):
        if not _higher(qpick[run[j - 1]], gid[run[j - 1]], qpick[run[j]], gid[run[j]]):
            ok = False
    i = n_sorted - 1
    j = m - 1
    w = n_sorted + m - 1
    while j >= 0:  # backwards, the lowest first
        uq = qpick[run[j]]
        ug = gid[run[j]]
        if i >= 0 and not _higher(sq[i], sg[i], uq, ug):
            sq[w] = sq[i]
            sg[w] = sg[i]
            i -= 1
        else:
            sq[w] = uq
            sg[w] = ug
            j -= 1
        w -= 1
    return n_sorted + m, ok


@numba.njit(cache=True, nogil=True)
def _count_above(sq, sg, n, tq, tg):
    """Number of the best-first sorted picks strictly above priority (tq, tg)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if _higher(sq[mid], sg[mid], tq, tg):
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _forward_partition(indptr, nbr, dist, raw, prev, gamma):
    """One forward round for the owned nodes: same operations, same order as d2's kernel."""
    n_own = raw.shape[0]
    out = np.empty(n_own, np.float64)
    for i in range(n_own):
        total = raw[i]
        for e in range(indptr[i], indptr[i + 1]):
            total += edge_weight(gamma, dist[e]) * prev[nbr[e]]
        out[i] = total
    return out


@numba.njit(cache=True, nogil=True)
def _finish_sums(tq, tg, gamma, n_own, n_halo, indptr, nbr, dist, qpick, gid, pick_lid, n_picks):
    """Suppression sums (saturating) from the picks at or above priority (tq, tg) to every
    neighbour, and each neighbour's *blame*: the largest single suppression it received from one
    of those picks and that pick's global id (ties: the lower id; 0 and -1 when none)."""
    n_loc = n_own + n_halo
    acc = np.zeros(n_loc, np.int64)
    blame_amount = np.zeros(n_loc, np.int64)
    blame_gid = np.full(n_loc, -1, np.int64)
    for i in range(n_picks):
        u = pick_lid[i]
        qu = qpick[u]
        gu = gid[u]
        if qu <= 0 or _higher(tq, tg, qu, gu):
            continue
        for e in range(indptr[u], indptr[u + 1]):
            y = nbr[e]
            if y == u:
                continue
            amount = suppression(edge_weight(gamma, dist[e]), qu)
            if amount == 0:
                continue
            t = acc[y] + amount
            acc[y] = t if t < DECREMENT_CAP else DECREMENT_CAP
            if amount > blame_amount[y] or (amount == blame_amount[y] and gu < blame_gid[y]):
                blame_amount[y] = amount
                blame_gid[y] = gu
    return acc, blame_amount, blame_gid


@numba.njit(cache=True, nogil=True)
def _finish_scores(acc, blame_amount, blame_gid, lids, vals, amounts, gids, tq, tg, n_own, node, qpick, q0, gid):
    for i in range(lids.shape[0]):
        u = lids[i]
        t = acc[u] + vals[i]
        acc[u] = t if t < DECREMENT_CAP else DECREMENT_CAP
        a = amounts[i]
        if a > blame_amount[u] or (a == blame_amount[u] and a > 0 and gids[i] < blame_gid[u]):
            blame_amount[u] = a
            blame_gid[u] = gids[i]
    final = np.empty(n_own, np.int64)
    for u in range(n_own):
        if node[u, _Q] == PICKED and not _higher(tq, tg, qpick[u], gid[u]):
            final[u] = qpick[u]  # among the first B: its score when picked, blamed on nobody
            blame_amount[u] = 0
            blame_gid[u] = -1
        else:
            final[u] = suppress(q0[u], acc[u])
    return final


@numba.njit(cache=True, nogil=True)
def _setup_kernel(n_parts, n_own, n_halo, indptr, nbr, halo_owner):
    """Derived structure of a partition: the pair lists both ways, owned node -> destinations."""
    # the halo is owner-major: owner o's nodes are halo[halo_off[o]:halo_off[o + 1]], and
    # position in that block = slot in the pair list L(o -> me)
    halo_off = np.zeros(n_parts + 1, np.int64)
    for h in range(n_halo):
        halo_off[halo_owner[h] + 1] += 1
    for p in range(n_parts):
        halo_off[p + 1] += halo_off[p]
    # owned node -> distinct destination partitions (owners of its halo neighbours), and the
    # pair lists L(me->d): owned nodes in ascending local (= global) id per destination. Also
    # the entries pointing at each halo node (each must have one: the halo is exactly the
    # remote neighbours).
    halo_deg = np.zeros(n_halo, np.int64)
    stamp = np.full(n_parts, -1, np.int64)
    nd_ptr = np.zeros(n_own + 1, np.int64)
    bnd_off = np.zeros(n_parts + 1, np.int64)
    for u in range(n_own):
        c = 0
        for e in range(indptr[u], indptr[u + 1]):
            y = nbr[e]
            if y >= n_own:
                halo_deg[y - n_own] += 1
                o = halo_owner[y - n_own]
                if stamp[o] != u:
                    stamp[o] = u
                    c += 1
                    bnd_off[o + 1] += 1
        nd_ptr[u + 1] = nd_ptr[u] + c
    for p in range(n_parts):
        bnd_off[p + 1] += bnd_off[p]
    nd_dest = np.empty(nd_ptr[n_own], np.int32)
    nd_slot = np.empty(nd_ptr[n_own], np.int64)
    bnd_lid = np.empty(bnd_off[n_parts], np.int64)
    fill = bnd_off[:n_parts].copy()
    stamp[:] = -1
    for u in range(n_own):
        if nd_ptr[u + 1] == nd_ptr[u]:
            continue
        k = nd_ptr[u]
        for e in range(indptr[u], indptr[u + 1]):
            y = nbr[e]
            if y >= n_own:
                o = halo_owner[y - n_own]
                if stamp[o] != u:
                    stamp[o] = u
                    nd_dest[k] = o
                    nd_slot[k] = fill[o] - bnd_off[o]
                    bnd_lid[fill[o]] = u
                    fill[o] += 1
                    k += 1
    return halo_deg, halo_off, nd_ptr, nd_dest, nd_slot, bnd_off, bnd_lid


# --------------------------------------------------------------------------------------------
# One partition
# --------------------------------------------------------------------------------------------


def _slot_dtype(n: int):
    return np.int32 if n < _INT32_LIMIT else np.int64


class PartitionState:
    """One partition of the exact partitioned greedy: its rows, its halo, its round step.

    Local ids: owned nodes are ``0..n_own-1`` (``owned[i]`` is the global id of local i), halo
    nodes ``n_own..n_own+n_halo-1`` (``halo[h]`` is the global id of local ``n_own + h``).

    Args (numpy arrays only, trusted beyond cheap checks; built by :func:`graph_partition_arrays`):
        part_id, n_partitions: this partition's number and the number of partitions.
        owned: int64[n_own] global ids of the owned nodes, strictly increasing.
        indptr: int64[n_own + 1] CSR row pointers of the owned nodes' FULL rows (every
            neighbour, in the graph's stored order: ascending global id for graphs from
            ``symmetrize_knn``; the forward pass sums in this order).
        neighbors: int local ids of each row entry (owned or halo).
        distances: float32/float64 distance of each row entry.
        owned_scores: float64[n_own] raw (non-negative) scores of the owned nodes.
        halo: int64[n_halo] global ids of the halo (every non-owned node that appears in a row,
            and only those), owner-major: by owning partition, then by increasing id. (Each
            owner's block is then one contiguous range of records, which the messages from that
            owner walk in order.)
        halo_owner: int[n_halo] partition owning each halo node (never ``part_id``).
        halo_scores: float64[n_halo] raw scores of the halo nodes.

    The graph must be symmetric: j in i's row exactly when i in j's (certifying u compares it with
    the neighbours in its row, which must be the nodes whose picks change u).
    :func:`partitioned_d2_select` checks that (as many (j, i) entries as (i, j) ones), unless
    the graph is :attr:`~pipeline.d2.CSRGraph.known_symmetric`.
    """

    def __init__(
        self,
        part_id,
        n_partitions,
        owned,
        indptr,
        neighbors,
        distances,
        owned_scores,
        halo,
        halo_owner,
        halo_scores,
    ):
        self.part_id = int(part_id)
        self.n_partitions = int(n_partitions)
        self.owned = np.ascontiguousarray(owned, dtype=np.int64)
        self.halo = np.ascontiguousarray(halo, dtype=np.int64)
        n_own = self.n_own = int(self.owned.shape[0])
        n_halo = self.n_halo = int(self.halo.shape[0])
        n_loc = n_own + n_halo
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        nbr = np.asarray(neighbors)
        self.neighbors = np.ascontiguousarray(nbr, dtype=_slot_dtype(n_loc))
        dist = np.asarray(distances)
        self.distances = np.ascontiguousarray(dist, dtype=np.float32 if dist.dtype == np.float32 else np.float64)
        self.halo_owner = np.ascontiguousarray(halo_owner, dtype=np.int32)
        raw = np.ascontiguousarray(owned_scores, dtype=np.float64)
        halo_raw = np.ascontiguousarray(halo_scores, dtype=np.float64)
        P = self.n_partitions
        if not (0 <= self.part_id < P):
            raise ValueError(f"part_id {self.part_id} outside 0..{P - 1}")
        if self.indptr.shape != (n_own + 1,) or self.indptr[0] != 0 or self.indptr[-1] != self.neighbors.shape[0]:
            raise ValueError("indptr must have n_own + 1 entries, start at 0 and end at len(neighbors)")
        if self.distances.shape != self.neighbors.shape or raw.shape != (n_own,) or halo_raw.shape != (n_halo,):
            raise ValueError("distances/neighbors/scores shapes do not match owned/halo")
        if self.halo_owner.shape != (n_halo,):
            raise ValueError("halo_owner must have one entry per halo node")
        if n_own > 1 and np.any(np.diff(self.owned) <= 0):
            raise ValueError("owned ids must be strictly increasing")
        if n_halo > 1:
            d_owner = np.diff(self.halo_owner)
            if np.any((d_owner < 0) | ((d_owner == 0) & (np.diff(self.halo) <= 0))):
                raise ValueError("halo ids must be sorted by owner, then strictly increasing")
        if self.neighbors.size and (self.neighbors.min() < 0 or self.neighbors.max() >= n_loc):
            raise ValueError("neighbors must be local ids in 0..n_own+n_halo-1")
        if n_halo and (self.halo_owner.min() < 0 or self.halo_owner.max() >= P or np.any(self.halo_owner == self.part_id)):
            raise ValueError("halo_owner must name other partitions")
        (
            halo_deg,
            self._halo_off,
            self._nd_ptr,
            self._nd_dest,
            self._nd_slot,
            self._bnd_off,
            self._bnd_lid,
        ) = _setup_kernel(P, n_own, n_halo, self.indptr, self.neighbors, self.halo_owner)
        if n_halo and np.any(halo_deg == 0):
            raise ValueError("every halo node must be a neighbour of an owned node")
        self.gid = np.concatenate([self.owned, self.halo])
        self._raw = raw
        self._prev = np.concatenate([raw, halo_raw])  # forward values of the last round, all locals
        self.shift: int | None = None
        self.forward_rounds_done = 0

    # ---- forward pass ------------------------------------------------------------------------

    def forward_round(self, gamma: float) -> dict[int, np.ndarray]:
        """One forward round for the owned nodes from the last round's values (owned and halo).
        Returns the new values of each pair list ``L(me->d)`` for its destination d."""
        out = _forward_partition(self.indptr, self.neighbors, self.distances, self._raw, self._prev, float(gamma))
        self._prev[: self.n_own] = out
        self.forward_rounds_done += 1
        return self._boundary_values(self._prev)

    def receive_forward(self, src: int, values: np.ndarray) -> None:
        """Halo forward values from partition ``src`` (its :meth:`forward_round` output for us)."""
        lo, hi = self._halo_off[src], self._halo_off[src + 1]
        if values.shape[0] != hi - lo:
            raise ValueError(f"partition {self.part_id}: {values.shape[0]} forward values from {src}, expected {hi - lo}")
        self._prev[self.n_own + lo : self.n_own + hi] = values

    def _boundary_values(self, arr) -> dict[int, np.ndarray]:
        out = {}
        for d in range(self.n_partitions):
            lo, hi = self._bnd_off[d], self._bnd_off[d + 1]
            if hi > lo:
                out[d] = arr[self._bnd_lid[lo:hi]]
        return out

    @property
    def forward_scores(self) -> np.ndarray:
        """float64[n_own] forward scores of the owned nodes (after the rounds run so far)."""
        return self._prev[: self.n_own].copy()

    def max_forward(self) -> float:
        """Largest owned forward score (0.0 for an empty partition): the driver's S input."""
        return float(self._prev[: self.n_own].max()) if self.n_own else 0.0

    # ---- reverse pass ------------------------------------------------------------------------

    def start_reverse(self, shift: int) -> None:
        """Quantize owned scores and halo bounds with the global shift; everything unpicked."""
        n_own, n_halo = self.n_own, self.n_halo
        self.shift = int(shift)
        q = quantize_scores(self._prev, self.shift)  # halo: exact initial q = a valid bound
        self.q0 = q[:n_own].copy()
        self._node = _init_records(n_own, q, self._nd_ptr)
        self._qpick = np.zeros(n_own, np.int64)
        self._watch_next = np.empty(n_own, self.neighbors.dtype)
        self._hkey = np.empty(n_own, np.int64)
        self._hnode = np.empty(n_own, self.neighbors.dtype)
        self.meta = np.zeros(_M_SIZE, np.int64)
        self.meta[_M_DEAD_Q] = _NO_LEVEL_Q
        self.meta[_M_DEAD_G] = _NO_LEVEL_G
        self.pick_lid = np.empty(n_own, np.int64)
        self._sq = np.empty(n_own, np.int64)  # all picks so far, best first: q at pick, global id
        self._sg = np.empty(n_own, np.int64)
        self._n_sorted = 0
        self._own_dirty = np.empty(n_own, np.int64)
        self._halo_dirty = np.empty(n_halo, np.int64)
        self._pending = np.empty(n_own, np.int64)
        self._slot_template = np.zeros(0, _slot_dtype(max(n_own, n_halo)))
        _init_heap(n_own, self._node, self._hkey, self._hnode, self.meta)

    @property
    def q(self) -> np.ndarray:
        """int64[n_own + n_halo] current q of the owned nodes and bounds of the halo (PICKED once
        picked); a view."""
        return self._node[:, _Q]

    def step(
        self, inbox, remaining: int | None = None, gamma: float = 1.0, dead_level: tuple[int, int] | None = None
    ) -> dict[int, RoundMessage]:
        """One round: apply the received :class:`RoundMessage` s (``inbox``: iterable of
        ``(src, message)``), certify to a fixpoint (at most ``remaining`` picks; None: no cap;
        never a node strictly below ``dead_level``, a priority the driver knows to have >= B
        picks above it), and return this round's messages by destination partition (non-empty
        ones only)."""
        if self.shift is None:
            raise RuntimeError("start_reverse first")
        if dead_level is not None:
            dq, dg = int(dead_level[0]), int(dead_level[1])
            if (dq, -dg) > (int(self.meta[_M_DEAD_Q]), -int(self.meta[_M_DEAD_G])):
                self.meta[_M_DEAD_Q], self.meta[_M_DEAD_G] = dq, dg
        n_own = self.n_own
        dec_seg, dec_s, dec_v, st_seg, st_s, st_v = [], [], [], [], [], []
        n_dec = n_st = 0
        for src, msg in inbox:
            if msg.dec_slots.size:
                dec_seg.append((src, n_dec, n_dec + msg.dec_slots.size))
                n_dec += msg.dec_slots.size
                dec_s.append(msg.dec_slots)
                dec_v.append(msg.dec_values)
            if msg.state_slots.size:
                st_seg.append((src, n_st, n_st + msg.state_slots.size))
                n_st += msg.state_slots.size
                st_s.append(msg.state_slots)
                st_v.append(msg.state_values)
        _apply_inbox(
            np.array(dec_seg, np.int64).reshape(-1, 3), _cat(dec_s, np.int64), _cat(dec_v, np.int64),
            np.array(st_seg, np.int64).reshape(-1, 3), _cat(st_s, np.int64), _cat(st_v, np.int64),
            n_own, self.indptr, self.neighbors, self._bnd_off, self._bnd_lid, self._halo_off,
            self._node, self.gid, self._watch_next, self._hkey, self._hnode, self.meta, self._own_dirty,
            self._halo_dirty, self._pending,
        )  # fmt: skip
        cap = np.iinfo(np.int64).max if remaining is None else int(remaining)
        before = int(self.meta[_M_PICKS])
        self.last_picks = _certify(
            cap, float(gamma), n_own, self.indptr, self.neighbors, self.distances,
            self._node, self.gid, self._qpick, self._watch_next, self._hkey, self._hnode, self.meta,
            self.pick_lid, self._own_dirty, self._halo_dirty, self._pending,
        )  # fmt: skip
        self._n_sorted, ok = _merge_run(
            self._sq, self._sg, self._n_sorted, self.pick_lid[before : before + self.last_picks], self._qpick, self.gid
        )
        if not ok:  # pragma: no cover - would mean the certification order is wrong
            raise RuntimeError(f"partition {self.part_id}: a round's picks were not best first")
        dec_cnt, dec_slot, dec_val, st_cnt, st_slot, st_val = _collect_outbox(
            self.n_partitions, n_own, self._node, self.meta, self.halo_owner, self._halo_off,
            self._halo_dirty, self._nd_ptr, self._nd_dest, self._nd_slot,
            self._bnd_off, self._own_dirty, self._slot_template,
        )  # fmt: skip
        out = {}
        for d in np.flatnonzero(dec_cnt + st_cnt).tolist():
            a, c = self._halo_off[d], self._bnd_off[d]
            b, e = a + dec_cnt[d], c + st_cnt[d]
            out[d] = RoundMessage(dec_slot[a:b], dec_val[a:b], st_slot[c:e], st_val[c:e])
        return out

    @property
    def n_picks(self) -> int:
        return int(self.meta[_M_PICKS])

    @property
    def n_parks(self) -> int:
        """Candidates examined and found blocked so far (work beyond the picks themselves)."""
        return int(self.meta[_M_PARKS])

    @property
    def n_rechecks(self) -> int:
        """Parked nodes examined again because their blocker fell or was picked."""
        return int(self.meta[_M_RECHECKS])

    @property
    def late_suppressions(self) -> int:
        """Suppression messages that arrived for already-picked nodes: always 0 (a self-check)."""
        return int(self.meta[_M_LATE])

    def best_unpicked(self) -> tuple[int, int] | None:
        """(q, global id) of the best owned node that is unpicked and not dead; None if none."""
        found, bq, bg = _best_unpicked(self.n_own, self._node, self.gid, self.meta)
        return (int(bq), int(bg)) if found else None

    def count_picks_above(self, threshold: tuple[int, int] | None) -> int:
        """Picks with priority strictly above ``threshold`` ((q, global id); None: all picks)."""
        if threshold is None:
            return self._n_sorted
        return int(_count_above(self._sq, self._sg, self._n_sorted, int(threshold[0]), int(threshold[1])))

    def settle(self, threshold: tuple[int, int] | None, limit: int, points: int = 64):
        """The round's report after the driver's T: (#picks above ``threshold``, sketch) where the
        sketch describes the picks below it (the unsettled ones), best first: int64 arrays
        (q, global id, k) saying "the k-th best unsettled pick has priority (q, id)", for up to
        ``points`` ranks k spread evenly over 1..min(#unsettled, limit), the largest included."""
        c = self.count_picks_above(threshold)
        r = min(self._n_sorted - c, int(limit))
        if r <= 0:
            e = np.zeros(0, np.int64)
            return c, (e, e, e)
        ks = np.unique(-((-np.arange(1, points + 1, dtype=np.int64) * r) // points))  # ceil(j r / m)
        idx = c + ks - 1
        return c, (self._sq[idx].copy(), self._sg[idx].copy(), ks)

    def picks_above(self, threshold: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """(global ids, q at pick) of the picks above ``threshold``, best first."""
        c = self.count_picks_above(threshold)
        return self._sg[:c].copy(), self._sq[:c].copy()

    # ---- final scores ------------------------------------------------------------------------

    def finish_send(self, threshold: tuple[int, int], gamma: float = 1.0) -> dict[int, "FinalMessage"]:
        """Start the final-score pass for the first B picks (those at or above ``threshold``,
        the B-th pick's (q, global id)): sums this partition's suppression from them and finds
        each neighbour's blame; returns, per owner of halo nodes it suppressed, their
        :class:`FinalMessage`."""
        tq, tg = threshold
        self._final_threshold = (int(tq), int(tg))
        acc, amount, who = _finish_sums(
            int(tq), int(tg), float(gamma), self.n_own, self.n_halo, self.indptr, self.neighbors,
            self.distances, self._qpick, self.gid, self.pick_lid, self.meta[_M_PICKS],
        )  # fmt: skip
        n_own = self.n_own
        self._acc, self._blame_amount, self._blame_gid = acc[:n_own], amount[:n_own], who[:n_own]
        out = {}
        for o in range(self.n_partitions):
            lo, hi = self._halo_off[o], self._halo_off[o + 1]
            if hi > lo:
                vals = acc[n_own + lo : n_own + hi]
                nz = np.flatnonzero(vals)
                if nz.size:
                    out[o] = FinalMessage(nz.astype(_slot_dtype(hi - lo)), vals[nz], amount[n_own + lo + nz],
                                          who[n_own + lo + nz])
        return out

    def finish_receive(self, inbox) -> np.ndarray:
        """Final int64 q of the owned nodes (``inbox``: iterable of (src, :class:`FinalMessage`));
        the blame is then :attr:`blame`."""
        lids, vals, amounts, gids = [], [], [], []
        for src, msg in inbox:
            lids.append(self._bnd_lid[self._bnd_off[src] + msg.slots.astype(np.int64)])
            vals.append(msg.sums)
            amounts.append(msg.blame_amounts)
            gids.append(msg.blame_nodes)
        tq, tg = self._final_threshold
        return _finish_scores(
            self._acc, self._blame_amount, self._blame_gid, _cat(lids, np.int64), _cat(vals, np.int64),
            _cat(amounts, np.int64), _cat(gids, np.int64), tq, tg, self.n_own, self._node, self._qpick, self.q0,
            self.gid,
        )  # fmt: skip

    @property
    def blame(self) -> tuple[np.ndarray, np.ndarray]:
        """After :meth:`finish_receive`: for each owned node not among the first B, the global id
        of the selected neighbour whose single suppression of it was largest (ties: the lower
        id; -1 if none suppressed it) and that suppression (int64 fixed point, >= 0)."""
        return self._blame_gid, self._blame_amount


def _cat(parts, dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    return np.ascontiguousarray(np.concatenate(parts), dtype=dtype)


# --------------------------------------------------------------------------------------------
# Splitting a graph, the in-process driver
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _pattern_symmetric(indptr, indices):
    """1: every (i, j) entry has as many (j, i) entries; 0: not; -1: a row is unsorted (then
    this kernel cannot tell)."""
    n = indptr.shape[0] - 1
    for i in range(n):
        for e in range(indptr[i] + 1, indptr[i + 1]):
            if indices[e] < indices[e - 1]:
                return -1
    for i in range(n):
        e = indptr[i]
        hi = indptr[i + 1]
        while e < hi:
            j = indices[e]
            run = 1
            while e + run < hi and indices[e + run] == j:
                run += 1
            # count i in row j by binary search
            lo2 = indptr[j]
            hi2 = indptr[j + 1]
            a, b = lo2, hi2
            while a < b:
                m = (a + b) >> 1
                if indices[m] < i:
                    a = m + 1
                else:
                    b = m
            c = 0
            while a + c < hi2 and indices[a + c] == i:
                c += 1
            if c != run:
                return 0
            e += run
    return 1


def _check_pattern_symmetric(graph: CSRGraph) -> None:
    if graph.known_symmetric:
        return
    status = _pattern_symmetric(graph.indptr, graph.indices)
    if status == -1:
        rows = np.repeat(np.arange(graph.n_nodes, dtype=np.int64), graph.degrees)
        cols = graph.indices.astype(np.int64)
        fwd = np.lexsort((cols, rows))
        rev = np.lexsort((rows, cols))
        status = int(np.array_equal(rows[fwd], cols[rev]) and np.array_equal(cols[fwd], rows[rev]))
    if status != 1:
        raise ValueError(
            "partitioned_d2_select needs a symmetric graph (each edge stored in both directions, "
            "as symmetrize_knn makes it)"
        )


@numba.njit(cache=True, nogil=True)
def _partition_rows(indptr, indices, distances, labels, n_parts, owned, p, tag, nbr_template):
    """The owned rows of partition ``p`` with local neighbour ids, and its halo (owner-major).

    ``tag`` (int64[N], shared by the calls for all partitions) maps a node to
    ``(p + 1) << 32 | local id`` for the partition that touched it last, so one random access per
    entry tells owned, halo seen before, or new halo, and the final pass reads the local id.
    """
    n_own = owned.shape[0]
    stamp = np.int64(p + 1) << 32
    low = (np.int64(1) << 32) - 1
    out_ptr = np.zeros(n_own + 1, np.int64)
    for a in range(n_own):
        i = owned[a]
        tag[i] = stamp | a
        out_ptr[a + 1] = out_ptr[a] + indptr[i + 1] - indptr[i]
    n_halo = 0
    for a in range(n_own):
        i = owned[a]
        for e in range(indptr[i], indptr[i + 1]):
            v = indices[e]
            if tag[v] & ~low != stamp:
                tag[v] = stamp | low  # halo, local id not known yet
                n_halo += 1
    # The halo by owner, then ascending id: a scan of the tags (sequential, O(N)) and a counting
    # sort by owner beat sorting it.
    by_id = np.empty(n_halo, np.int64)
    off = np.zeros(n_parts + 1, np.int64)
    h = 0
    for v in range(tag.shape[0]):
        if tag[v] == stamp | low:
            by_id[h] = v
            off[labels[v] + 1] += 1
            h += 1
    for o in range(n_parts):
        off[o + 1] += off[o]
    halo = np.empty(n_halo, np.int64)
    for h in range(n_halo):
        v = by_id[h]
        k = off[labels[v]]
        off[labels[v]] = k + 1
        halo[k] = v
        tag[v] = stamp | (n_own + k)
    out_nbr = np.empty(out_ptr[n_own], nbr_template.dtype)
    out_dist = np.empty(out_ptr[n_own], distances.dtype)
    w = 0
    for a in range(n_own):
        i = owned[a]
        for e in range(indptr[i], indptr[i + 1]):
            out_nbr[w] = tag[indices[e]] & low
            out_dist[w] = distances[e]
            w += 1
    return out_ptr, out_nbr, out_dist, halo


def graph_partition_arrays(graph: CSRGraph, scores, labels, n_partitions: int):
    """Split a graph by ``labels`` into the constructor arguments of each :class:`PartitionState`
    (a list of dicts of numpy arrays, one per partition; empty partitions included)."""
    n = graph.n_nodes
    if n >= 2**32:
        raise ValueError("the in-process split handles up to 2**32 nodes")
    lab = np.ascontiguousarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if n_partitions == 1:  # local ids are the global ids: the graph's own arrays, no copy
        e = np.zeros(0, np.int64)
        return [
            {
                "part_id": 0,
                "n_partitions": 1,
                "owned": np.arange(n, dtype=np.int64),
                "indptr": graph.indptr,
                "neighbors": graph.indices,
                "distances": graph.distances,
                "owned_scores": s,
                "halo": e,
                "halo_owner": e,
                "halo_scores": np.zeros(0, np.float64),
            }
        ]
    order = np.argsort(lab, kind="stable")  # by partition, ascending id inside each
    bounds = np.searchsorted(lab[order], np.arange(n_partitions + 1))
    tag = np.zeros(n, np.int64)
    parts = []
    for p in range(n_partitions):
        owned = order[bounds[p] : bounds[p + 1]]
        ptr, nbr, dist, halo = _partition_rows(
            graph.indptr, graph.indices, graph.distances, lab, n_partitions, owned, p, tag,
            np.zeros(0, _slot_dtype(n)),
        )  # fmt: skip
        parts.append(
            {
                "part_id": p,
                "n_partitions": n_partitions,
                "owned": owned,
                "indptr": ptr,
                "neighbors": nbr,
                "distances": dist,
                "owned_scores": s[owned],
                "halo": halo,
                "halo_owner": lab[halo],
                "halo_scores": s[halo],
            }
        )
    return parts


def dead_level_from_sketches(sketches, remaining: int) -> tuple[int, int] | None:
    """The highest priority λ such that the sketches (:meth:`PartitionState.settle`) prove
    ``remaining`` unsettled picks at or above it; None if they do not. With the settled picks
    above T, that makes >= B picks above every node strictly below λ: those are dead."""
    parts = [(q, g, k, np.full(k.shape[0], p)) for p, (q, g, k) in enumerate(sketches) if k.size]
    if not parts:
        return None
    q, g, k, who = (np.concatenate(x) for x in zip(*parts))
    best_k = np.zeros(len(sketches), np.int64)
    total = 0
    for i in np.lexsort((g, -q)).tolist():  # best first; a partition's ranks grow along it
        p = who[i]
        total += int(k[i] - best_k[p])
        best_k[p] = k[i]
        if total >= remaining:
            return int(q[i]), int(g[i])
    return None


def _check_labels(labels, n: int, n_partitions) -> tuple[np.ndarray, int]:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integer partition numbers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64, copy=False)
    top = int(lab.max()) + 1 if lab.size else 1
    P = top if n_partitions is None else int(n_partitions)
    if lab.size and int(lab.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(lab.min())}")
    if P < 1 or top > P:
        raise ValueError(f"labels must lie in 0..n_partitions-1 ({P} partitions), got max {top - 1}")
    return lab, P


class ReverseRounds:
    """The driver's side of the reverse rounds, O(partitions) numbers per round: the threshold T
    (the best unpicked priority of all partitions), the stop test (``budget`` picks settled above
    T), and what the next round's steps get (``remaining``, ``dead_level``; see the module
    docstring, claims 4 and 5). Shared by :func:`partitioned_d2_select` and the select stage's
    Ray driver."""

    @staticmethod
    def safety_stop(n_nodes: int) -> int:
        """The most rounds a correct run over `n_nodes` can take. Bounds of halo nodes arrive one
        round late, so a chain of picks that alternates between partitions can need two rounds
        per pick (measured: 14 rounds for an 11-node chain over 7 partitions): 2N + 2."""
        return 2 * int(n_nodes) + 2

    def __init__(self, budget: int, max_rounds: int):
        self.budget = int(budget)
        self.max_rounds = int(max_rounds)
        self.remaining = self.budget
        self.dead_level: tuple[int, int] | None = None
        self.rounds = 0
        self.settled_per_round: list[int] = []

    @staticmethod
    def threshold(bests) -> tuple[int, int] | None:
        """T: the highest of the partitions' best unpicked priorities (None entries: none left)."""
        found = [b for b in bests if b is not None]
        return max(found, key=lambda t: (t[0], -t[1])) if found else None

    def start_round(self) -> None:
        if self.rounds >= self.max_rounds:
            raise RuntimeError(f"partitioned greedy did not settle {self.budget} picks in {self.max_rounds} rounds")
        self.rounds += 1

    def settle(self, reports) -> bool:
        """Take the partitions' :meth:`PartitionState.settle` reports for the last T; True when
        ``budget`` picks lie above it (done), else update ``remaining`` and the dead level."""
        settled = sum(int(c) for c, _ in reports)
        self.settled_per_round.append(settled)
        if settled >= self.budget:
            return True
        self.remaining = self.budget - settled
        level = dead_level_from_sketches([sk for _, sk in reports], self.remaining)
        if level is not None:
            self.dead_level = level
        return False


def partitioned_d2_select(
    graph: CSRGraph,
    scores,
    labels,
    budget: int,
    gamma_forward: float = 1.0,
    gamma_reverse: float = 1.0,
    rounds: int = 1,
    *,
    n_partitions: int | None = None,
    max_rounds: int | None = None,
) -> tuple[Selection, dict]:
    """:func:`pipeline.d2.d2_select`, computed by partitions (node i goes to ``labels[i]``)
    exchanging messages in rounds, in this process. Returns the identical :class:`Selection`
    (order, final and forward scores bit for bit) and per-round information.

    Args:
        graph, scores, budget, gamma_forward, gamma_reverse, rounds: as for ``d2_select``
            (``rounds`` = forward rounds). The graph must be symmetric (checked).
        labels: int[N] partition of each node, in ``0..n_partitions-1``.
        n_partitions: number of partitions (default ``max(labels) + 1``); may exceed the labels
            used (empty partitions).
        max_rounds: safety stop for the reverse rounds (default 2N + 2); a RuntimeError past it.

    Returns:
        (selection, info) with info: ``n_partitions``, ``shift``, ``forward_exchanges``,
        ``forward_bytes``, ``rounds`` (reverse rounds), ``picks_per_round``,
        ``settled_per_round`` (#picks above the best unpicked after each round),
        ``messages_per_round`` and ``bytes_per_round`` (non-empty RoundMessages and their
        array bytes), ``final_messages``, ``final_bytes``, ``total_picks`` (B and beyond),
        ``total_parks`` and ``total_rechecks`` (candidates found blocked, parked nodes examined
        again: the certification's extra work).
    """
    graph = check_graph(graph)
    n = graph.n_nodes
    s = check_scores(scores, n)
    gf = check_gamma(gamma_forward, "gamma_forward")
    gr = check_gamma(gamma_reverse, "gamma_reverse")
    b = check_budget(budget, n)
    r = int(rounds)
    if r < 0 or r != rounds:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    lab, P = _check_labels(labels, n, n_partitions)
    _check_pattern_symmetric(graph)
    info = dict(
        n_partitions=P, shift=None, forward_exchanges=0, forward_bytes=0, rounds=0, picks_per_round=[],
        settled_per_round=[], messages_per_round=[], bytes_per_round=[], final_messages=0, final_bytes=0,
        total_picks=0, total_parks=0, total_rechecks=0,
    )  # fmt: skip
    states = [PartitionState(**kw) for kw in graph_partition_arrays(graph, s, lab, P)]

    for _ in range(r):
        outs = [st.forward_round(gf) for st in states]
        info["forward_exchanges"] += 1
        for src, out in enumerate(outs):
            for dst, values in out.items():
                states[dst].receive_forward(src, values)
                info["forward_bytes"] += values.nbytes
    forward = np.empty(n, np.float64)
    for st in states:
        forward[st.owned] = st.forward_scores
    if n == 0 or b == 0:
        return Selection(np.zeros(0, np.int64), forward, forward.copy()), info

    shift = fixed_point_shift(max(st.max_forward() for st in states))
    info["shift"] = shift
    for st in states:
        st.start_reverse(shift)
    inbox: list[list] = [[] for _ in range(P)]
    book = ReverseRounds(b, ReverseRounds.safety_stop(n) if max_rounds is None else int(max_rounds))
    while True:
        book.start_round()
        outs = [st.step(inbox[p], book.remaining, gr, book.dead_level) for p, st in enumerate(states)]
        inbox = [[] for _ in range(P)]
        n_msg = n_bytes = 0
        for src, out in enumerate(outs):
            for dst, msg in out.items():
                inbox[dst].append((src, msg))
                n_msg += 1
                n_bytes += msg.nbytes
        threshold = ReverseRounds.threshold([st.best_unpicked() for st in states])
        reports = [st.settle(threshold, book.remaining) for st in states]
        info["rounds"] += 1
        info["picks_per_round"].append(sum(st.last_picks for st in states))
        info["messages_per_round"].append(n_msg)
        info["bytes_per_round"].append(n_bytes)
        if book.settle(reports):
            break
    info["settled_per_round"] = book.settled_per_round
    late = sum(st.late_suppressions for st in states)
    if late:  # pragma: no cover - would mean the protocol is wrong
        raise RuntimeError(f"{late} suppression messages arrived for picked nodes")
    info["total_picks"] = sum(st.n_picks for st in states)
    info["total_parks"] = sum(st.n_parks for st in states)
    info["total_rechecks"] = sum(st.n_rechecks for st in states)

    # The first B: merge of the partitions' sorted settled picks.
    gids, qs = zip(*(st.picks_above(threshold) for st in states))
    gids = np.concatenate(gids)
    qs = np.concatenate(qs)
    top = np.lexsort((gids, -qs))[:b]
    order = gids[top]
    thr = (int(qs[top[-1]]), int(gids[top[-1]]))

    final_out = [st.finish_send(thr, gr) for st in states]
    final_in: list[list] = [[] for _ in range(P)]
    for src, out in enumerate(final_out):
        for dst, msg in out.items():
            final_in[dst].append((src, msg))
            info["final_messages"] += 1
            info["final_bytes"] += msg.nbytes
    final_q = np.empty(n, np.int64)
    for p, st in enumerate(states):
        final_q[st.owned] = st.finish_receive(final_in[p])
    return Selection(order.astype(np.int64), forward, dequantize_scores(final_q, shift)), info


# --------------------------------------------------------------------------------------------
# Rounds of the unpartitioned certification scheme (the benchmark's yardstick)
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _certified_rounds_kernel(indptr, indices, distances, q, budget, gamma):
    """Synchronous rounds with the same parking as the partitions: every unpicked node is either
    parked on one unpicked neighbour above it, or a candidate examined at the next round start."""
    n = q.shape[0]
    picked = np.zeros(n, np.bool_)
    watch_head = np.full(n, -1, np.int64)
    watch_next = np.empty(n, np.int64)
    cand = np.arange(n)
    n_cand = n
    frontier = np.empty(n, np.int64)
    pick_lid = np.empty(n, np.int64)
    n_picks = 0
    rounds = 0
    while True:
        # Examine the candidates against the state after the last round's picks.
        n_front = 0
        for i in range(n_cand):
            x = cand[i]
            blocker = -1
            for e in range(indptr[x], indptr[x + 1]):
                y = indices[e]
                if y != x and not picked[y] and _higher(q[y], y, q[x], x):
                    blocker = y
                    break
            if blocker >= 0:
                watch_next[x] = watch_head[blocker]
                watch_head[blocker] = x
            else:
                frontier[n_front] = x
                n_front += 1
        # The best unpicked node is always certifiable, so it is the frontier's best.
        found = False
        tq = np.int64(0)
        tg = np.int64(0)
        for i in range(n_front):
            u = frontier[i]
            if not found or _higher(q[u], u, tq, tg):
                found = True
                tq = q[u]
                tg = u
        settled = 0
        for i in range(n_picks):
            u = pick_lid[i]
            if not found or _higher(q[u], u, tq, tg):
                settled += 1
        if settled >= budget:
            return rounds
        rounds += 1
        n_cand = 0
        for i in range(n_front):  # certifiable nodes are never adjacent: pick them all at once
            u = frontier[i]
            picked[u] = True
            pick_lid[n_picks] = u
            n_picks += 1
            w = watch_head[u]
            watch_head[u] = -1
            while w != -1:
                cand[n_cand] = w
                n_cand += 1
                w = watch_next[w]
        for i in range(n_front):
            u = frontier[i]
            qu = q[u]
            if qu <= 0:
                continue
            for e in range(indptr[u], indptr[u + 1]):
                y = indices[e]
                if y == u or picked[y]:
                    continue
                new = suppress(q[y], suppression(edge_weight(gamma, distances[e]), qu))
                if new == q[y]:
                    continue
                q[y] = new
                w = watch_head[y]
                watch_head[y] = -1
                while w != -1:
                    nxt = watch_next[w]
                    if _higher(new, y, q[w], w):
                        watch_next[w] = watch_head[y]
                        watch_head[y] = w
                    else:
                        cand[n_cand] = w
                        n_cand += 1
                    w = nxt


def certified_rounds(graph: CSRGraph, forward_scores, budget: int, gamma: float = 1.0) -> int:
    """Rounds the unpartitioned scheme needs to settle the greedy's first ``budget`` picks: each
    round picks every certifiable node at once (an unpicked node above all its unpicked
    neighbours) and applies their suppression; settled once ``budget`` picks lie above the best
    unpicked node. Same fixed point as :func:`pipeline.d2.reverse_select`; the graph must be
    symmetric. 0 for budget 0 or an empty graph."""
    graph = check_graph(graph)
    s = check_scores(forward_scores, graph.n_nodes, "forward_scores")
    g = check_gamma(gamma, "gamma")
    b = check_budget(budget, graph.n_nodes)
    if graph.n_nodes == 0 or b == 0:
        return 0
    _check_pattern_symmetric(graph)
    q = quantize_scores(s, fixed_point_shift(s.max()))
    return int(_certified_rounds_kernel(graph.indptr, graph.indices, graph.distances, q, b, g))
