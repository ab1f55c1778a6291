"""The selection methods (``select.method``), one module each, registered once here: the config
takes its allowed names from :data:`SELECTORS`, the stage its size limits and its protocol
(:class:`.base.Selector`). Adding a method: a module defining a selector, and one entry below."""

from __future__ import annotations

from .base import Cut, CutSelector, OneTaskSelector, Selector
from .ccs import CCS
from .d2 import D2
from .kcenter import KCenter
from .moderate import Moderate
from .random import Random
from .score_topk import ScoreTopK

SELECTORS: dict[str, Selector] = {s.name: s for s in (D2(), Random(), ScoreTopK(), CCS(), Moderate(), KCenter())}


def selector(name: str) -> Selector:
    """The registered selector called ``name`` (KeyError naming the known ones)."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise KeyError(f"unknown select.method {name!r}; one of {', '.join(SELECTORS)}") from None


__all__ = ["CCS", "Cut", "CutSelector", "D2", "KCenter", "Moderate", "OneTaskSelector", "Random", "SELECTORS",
           "ScoreTopK", "Selector", "selector"]
