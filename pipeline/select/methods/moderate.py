"""``select.method: moderate``: the moderate coreset (:func:`pipeline.core.selectors.
moderate_select`) on every survivor's graph vector, in one task; ranked in node order."""

from __future__ import annotations

import numpy as np

from ...core import selectors
from .base import OneTaskSelector


class Moderate(OneTaskSelector):
    name = "moderate"
    in_memory = staticmethod(selectors.moderate_select)

    def on_vectors(self, vectors: np.ndarray, budget: int, seed: int) -> np.ndarray:
        return np.asarray(selectors.moderate_select(vectors, budget), np.int64)
