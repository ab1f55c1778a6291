"""What happened to each sample of the pool, as one label per sample (``decisions.parquet``'s
``decision`` column, :mod:`pipeline.formats.selection`).

Pure: from the select stage's per-node results (pre-filter code, rank) and the configured budget.

=============== ============================================================================
decision        when
=============== ============================================================================
``skipped``     the sample never became a node (not embedded: the embed stage's skip reason)
``prefiltered`` a pre-filter dropped it: DataComp's basic filter (a rule) or β
``selected``    ranked within the configured budget (rank < budget)
``ranked``      ranked only for a larger keep rate (budget <= rank)
``pruned``      a candidate the selection did not take
=============== ============================================================================
"""

from __future__ import annotations

import numpy as np

DECISIONS = ("skipped", "prefiltered", "selected", "ranked", "pruned")
SKIPPED, PREFILTERED, SELECTED, RANKED, PRUNED = range(len(DECISIONS))


def decide(prefiltered, rank, budget: int) -> np.ndarray:
    """int8 index into :data:`DECISIONS` of each node: ``prefiltered`` (bool), ``rank`` (int, -1
    when not ranked), the configured ``budget``."""
    prefiltered = np.asarray(prefiltered, bool)
    rank = np.asarray(rank, np.int64)
    if prefiltered.shape != rank.shape:
        raise ValueError(f"prefiltered {prefiltered.shape} and rank {rank.shape} differ")
    if np.any(prefiltered & (rank >= 0)):
        raise ValueError("a pre-filtered node cannot be ranked")
    out = np.full(rank.shape, PRUNED, np.int8)
    out[rank >= budget] = RANKED
    out[(rank >= 0) & (rank < budget)] = SELECTED
    out[prefiltered] = PREFILTERED
    return out
