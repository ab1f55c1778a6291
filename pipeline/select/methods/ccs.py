"""``select.method: ccs``: coverage-centric coreset selection (:func:`pipeline.core.selectors.
ccs_select`) on the survivors of the β pre-filter: equal-width strata of their shifted scores
over [min, max] (``select.ccs_strata``), the budget split smallest stratum first
(``balanced_budgets``' uniform mode), inside each stratum random's keyed draw. CCS has no order of
its own: its picks are ranked in node order."""

from __future__ import annotations

import numpy as np

from ...core import coreset, selectors
from .base import CutSelector


class CCS(CutSelector):
    name = "ccs"
    in_memory = staticmethod(selectors.ccs_select)

    def cut_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return selectors.random_rank(seed, ids)

    def order_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids), np.int64)

    def groups(self, scores: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
        lo, hi, strata = params
        labels = coreset.ccs_strata(scores, lo, hi, strata)
        return labels, np.bincount(labels, minlength=strata)

    def shares(self, run) -> list[tuple[int | None, int]]:
        strata = run.cfg.select.ccs_strata
        ranges = [r for r in run.hosts.score_range().values() if r is not None]
        lo = min(r[0] for r in ranges) if ranges else 0.0
        hi = max(r[1] for r in ranges) if ranges else 0.0
        counts = sum(run.hosts.set_groups(self.name, (lo, hi, strata)).values())
        counts = np.asarray(counts, np.int64).reshape(-1) if run.n_kept else np.zeros(strata, np.int64)
        nonempty = np.flatnonzero(counts)
        run.stats["ccs_strata"] = strata
        shares = selectors.balanced_budgets(counts[nonempty], run.budget, mode="uniform")
        return [(int(stratum), int(share)) for stratum, share in zip(nonempty, shares)]
