"""D2 Pruning on a kNN graph: exact, O(N·k) memory, compiled greedy.

Pure numpy + numba; no Ray, no I/O. The maths is ``docs/d2.md`` (section numbers below are its sections):

* :func:`symmetrize_knn` turns directed kNN lists (FAISS output) into an undirected
  :class:`CSRGraph` (§3);
* :func:`forward_pass` is the forward message passing (§4), with an optional number of rounds;
* :func:`reverse_select` is the reverse message passing with exact greedy selection (§5), on
  int64 fixed-point scores (:func:`fixed_point_shift`, :func:`quantize_scores`, §7) so that
  the partitioned greedy of :mod:`pipeline.d2_exact` reproduces it bit for bit;
* :func:`d2_select` runs both.

Helpers for the select stage: :func:`budget_for`, :func:`prefilter_mask` (§2),
:func:`shift_nonnegative`, :func:`subgraph` (a node-induced subgraph), :func:`forward_rows` (a node range of the forward pass) and
:func:`cross_edge_fraction`.

Conventions
-----------
* Node ids are ``0..N-1``. Scores: higher = more worth keeping; they must be finite and
  non-negative (the reverse pass otherwise *raises* neighbours), which every entry point checks,
  naming the first bad index.
* Edge weights are ``exp(-gamma * d)`` (:func:`edge_weight`, the one helper every kernel uses)
  with ``d`` whatever distance the graph holds (squared Euclidean from FAISS, or plain Euclidean
  if the caller took the square root): this module never transforms distances.
* Ties in the greedy go to the lowest node id, so the selected set *and* its order are a pure
  function of the inputs.
* Compiled kernels use ``cache=True`` so a process loads them from ``__pycache__`` instead of
  recompiling (the first call in a fresh checkout compiles, a few seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

__all__ = [
    "CSRGraph",
    "Selection",
    "budget_for",
    "check_budget",
    "check_finite_scores",
    "check_gamma",
    "check_graph",
    "check_scores",
    "cross_edge_fraction",
    "d2_select",
    "dequantize_scores",
    "edge_weight",
    "fixed_point_shift",
    "forward_pass",
    "forward_rows",
    "prefilter_mask",
    "quantize_scores",
    "reverse_select",
    "shift_nonnegative",
    "subgraph",
    "suppress",
    "suppression",
    "symmetrize_knn",
    "FIXED_POINT_BITS",
    "FIXED_POINT_FLOOR",
    "MAX_FIXED_POINT_SCORE",
]

# Below this many nodes, neighbour ids fit int32, which halves the graph's largest array.
_INT32_LIMIT = np.iinfo(np.int32).max
# FAISS returns squared L2 distances slightly below zero for (near-)duplicates, from float
# cancellation in ||x||² + ||y||² - 2x·y. Those are clamped to 0; anything more negative is a bug
# upstream and rejected.
NEGATIVE_DISTANCE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CSRGraph:
    """An undirected graph in compressed sparse row form; both directions of each edge stored.

    Attributes:
        indptr: int64[n_nodes + 1]; the neighbours of node ``i`` are
            ``indices[indptr[i]:indptr[i+1]]``.
        indices: int32 (``n_nodes < 2**31``) or int64 neighbour ids.
        distances: float32 or float64 distance of each stored edge (same length as ``indices``).
        n_nodes: number of nodes (isolated nodes included).

    Graphs built by :func:`symmetrize_knn` have rows sorted by neighbour id, no self edges, no
    duplicate edges, and the same distance stored in both directions. The constructor checks the
    structure (shapes, ``indptr`` monotone, ids in range, distances finite and >= 0); it
    does not check symmetry, which the D2 maths assumes but the sequential kernels do not need.
    Graphs from :func:`symmetrize_knn` (and their :func:`subgraph` s) are symmetric by
    construction and say so (:attr:`known_symmetric`), which spares the partitioned selection
    (:mod:`pipeline.d2_exact`) its O(E) symmetry check.
    """

    indptr: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    n_nodes: int
    _known_symmetric: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = int(self.n_nodes)
        if n < 0:
            raise ValueError(f"CSRGraph: n_nodes must be >= 0, got {n}")
        indptr = np.asarray(self.indptr)
        indices = np.asarray(self.indices)
        distances = np.asarray(self.distances)
        if indptr.ndim != 1 or indptr.shape[0] != n + 1:
            raise ValueError(f"CSRGraph: indptr must have shape ({n + 1},), got {indptr.shape}")
        if indices.ndim != 1 or distances.ndim != 1 or indices.shape != distances.shape:
            raise ValueError(
                f"CSRGraph: indices {indices.shape} and distances {distances.shape} must be 1-D of equal length"
            )
        if not np.issubdtype(indptr.dtype, np.integer) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"CSRGraph: indptr/indices must be integer, got {indptr.dtype}/{indices.dtype}")
        if not np.issubdtype(distances.dtype, np.floating):
            raise ValueError(f"CSRGraph: distances must be floating point, got {distances.dtype}")
        if indptr[0] != 0 or indptr[-1] != indices.shape[0]:
            raise ValueError(
                f"CSRGraph: indptr must start at 0 and end at len(indices)={indices.shape[0]}, "
                f"got {indptr[0]}..{indptr[-1]}"
            )
        steps = np.diff(indptr)
        if steps.size and steps.min() < 0:
            raise ValueError(f"CSRGraph: indptr decreases at node {int(np.argmax(steps < 0))}")
        if indices.size:
            bad = (indices < 0) | (indices >= n)
            if bad.any():
                e = int(np.argmax(bad))
                raise ValueError(f"CSRGraph: edge entry {e} has neighbour id {int(indices[e])} outside 0..{n - 1}")
            bad = ~np.isfinite(distances) | (distances < 0)
            if bad.any():
                e = int(np.argmax(bad))
                raise ValueError(
                    f"CSRGraph: edge entry {e} has distance {float(distances[e])!r} (must be finite and >= 0)"
                )
        # Normalise dtypes so the compiled kernels see few type combinations.
        idx_dtype = np.int32 if n < _INT32_LIMIT else np.int64
        dist_dtype = np.float32 if distances.dtype == np.float32 else np.float64
        object.__setattr__(self, "indptr", np.ascontiguousarray(indptr, dtype=np.int64))
        object.__setattr__(self, "indices", np.ascontiguousarray(indices, dtype=idx_dtype))
        object.__setattr__(self, "distances", np.ascontiguousarray(distances, dtype=dist_dtype))
        object.__setattr__(self, "n_nodes", n)

    @classmethod
    def _trusted(cls, indptr, indices, distances, n_nodes, known_symmetric=False) -> "CSRGraph":
        """Build without the O(E) checks, for arrays this module produced itself."""
        graph = object.__new__(cls)
        object.__setattr__(graph, "indptr", indptr)
        object.__setattr__(graph, "indices", indices)
        object.__setattr__(graph, "distances", distances)
        object.__setattr__(graph, "n_nodes", int(n_nodes))
        object.__setattr__(graph, "_known_symmetric", bool(known_symmetric))
        return graph

    @classmethod
    def empty(cls, n_nodes: int = 0) -> "CSRGraph":
        """A graph of ``n_nodes`` isolated nodes."""
        idx_dtype = np.int32 if n_nodes < _INT32_LIMIT else np.int64
        return cls._trusted(
            np.zeros(n_nodes + 1, np.int64), np.zeros(0, idx_dtype), np.zeros(0, np.float32), n_nodes
        )

    @property
    def known_symmetric(self) -> bool:
        """True when the graph is symmetric by construction (built by symmetrize_knn, or a
        subgraph of such a graph, or empty); False means "not known", not "asymmetric"."""
        return self._known_symmetric or self.indices.shape[0] == 0

    @property
    def degrees(self) -> np.ndarray:
        """int64[n_nodes]: number of stored neighbours of each node."""
        return np.diff(self.indptr)

    @property
    def n_entries(self) -> int:
        """Stored (directed) edge entries; twice the undirected edge count for a symmetric graph."""
        return int(self.indices.shape[0])

    @property
    def n_edges(self) -> int:
        """Undirected edges, assuming the graph is symmetric (as :func:`symmetrize_knn` makes it)."""
        return self.n_entries // 2

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.distances.nbytes)

    def neighbors(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, distances) of one node, as views."""
        lo, hi = self.indptr[node], self.indptr[node + 1]
        return self.indices[lo:hi], self.distances[lo:hi]

    def is_symmetric(self) -> bool:
        """True when every stored edge (i, j, d) has its reverse (j, i, d). O(E log E); for tests."""
        n = self.n_nodes
        rows = np.repeat(np.arange(n, dtype=np.int64), self.degrees)
        cols = self.indices.astype(np.int64)
        fwd = np.lexsort((self.distances, cols, rows))
        rev = np.lexsort((self.distances, rows, cols))
        return bool(
            np.array_equal(rows[fwd], cols[rev])
            and np.array_equal(cols[fwd], rows[rev])
            and np.array_equal(self.distances[fwd], self.distances[rev])
        )


@dataclass(frozen=True, eq=False)
class Selection:
    """Result of the reverse pass.

    Attributes:
        order: int64[B] selected node ids in selection order (``order[0]`` picked first).
        forward_scores: float64[N] the scores the reverse pass started from.
        final_scores: float64[N] each node's score when the greedy stopped, as the reverse pass's
            fixed point ``q / 2**S`` (see :func:`fixed_point_shift`): for a selected node, its
            score at the moment it was selected (selected nodes are never updated again); for
            the others, the score after every discount from selected neighbours. With budget 0,
            the forward scores unchanged.
    """

    order: np.ndarray
    forward_scores: np.ndarray
    final_scores: np.ndarray

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def mask(self) -> np.ndarray:
        """bool[N]: True for selected nodes."""
        m = np.zeros(self.forward_scores.shape[0], dtype=bool)
        m[self.order] = True
        return m

    def ranks(self) -> np.ndarray:
        """int64[N]: selection rank of each node (0 = first), -1 when not selected."""
        r = np.full(self.forward_scores.shape[0], -1, dtype=np.int64)
        r[self.order] = np.arange(self.order.shape[0], dtype=np.int64)
        return r


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def check_scores(scores, n: int, what: str = "scores") -> np.ndarray:
    """float64 copy-free view of ``scores`` after checking shape, finiteness and sign."""
    arr = np.asarray(scores)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},) to match the graph's {n} nodes, got {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{what}[{i}] = {float(arr[i])!r}: scores must be finite and non-negative "
            f"({int(bad.sum())} bad values; shift them with shift_nonnegative first)"
        )
    return arr


def check_finite_scores(scores, what: str = "scores") -> np.ndarray:
    """1-D numeric scores as float64 (no copy when already float64), every value finite."""
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {s.shape}")
    if s.size and s.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what}[{i}] = {float(s[i])!r} is not finite")
    return s


def check_gamma(gamma, name: str) -> float:
    """``gamma`` as a float after checking it is finite and >= 0 (ValueError naming ``name``)."""
    g = float(gamma)
    if not math.isfinite(g) or g < 0:
        # A negative width turns the kernel into exp(+d): far nodes would weigh more than near ones.
        raise ValueError(f"{name} must be finite and >= 0, got {gamma!r}")
    return g


def check_graph(graph) -> CSRGraph:
    """``graph`` itself when it is a :class:`CSRGraph`, else TypeError."""
    if not isinstance(graph, CSRGraph):
        raise TypeError(f"expected a CSRGraph, got {type(graph).__name__}")
    return graph


def budget_for(n: int, prune_rate: float) -> int:
    """Keep budget ``round((1 - prune_rate) * n)`` (Python's round: halves go to even).

    ``prune_rate`` must lie in [0, 1]; ``n`` >= 0.
    """
    n = int(n)
    p = float(prune_rate)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"prune_rate must be in [0, 1], got {prune_rate!r}")
    return int(round((1.0 - p) * n))


def check_budget(budget, n: int) -> int:
    """A budget as an int capped at ``n``; ValueError for non-integers (bools too) and negatives."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    b = int(budget)
    if b < 0:
        raise ValueError(f"budget must be >= 0, got {b}")
    return min(b, n)


# --------------------------------------------------------------------------------------------
# Fixed-point scores of the reverse pass (docs/d2.md#7-fixed-point-integer-scores)
# --------------------------------------------------------------------------------------------

# The reverse pass runs on int64 scores q = floor(s * 2**S + 0.5) so that the order in which a
# node's discounts arrive cannot change its score (integer subtraction is associative; float is
# not): the sequential kernel and the partitioned one (d2_exact) then agree bit for bit.
# S is chosen from the largest forward score M so that every initial q is <= 2**FIXED_POINT_BITS
# (relative resolution 2**-44 of M, ~6e-14). Scores only fall; a score is held at
# FIXED_POINT_FLOOR (= -(2**52 - 1), about -256 M) if discounts would take it lower, so every q
# satisfies |q| < 2**52, converts to float64 exactly, and no int64 arithmetic can overflow. The
# floor is part of the rule: it is order-independent too, max(max(q - a, F) - b, F) =
# max(q - a - b, F) for a, b >= 0, and only ever reached by a node pushed below -256 M.
FIXED_POINT_BITS = 44
FIXED_POINT_FLOOR = -(2**52 - 1)
# Largest forward score the fixed point accepts (q * 2**-S must stay a finite float64).
MAX_FIXED_POINT_SCORE = 2.0**960
# S is capped so that 2**-S is a normal float64 and q * 2**-S stays exact (only matters for
# forward scores below 2**-978, which then get fewer than 44 bits).
_MAX_SHIFT = 1022


def fixed_point_shift(max_forward_score) -> int:
    """The shift S of the reverse pass's fixed point for a largest forward score ``M``.

    ``S = FIXED_POINT_BITS - e`` where ``M < 2**e`` (``math.frexp``), capped at 1022, so that
    ``floor(s * 2**S + 0.5) <= 2**FIXED_POINT_BITS`` for every ``0 <= s <= M``. A pure function
    of one number: a partitioned run gets the same S as a sequential one from the global
    maximum (the max of the partitions' maxima). ``M = 0`` gives ``FIXED_POINT_BITS``.

    Raises:
        ValueError: M negative, not finite, or >= MAX_FIXED_POINT_SCORE (2**960).
    """
    m = float(max_forward_score)
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"max_forward_score must be finite and >= 0, got {max_forward_score!r}")
    if m >= MAX_FIXED_POINT_SCORE:
        raise ValueError(f"forward scores up to {m!r} are too large for the fixed point (limit 2**960)")
    _, e = math.frexp(m)
    return min(FIXED_POINT_BITS - e, _MAX_SHIFT)


def quantize_scores(scores, shift: int) -> np.ndarray:
    """int64 ``floor(s * 2**shift + 0.5)`` of float64 scores (exact: the scaling is by a power of
    two and the result stays below 2**53, where adding 0.5 is exact)."""
    return np.floor(np.ldexp(np.asarray(scores, dtype=np.float64), int(shift)) + 0.5).astype(np.int64)


def dequantize_scores(q, shift: int) -> np.ndarray:
    """float64 ``q / 2**shift`` (exact for |q| < 2**53)."""
    return np.ldexp(np.asarray(q, dtype=np.int64).astype(np.float64), -int(shift))


# --------------------------------------------------------------------------------------------
# Compiled kernels (few on purpose: each one costs compile time on a fresh checkout)
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _symmetrize_kernel(neighbors, distances, idx_template, dist_template):
    """Union of both directions of the valid kNN entries, one (smallest) distance per edge.

    Returns (indptr, indices, distances) with rows sorted by neighbour id. The ``*_template``
    arguments only fix the output dtypes.
    """
    n, k = neighbors.shape
    # Count: row i gets its own valid entries (i -> j) and every reverse entry (j <- i).
    own = np.zeros(n, np.int64)
    rev = np.zeros(n, np.int64)
    for i in range(n):
        for c in range(k):
            j = neighbors[i, c]
            if j >= 0 and j != i:
                own[i] += 1
                rev[j] += 1
    cap = np.empty(n + 1, np.int64)
    cap[0] = 0
    for i in range(n):
        cap[i + 1] = cap[i] + own[i] + rev[i]
    total = cap[n]
    out_idx = np.empty(total, idx_template.dtype)
    out_dist = np.empty(total, dist_template.dtype)
    # Fill: each row holds its reverse entries first, then its own entries. Scanning sources in
    # increasing order makes the reverse block already sorted by neighbour id, so sorting a row
    # is: insertion-sort its <= k own entries, then merge the two sorted runs (O(degree)).
    rev_fill = cap[:n].copy()
    own_fill = np.empty(n, np.int64)
    for i in range(n):
        own_fill[i] = cap[i] + rev[i]
    for i in range(n):
        for c in range(k):
            j = neighbors[i, c]
            if j >= 0 and j != i:
                d = distances[i, c]
                if d < 0:
                    d = 0.0
                p = own_fill[i]
                out_idx[p] = j
                out_dist[p] = d
                own_fill[i] = p + 1
                q = rev_fill[j]
                out_idx[q] = i
                out_dist[q] = d
                rev_fill[j] = q + 1
    # Sort each row by neighbour id, drop duplicates keeping the smallest distance, and compact
    # in place (a row's compacted start never passes its original start).
    indptr = np.empty(n + 1, np.int64)
    indptr[0] = 0
    tmp_idx = np.empty(k, idx_template.dtype)
    tmp_dist = np.empty(k, dist_template.dtype)
    write = 0
    for i in range(n):
        lo = cap[i]
        hi = cap[i + 1]
        mid = lo + rev[i]  # own entries live in [mid, hi)
        for a in range(mid + 1, hi):
            key = out_idx[a]
            kd = out_dist[a]
            b = a - 1
            while b >= mid and out_idx[b] > key:
                out_idx[b + 1] = out_idx[b]
                out_dist[b + 1] = out_dist[b]
                b -= 1
            out_idx[b + 1] = key
            out_dist[b + 1] = kd
        # Merge [lo, mid) and [mid, hi) backwards, the own run parked in tmp.
        n_own = hi - mid
        for c in range(n_own):
            tmp_idx[c] = out_idx[mid + c]
            tmp_dist[c] = out_dist[mid + c]
        a = mid - 1
        b = n_own - 1
        w = hi - 1
        while b >= 0:
            if a >= lo and out_idx[a] > tmp_idx[b]:
                out_idx[w] = out_idx[a]
                out_dist[w] = out_dist[a]
                a -= 1
            else:
                out_idx[w] = tmp_idx[b]
                out_dist[w] = tmp_dist[b]
                b -= 1
            w -= 1
        a = lo
        while a < hi:
            j = out_idx[a]
            best = out_dist[a]
            a += 1
            while a < hi and out_idx[a] == j:
                if out_dist[a] < best:
                    best = out_dist[a]
                a += 1
            out_idx[write] = j
            out_dist[write] = best
            write += 1
        indptr[i + 1] = write
    return indptr, out_idx, out_dist, write


@numba.njit(cache=True, nogil=True)
def edge_weight(gamma, d):
    """``exp(-gamma * d)`` in float64: THE edge weight of every kernel (forward and reverse,
    sequential and partitioned), so all of them get identical bits. Scalar libm ``exp``; never
    replace it by a vectorised numpy exp on this path (its last bit may differ)."""
    return math.exp(-gamma * np.float64(d))


@numba.njit(cache=True, nogil=True)
def suppression(w, q):
    """The reverse-pass update a picked node with fixed-point score ``q`` sends over an edge of
    weight ``w``: ``floor(w * max(q, 0) + 0.5)`` as int64 (round half up, never banker's).
    Exact and >= 0; ``q <= 0`` suppresses nothing (docs/d2.md#6-why-suppression-is-clamped-at-zero)."""
    if q <= 0:
        return np.int64(0)
    return np.int64(math.floor(w * np.float64(q) + 0.5))


@numba.njit(cache=True, nogil=True)
def suppress(q, amount):
    """``max(q - amount, FIXED_POINT_FLOOR)`` for ``amount >= 0``. Because every amount is
    non-negative, applying several in any order (or their sum at once) gives the same result."""
    r = q - amount
    if r < FIXED_POINT_FLOOR:
        return np.int64(FIXED_POINT_FLOOR)
    return r


@numba.njit(cache=True, nogil=True)
def _forward_rows_kernel(indptr, indices, distances, lo, hi, self_scores, prev, gamma, out):
    """One round for nodes lo..hi-1: out[i-lo] = self_i + sum_j w_ij * prev_j, summed in CSR order
    (the one forward arithmetic: whole-graph and node-range passes agree bit for bit)."""
    for i in range(lo, hi):
        total = self_scores[i - lo]
        for e in range(indptr[i], indptr[i + 1]):
            total += edge_weight(gamma, distances[e]) * prev[indices[e]]
        out[i - lo] = total


@numba.njit(cache=True, nogil=True)
def _forward_kernel(indptr, indices, distances, scores, gamma, rounds):
    """``rounds`` rounds of s_i + sum_j exp(-gamma d_ij) * s_prev_j, summed in CSR order."""
    n = scores.shape[0]
    prev = scores.copy()
    out = scores.copy()
    for _ in range(rounds):
        _forward_rows_kernel(indptr, indices, distances, 0, n, scores, prev, gamma, out)
        prev[:] = out
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _before(key_a, id_a, key_b, id_b):
    """Heap order: higher score first, then lower node id."""
    return key_a > key_b or (key_a == key_b and id_a < id_b)


@numba.njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_key, heap_id, pos, p, size):
    key = heap_key[p]
    node = heap_id[p]
    while True:
        child = 2 * p + 1
        if child >= size:
            break
        right = child + 1
        if right < size and _before(heap_key[right], heap_id[right], heap_key[child], heap_id[child]):
            child = right
        if _before(heap_key[child], heap_id[child], key, node):
            heap_key[p] = heap_key[child]
            heap_id[p] = heap_id[child]
            pos[heap_id[p]] = p
            p = child
        else:
            break
    heap_key[p] = key
    heap_id[p] = node
    pos[node] = p


@numba.njit(cache=True, nogil=True)
def _reverse_kernel(indptr, indices, distances, q0, budget, gamma):
    """Exact greedy of docs/d2.md#5-reverse-message-passing-and-the-greedy on int64 fixed-point scores, with an indexed binary max-heap.

    The heap holds every unselected node keyed by (current score desc, id asc); ``pos`` maps a
    node to its heap slot (-1 once selected). A picked node suppresses each unselected
    neighbour by ``suppression(w, max(its score, 0))`` >= 0, so keys only ever fall and a
    discounted node only ever sifts down from its own slot: the top is always the exact argmax,
    with no stale entries and O(N) memory. Cost: O(N) heapify + O((B + B·k̄) log N).

    Returns (order int64[budget], final int64[N]): a selected node's score when it was picked,
    the others' after every discount.

    (Measured on the float version: a lazy-invalidation variant that only lowers a score array
    and re-sifts stale tops from the root was ~1.6x slower at N=1e6, k=10, B=3e5: the discounted
    nodes are the high-scoring ones near the top, and re-sifting them from the root costs more
    than sifting them down from their own slot.)
    """
    n = q0.shape[0]
    # A node's current score lives only in its heap slot (one random access less per update);
    # ``final`` is filled when a node is selected and, for the rest, from the heap at the end.
    # ids and slots use the graph's index dtype (int32 below 2^31 nodes) to halve cache traffic.
    final = np.empty(n, np.int64)
    heap_key = q0.copy()
    heap_id = np.arange(n).astype(indices.dtype)
    pos = np.arange(n).astype(indices.dtype)
    for p in range((n >> 1) - 1, -1, -1):
        _sift_down(heap_key, heap_id, pos, p, n)
    order = np.empty(budget, np.int64)
    size = n
    for t in range(budget):
        top = heap_id[0]
        top_score = heap_key[0]
        order[t] = top
        final[top] = top_score
        pos[top] = -1
        size -= 1
        if size > 0:
            heap_key[0] = heap_key[size]
            heap_id[0] = heap_id[size]
            pos[heap_id[0]] = 0
            _sift_down(heap_key, heap_id, pos, 0, size)
        if top_score <= 0:
            continue  # max(score, 0) = 0: suppresses nothing
        for e in range(indptr[top], indptr[top + 1]):
            j = indices[e]
            p = pos[j]
            if p < 0:
                continue  # already selected: frozen
            amount = suppression(edge_weight(gamma, distances[e]), top_score)
            if amount == 0:
                continue
            key = suppress(heap_key[p], amount)
            if key != heap_key[p]:
                heap_key[p] = key
                _sift_down(heap_key, heap_id, pos, p, size)
    for p in range(size):
        final[heap_id[p]] = heap_key[p]
    return order, final


@numba.njit(cache=True, nogil=True)
def _subgraph_kernel(indptr, indices, distances, node_ids, n_nodes):
    new_id = np.full(n_nodes, -1, np.int64)
    for a in range(node_ids.shape[0]):
        new_id[node_ids[a]] = a
    m = node_ids.shape[0]
    out_ptr = np.zeros(m + 1, np.int64)
    for a in range(m):
        i = node_ids[a]
        c = 0
        for e in range(indptr[i], indptr[i + 1]):
            if new_id[indices[e]] >= 0:
                c += 1
        out_ptr[a + 1] = out_ptr[a] + c
    out_idx = np.empty(out_ptr[m], indices.dtype)
    out_dist = np.empty(out_ptr[m], distances.dtype)
    w = 0
    for a in range(m):
        i = node_ids[a]
        for e in range(indptr[i], indptr[i + 1]):
            b = new_id[indices[e]]
            if b >= 0:
                out_idx[w] = b
                out_dist[w] = distances[e]
                w += 1
    return out_ptr, out_idx, out_dist


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def symmetrize_knn(neighbors, distances) -> CSRGraph:
    """Undirected graph from directed kNN lists (docs/d2.md#3-the-knn-graph).

    Args:
        neighbors: int[N, k] neighbour ids of each node; ``-1`` marks a missing neighbour (FAISS
            pads short lists with it). ``N`` is the number of nodes.
        distances: float[N, k] distance of each entry (squared L2 from FAISS, or anything else
            non-negative; used as given). Entries whose neighbour is -1 are ignored, whatever they
            hold (FAISS puts inf or large values there).

    Returns:
        A :class:`CSRGraph` with ``N(i) = {j : j in kNN(i) or i in kNN(j)}``: self edges and
        missing entries dropped, duplicates merged, one distance per edge (the smaller when both
        directions or repeated entries disagree), stored in both directions, rows sorted by id.
        float32 distances stay float32, other float dtypes become float64. Nodes with no valid
        entry either way are isolated (empty rows). ``N = 0`` or ``k = 0`` give an edgeless graph.

    Raises:
        ValueError: shapes differ or are not 2-D; an id is < -1 or >= N; a valid entry's distance
            is NaN, infinite or below ``-NEGATIVE_DISTANCE_TOLERANCE`` (tiny negatives, as FAISS returns for
            near-duplicates, are clamped to 0). The message names the first bad (row, column).
    """
    nb = np.asarray(neighbors)
    dist = np.asarray(distances)
    if nb.ndim != 2 or dist.ndim != 2 or nb.shape != dist.shape:
        raise ValueError(
            f"neighbors {nb.shape} and distances {dist.shape} must be 2-D arrays of the same shape (N, k)"
        )
    if nb.size and not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(f"neighbors must be integer ids, got dtype {nb.dtype}")
    if dist.size and not np.issubdtype(dist.dtype, np.floating):
        raise ValueError(f"distances must be floating point, got dtype {dist.dtype}")
    n, k = nb.shape
    if n == 0 or k == 0:
        return CSRGraph.empty(n)
    nb = np.ascontiguousarray(nb, dtype=np.int64)
    dist_dtype = np.float32 if dist.dtype == np.float32 else np.float64
    dist = np.ascontiguousarray(dist, dtype=dist_dtype)

    # Validate in row chunks so a 10^8-entry input does not need full-size boolean temporaries.
    chunk = max(1, 4_000_000 // k)
    for lo in range(0, n, chunk):
        ids = nb[lo : lo + chunk]
        bad = (ids < -1) | (ids >= n)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"neighbors[{lo + r}, {c}] = {int(ids[r, c])}: ids must be in 0..{n - 1}, or -1 for missing"
            )
        d = dist[lo : lo + chunk]
        # inf is rejected too: with gamma = 0 its weight would be exp(-0 * inf) = NaN.
        bad = (ids >= 0) & ~((d >= -NEGATIVE_DISTANCE_TOLERANCE) & np.isfinite(d))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"distances[{lo + r}, {c}] = {float(d[r, c])!r}: distances of valid neighbours must be "
                "finite and >= 0"
            )

    idx_dtype = np.int32 if n < _INT32_LIMIT else np.int64
    indptr, idx, dd, nnz = _symmetrize_kernel(nb, dist, np.zeros(0, idx_dtype), np.zeros(0, dist_dtype))
    if nnz < idx.shape[0]:
        # Duplicates (mutual kNN pairs) were merged: copy to right-sized arrays so the slack
        # does not travel with the graph (e.g. when it is sent to a Ray task).
        idx = idx[:nnz].copy()
        dd = dd[:nnz].copy()
    return CSRGraph._trusted(indptr, idx, dd, n, known_symmetric=True)


def forward_pass(graph: CSRGraph, scores, gamma: float = 1.0, rounds: int = 1) -> np.ndarray:
    """Forward message passing (docs/d2.md#4-forward-message-passing): ``s'_i = s_i + sum_{j in N(i)} exp(-gamma d_ij) s_j``.

    With ``rounds = R > 1`` (spec extension) each round uses the previous round's scores for the
    neighbours and the original ``s_i`` as the self term. ``rounds = 0`` returns the scores
    unchanged (as float64), which switches the forward pass off for ablations.

    Isolated nodes keep their own score. Returns a new float64[N] array.

    Raises:
        ValueError: scores not float[N], not finite or negative (first bad index named);
            gamma negative or not finite; rounds negative.
    """
    graph = check_graph(graph)
    s = check_scores(scores, graph.n_nodes)
    g = check_gamma(gamma, "gamma")
    r = int(rounds)
    if r < 0 or r != rounds:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    if r == 0 or graph.n_nodes == 0:
        return s.copy()
    return _forward_kernel(graph.indptr, graph.indices, graph.distances, s, g, r)


def forward_rows(graph: CSRGraph, lo: int, hi: int, self_scores, prev, gamma: float) -> np.ndarray:
    """One forward round for nodes ``lo..hi-1`` only: ``self_i + sum_j exp(-gamma d_ij) prev_j``
    (``self_scores`` holds rows lo..hi-1, ``prev`` every node's previous-round score). The same
    arithmetic as :func:`forward_pass`, so a pass split into node ranges is bit-identical."""
    graph = check_graph(graph)
    out = np.empty(int(hi) - int(lo), np.float64)
    _forward_rows_kernel(graph.indptr, graph.indices, graph.distances, int(lo), int(hi),
                         np.ascontiguousarray(self_scores, np.float64), np.ascontiguousarray(prev, np.float64),
                         check_gamma(gamma, "gamma"), out)
    return out


def reverse_select(graph: CSRGraph, forward_scores, budget: int, gamma: float = 1.0) -> Selection:
    """Reverse message passing with exact greedy selection (docs/d2.md#5-reverse-message-passing-and-the-greedy).

    Repeatedly picks the unselected node with the highest current score (ties: lowest id) and
    subtracts ``exp(-gamma d) * max(its score, 0)`` from each unselected neighbour. With
    non-negative forward scores every update lowers a score, so the picks come in strictly
    decreasing priority (score desc, then id asc). Scores are int64 fixed point during the pass
    (``q = floor(s * 2**S + 0.5)``, S from :func:`fixed_point_shift` of the largest forward
    score; each update ``floor(w * max(q, 0) + 0.5)``; floor ``FIXED_POINT_FLOOR``), so the
    result does not depend on the order in which a node's discounts arrive: the partitioned
    greedy of :mod:`pipeline.d2_exact` reproduces it bit for bit. Exact: the same selected set
    and order as the O(B·N) repeated-argmax formulation, in O((N + B·k̄) log N) time and O(N)
    extra memory.

    Args:
        graph: the undirected graph.
        forward_scores: float[N], finite and non-negative (usually :func:`forward_pass` output).
        budget: number of nodes to select. ``0`` selects nothing; ``budget >= N`` selects every
            node (the whole greedy order). Negative budgets are an error.
        gamma: reverse kernel width, >= 0.

    Returns:
        :class:`Selection` (``order`` has ``min(budget, N)`` ids). ``final_scores`` are the
        fixed-point scores as float64 (``q / 2**S``); with budget 0 they are the forward scores
        unchanged. Isolated nodes are never discounted, so they are picked in order of their own
        (fixed-point) score.

    Raises:
        ValueError: bad scores, gamma or budget (see the checks), or forward scores of 2**960
            or more (beyond the fixed point).
    """
    graph = check_graph(graph)
    s = check_scores(forward_scores, graph.n_nodes, "forward_scores")
    g = check_gamma(gamma, "gamma")
    b = check_budget(budget, graph.n_nodes)
    if graph.n_nodes == 0 or b == 0:
        return Selection(np.zeros(0, np.int64), s.copy(), s.copy())
    shift = fixed_point_shift(s.max())
    order, final = _reverse_kernel(graph.indptr, graph.indices, graph.distances, quantize_scores(s, shift), b, g)
    return Selection(order, s.copy(), dequantize_scores(final, shift))


def d2_select(
    graph: CSRGraph,
    scores,
    budget: int,
    gamma_forward: float = 1.0,
    gamma_reverse: float = 1.0,
    rounds: int = 1,
) -> Selection:
    """D2 Pruning: :func:`forward_pass` then :func:`reverse_select` (see both for the rules).

    ``Selection.forward_scores`` holds the forward-pass output (the reverse pass's input).
    """
    forward = forward_pass(graph, scores, gamma_forward, rounds)
    return reverse_select(graph, forward, budget, gamma_reverse)


def prefilter_mask(scores, beta: float) -> np.ndarray:
    """The β pre-filter (docs/d2.md#2-pre-filters-and-the-budget): bool[N], False for the ``round(beta * N)`` lowest scores.

    Ties are broken deterministically and consistently with the greedy: samples are ranked by
    (score descending, index ascending) and the last ``round(beta * N)`` of that ranking are
    dropped, so among equal scores the higher indices go first. ``beta = 0`` keeps everything.

    Raises:
        ValueError: beta outside [0, 1); scores not 1-D or containing NaN (first index named).
    """
    b = float(beta)
    if not (0.0 <= b < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    s = s.astype(np.float64, copy=False)
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(f"scores[{int(np.argmax(nan))}] is NaN")
    n = s.shape[0]
    n_drop = int(round(b * n))
    keep = np.ones(n, dtype=bool)
    if n_drop:
        ranking = np.lexsort((np.arange(n), -s))  # score desc, index asc
        keep[ranking[n - n_drop :]] = False
    return keep


def shift_nonnegative(scores, offset: float | None = None) -> tuple[np.ndarray, float]:
    """Make scores usable by D2: returns ``(scores + offset, offset)`` as float64.

    ``offset=None`` uses ``-min(scores)`` (so the minimum becomes exactly 0; the config's
    ``select.score_offset: null``); an empty array gets offset 0. A given offset that leaves a
    score negative is a ValueError naming it.

    Raises:
        ValueError: scores not 1-D, a score not finite, or a negative result (first index named).
    """
    s = check_finite_scores(scores).copy()
    if offset is None:
        off = float(-s.min()) if s.size else 0.0
    else:
        off = float(offset)
        if not math.isfinite(off):
            raise ValueError(f"offset must be finite, got {offset!r}")
    s += off
    neg = s < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"scores[{i}] + offset {off} = {float(s[i])!r} is negative; use a larger offset")
    return s, off


def subgraph(graph: CSRGraph, node_ids) -> CSRGraph:
    """Induced subgraph on ``node_ids``; node ``node_ids[a]`` becomes node ``a``.

    Edges leaving the set are dropped; each row keeps the original neighbour order (sorted when
    ``node_ids`` is increasing and the graph came from :func:`symmetrize_knn`).

    Raises:
        ValueError: ids not 1-D integers, out of range, or repeated (first one named).
    """
    graph = check_graph(graph)
    ids = np.asarray(node_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"node_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    n = graph.n_nodes
    if ids.size:
        bad = (ids < 0) | (ids >= n)
        if bad.any():
            a = int(np.argmax(bad))
            raise ValueError(f"node_ids[{a}] = {int(ids[a])} is outside 0..{n - 1}")
        seen = np.zeros(n, dtype=np.int64)
        np.add.at(seen, ids, 1)
        if (seen > 1).any():
            dup = int(np.argmax(seen > 1))
            raise ValueError(f"node_ids repeats node {dup}")
    if ids.size == 0:
        return CSRGraph.empty(0)
    ptr, idx, dist = _subgraph_kernel(graph.indptr, graph.indices, graph.distances, ids, n)
    m = ids.shape[0]
    if m < _INT32_LIMIT and idx.dtype != np.int32:
        idx = idx.astype(np.int32)
    return CSRGraph._trusted(ptr, idx, dist, m, known_symmetric=graph.known_symmetric)


def cross_edge_fraction(graph: CSRGraph, labels) -> float:
    """Fraction of stored edges whose endpoints have different labels (docs/d2.md#102-partitions-and-halos: the measure of how
    much a partitioning cuts the graph). 0.0 for a graph with no edges.

    Raises:
        ValueError: labels not of shape (N,).
    """
    graph = check_graph(graph)
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != graph.n_nodes:
        raise ValueError(f"labels must have shape ({graph.n_nodes},), got {lab.shape}")
    if graph.n_entries == 0:
        return 0.0
    cut = 0
    # Chunked over rows so the per-entry temporaries stay small on big graphs.
    step = 1_000_000
    for lo in range(0, graph.n_nodes, step):
        hi = min(graph.n_nodes, lo + step)
        a, b = graph.indptr[lo], graph.indptr[hi]
        src = np.repeat(lab[lo:hi], np.diff(graph.indptr[lo : hi + 1]))
        cut += int(np.count_nonzero(src != lab[graph.indices[a:b]]))
    return cut / graph.n_entries
