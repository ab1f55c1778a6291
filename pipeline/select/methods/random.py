"""``select.method: random``: a uniform random subset of the survivors, the smallest keyed random
keys (:func:`pipeline.core.selectors.random_select`), ranked in draw order."""

from __future__ import annotations

import numpy as np

from ...core import selectors
from .base import CutSelector


class Random(CutSelector):
    name = "random"
    in_memory = staticmethod(selectors.random_select)

    def cut_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return selectors.random_rank(seed, ids)
