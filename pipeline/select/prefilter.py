"""``select.prefilter.basic``: DataComp's basic filter (:mod:`pipeline.core.basic_filter`) as Ray
tasks, one per embedding part, before the select stage's shuffle.

Each task reads its part's caption and original sizes, detects the captions' languages offline
(:func:`pipeline.langid.detect_languages`) and writes, in the stage's work directory,

* ``basic-IIIII.json``: the part's counts (``rows``, ``dropped``, ``dropped_by``, ``failed``), and
* ``basic-IIIII.col``: one int8 ``code`` per row, the index in ``RULES`` of the first rule the
  row fails, -1 when it passes (:mod:`pipeline.formats.shuffle`'s column file; written last, so
  a resumed stage redoes exactly the parts whose codes are missing).

IIIII is the part's position in the plan (= node order: node = part offset + row). The codes reach
the partition workers with their node records (the shuffle's ``nodes`` files, or straight from
these files with one partition); the driver only sums the counts (O(parts)).
"""

from __future__ import annotations

import numpy as np

from ..core.basic_filter import RULES, basic_filter
from ..formats.embeddings import read_filter_columns
from ..formats.shuffle import write_columns
from .shuffle import ShuffleJob, basic_codes_url, read_basic_codes

# where the codes are and how they are read belong to the shuffle, which carries them
codes_url, read_codes_range = basic_codes_url, read_basic_codes


def counts_url(job: ShuffleJob, index: int) -> str:
    return job.path(f"basic-{index:05d}.json")


def filter_part(job: ShuffleJob, index: int) -> dict:
    """The basic filter on part ``index`` of the plan: writes its counts, then its codes."""
    from ..langid import detect_languages

    part = job.plan.parts[index].embedding
    cols = read_filter_columns(job.store, part)
    result = basic_filter(cols["caption"], cols["original_width"], cols["original_height"], detect_languages)
    counts = {"rows": int(part.rows), "dropped": result.dropped, "dropped_by": result.dropped_by,
              "failed": result.failed}
    job.store.write_json(counts_url(job, index), counts)
    write_columns(job.store, codes_url(job, index), {"code": result.first_failed.astype(np.int8)})
    return counts


def summary(counts: list[dict]) -> dict:
    """The stage's ``basic_filter`` stats from the parts' counts."""
    return {"dropped": int(sum(c["dropped"] for c in counts)),
            "dropped_by": {r: int(sum(c["dropped_by"][r] for c in counts)) for r in RULES},
            "failed": {r: int(sum(c["failed"][r] for c in counts)) for r in RULES}}
