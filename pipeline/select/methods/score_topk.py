"""``select.method: score_topk``: the survivors with the highest (shifted) scores, DataComp's
CLIP-score filter (:func:`pipeline.core.selectors.score_topk`), best first, ties to the lower id."""

from __future__ import annotations

import numpy as np

from ...core import selectors
from .base import CutSelector


class ScoreTopK(CutSelector):
    name = "score_topk"
    in_memory = staticmethod(selectors.score_topk)

    def cut_keys(self, seed: int, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return selectors.score_rank(scores)
