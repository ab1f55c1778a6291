"""``select.method: kcenter``: k-center greedy (:func:`pipeline.core.selectors.kcenter_greedy`) on
every survivor's graph vector, in one task; ranked in selection order."""

from __future__ import annotations

import numpy as np

from ...core import selectors
from .base import OneTaskSelector


class KCenter(OneTaskSelector):
    name = "kcenter"
    in_memory = staticmethod(selectors.kcenter_greedy)

    def on_vectors(self, vectors: np.ndarray, budget: int, seed: int) -> np.ndarray:
        return np.asarray(selectors.kcenter_greedy(vectors, budget, seed), np.int64)
