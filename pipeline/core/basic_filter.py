"""DataComp's basic filter (Gadre et al. 2023, the ``basic_filter`` baseline of
``mlfoundations/datacomp``), as a pure function of captions and image sizes.

A sample passes when all of these hold (DataComp's thresholds, not settings):

===================== ===================================================================
rule                  passes when
===================== ===================================================================
``caption_not_english``   the caption's language (top-1 of fastText lid.176) is ``en``
``caption_too_few_words`` the caption has more than 2 whitespace-separated words
``caption_too_short``     the caption has more than 5 characters
``image_too_small``       the smaller image side is at least 200 px
``image_aspect_ratio``    the larger side is at most 3 times the smaller
===================== ===================================================================

Sizes are the image's *original* size (what DataComp's metadata and img2dataset's json record,
before img2dataset's resize). An unknown size (null, or a side <= 0) fails both image rules:
the filter cannot vouch for it.

The language of a caption comes from an injected function (``language_of``), so this module stays
pure and testable without a model; :func:`pipeline.langid.detect_languages` is the production
one. Each sample that fails is attributed to the first rule it fails in :data:`RULES` order
(``dropped_by`` sums to the number dropped); ``failed`` counts every rule on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RULES = ("caption_not_english", "caption_too_few_words", "caption_too_short", "image_too_small",
         "image_aspect_ratio")
ENGLISH = "en"
MIN_WORDS_EXCLUSIVE = 2  # more than 2 words
MIN_CHARS_EXCLUSIVE = 5  # more than 5 characters
MIN_SIDE = 200  # smaller side >= 200 px
MAX_ASPECT_RATIO = 3.0  # larger side / smaller side <= 3


@dataclass(frozen=True)
class BasicFilterResult:
    keep: np.ndarray  # bool [n]
    first_failed: np.ndarray  # int8 [n]: index into RULES of the first failed rule, -1 when kept
    failed: dict[str, int]  # rule -> samples failing it (a sample may fail several)
    dropped_by: dict[str, int]  # rule -> samples dropped with it as their first failed rule

    @property
    def dropped(self) -> int:
        return int((~self.keep).sum())

    def reason(self, i: int) -> str | None:
        """The rule sample `i` was dropped by (None when kept)."""
        code = int(self.first_failed[i])
        return None if code < 0 else RULES[code]


def basic_filter(captions: Sequence[str | None], widths, heights,
                 language_of: Callable[[list[str]], Sequence[str]]) -> BasicFilterResult:
    """Apply DataComp's basic filter to n samples: captions, original widths and heights (ints,
    None/NaN/<= 0 for unknown), and ``language_of(captions) -> language codes``."""
    texts = ["" if c is None else str(c) for c in captions]
    n = len(texts)
    width = _sizes(widths, n, "widths")
    height = _sizes(heights, n, "heights")
    languages = list(language_of(texts)) if n else []
    if len(languages) != n:
        raise ValueError(f"language_of returned {len(languages)} languages for {n} captions")

    short_side = np.minimum(width, height)
    long_side = np.maximum(width, height)
    known = short_side > 0
    ratio = np.divide(long_side, short_side, out=np.full(n, np.inf), where=known)
    fails = np.stack([
        np.array([lang != ENGLISH for lang in languages], dtype=bool).reshape(n),
        np.array([len(t.split()) <= MIN_WORDS_EXCLUSIVE for t in texts], dtype=bool).reshape(n),
        np.array([len(t) <= MIN_CHARS_EXCLUSIVE for t in texts], dtype=bool).reshape(n),
        ~known | (short_side < MIN_SIDE),
        ~known | (ratio > MAX_ASPECT_RATIO),
    ])
    keep = ~fails.any(axis=0)
    first = np.where(keep, -1, np.argmax(fails, axis=0)).astype(np.int8)
    return BasicFilterResult(
        keep=keep,
        first_failed=first,
        failed={rule: int(fails[i].sum()) for i, rule in enumerate(RULES)},
        dropped_by={rule: int((first == i).sum()) for i, rule in enumerate(RULES)},
    )


def _sizes(values, n: int, name: str) -> np.ndarray:
    """Sizes as float64 with unknown (None/NaN/<= 0) as 0."""
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} values for {n} captions")
    arr[~np.isfinite(arr) | (arr < 0)] = 0
    return arr
