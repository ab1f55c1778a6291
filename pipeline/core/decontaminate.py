"""The nearest evaluation image of each pool image, by cosine similarity, exactly and the same on
every CPU and thread count. Pure numpy + numba.

A BLAS matmul (float32, in blocks of pool rows) screens every (pool, evaluation) pair; its last
bits depend on the CPU and the thread count, so it only proposes candidates: every pair within
``SCREEN_MARGIN`` of the row's screened best (and of the threshold). Those pairs are recomputed
by a compiled loop in a fixed order (float64 sums of float32 products, which float64 holds
exactly) and the best of them wins, ties to the lowest evaluation row. So the reported
similarity, and whether it reaches the threshold, are bits that depend on the vectors alone.
"""

from __future__ import annotations

import numba
import numpy as np

# float32 dot products of unit vectors of width <= 4096 err by far less than this
SCREEN_MARGIN = 1e-3
POOL_BLOCK_ROWS = 4096


@numba.njit(cache=True, nogil=True)
def _exact_cosines(pool, evals, rows, cols, out):
    d = pool.shape[1]
    for t in range(rows.shape[0]):
        a, b = rows[t], cols[t]
        dot = 0.0
        na = 0.0
        nb = 0.0
        for j in range(d):
            x = np.float64(pool[a, j])
            y = np.float64(evals[b, j])
            dot += x * y
            na += x * x
            nb += y * y
        out[t] = dot / np.sqrt(na * nb) if na > 0.0 and nb > 0.0 else 0.0


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def nearest_evaluation(pool: np.ndarray, evals: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(best evaluation row (int64, -1 when none reaches ``floor``), its cosine (float64, NaN when
    none)) of each pool row. ``pool`` [n, d] and ``evals`` [m, d] as stored (float16/32, any
    norm); only similarities >= ``floor`` - SCREEN_MARGIN are recomputed exactly, so a caller
    comparing to a threshold passes it (or less) as ``floor``."""
    pool = np.ascontiguousarray(pool, np.float32)
    evals = np.ascontiguousarray(evals, np.float32)
    if pool.ndim != 2 or evals.ndim != 2 or pool.shape[1] != evals.shape[1]:
        raise ValueError(f"pool vectors {pool.shape} and evaluation vectors {evals.shape} differ in width")
    n = pool.shape[0]
    best = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan)
    if n == 0 or evals.shape[0] == 0:
        return best, sim
    unit_evals_t = np.ascontiguousarray(_unit(evals).T)
    for lo in range(0, n, POOL_BLOCK_ROWS):
        hi = min(n, lo + POOL_BLOCK_ROWS)
        screened = _unit(pool[lo:hi]) @ unit_evals_t
        top = screened.max(axis=1)
        bar = np.maximum(top, floor) - SCREEN_MARGIN
        rows, cols = np.nonzero(screened >= bar[:, None])
        if rows.size == 0:
            continue
        exact = np.empty(rows.size)
        _exact_cosines(pool, evals, (rows + lo).astype(np.int64), cols.astype(np.int64), exact)
        # per pool row: the highest exact cosine, ties to the lowest evaluation row
        order = np.lexsort((cols, -exact, rows))
        first = np.concatenate(([True], rows[order][1:] != rows[order][:-1]))
        r, c, s = rows[order][first], cols[order][first], exact[order][first]
        reach = s >= floor
        best[lo + r[reach]] = c[reach]
        sim[lo + r[reach]] = s[reach]
    return best, sim


__all__ = ["SCREEN_MARGIN", "nearest_evaluation"]
