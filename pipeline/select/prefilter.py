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

With ``select.prefilter.exact_duplicates`` (:mod:`.duplicates`) or ``decontaminate``
(:mod:`.eval_sets`), :func:`combine_part` per part writes ``prefilter-IIIII.col``: each row's
first failed rule in the order the pre-filters run (basic filter, exact duplicates,
decontamination), and those are the codes the node records carry. The β pre-filter comes after
all of them, in the partitions.
"""

from __future__ import annotations

import numpy as np

from ..core.basic_filter import RULES, basic_filter
from ..formats.embeddings import read_filter_columns, read_sha256
from ..formats.shuffle import write_columns
from .shuffle import ShuffleJob, basic_codes_url, read_basic_codes

BASIC = "basic"  # the basic filter's codes: basic-IIIII.col
COMBINED = "prefilter"  # every pre-filter's: prefilter-IIIII.col (combine_part)


# where the codes are and how they are read belong to the shuffle, which carries them
def codes_url(job: ShuffleJob, index: int) -> str:
    """Plan part ``index``'s basic-filter codes (:func:`filter_part`'s last write)."""
    return basic_codes_url(job, index, BASIC)


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


# --------------------------------------------------------------------------------------------
# Every pre-filter's first failed rule (with select.prefilter.exact_duplicates or decontaminate)
# --------------------------------------------------------------------------------------------


def combined_counts_url(job: ShuffleJob, index: int) -> str:
    return job.path(f"prefilter-{index:05d}.json")


def combine_part(job: ShuffleJob, index: int, basic: bool, threshold: float | None) -> dict:
    """Plan part ``index``'s pre-filter code per row, the first rule it fails in the order the
    filters run: the basic filter's rule, ``exact_duplicate``, ``eval_duplicate`` (at or above
    ``threshold``; None: off). Writes its counts, then ``prefilter-IIIII.col`` (what the node
    records carry: ``job.codes``)."""
    from ..formats.selection import PREFILTER_EVAL, PREFILTER_EXACT, PREFILTER_KEPT
    from . import duplicates, eval_sets

    rows = job.plan.parts[index].embedding.rows
    codes = read_basic_codes(job, index, index + 1, BASIC) if basic else np.full(rows, PREFILTER_KEPT, np.int8)
    counts: dict = {"rows": int(rows)}
    if job.exact:
        duplicate = np.asarray(duplicates.read_kept(job, index).to_numpy(zero_copy_only=False) != "", bool)
        codes[(codes == PREFILTER_KEPT) & duplicate] = PREFILTER_EXACT
        counts["exact_duplicate"] = int((codes == PREFILTER_EXACT).sum())
        counts["sha256_unknown"] = int(read_sha256(job.store, job.plan.parts[index].embedding).null_count)
    if threshold is not None:
        matches = eval_sets.read_matches(job, index)
        copy = matches["set"] >= 0  # written only at or above the threshold
        codes[(codes == PREFILTER_KEPT) & copy] = PREFILTER_EVAL
        dropped = codes == PREFILTER_EVAL
        counts["eval_duplicate"] = int(dropped.sum())
        counts["eval_duplicate_by_set"] = {name: int((dropped & (matches["set"] == k)).sum())
                                           for k, name in enumerate(s.name for s in job.eval_sets)}
        counts["eval_matches"] = int(copy.sum())  # on its own, whatever dropped the row first
    counts["dropped"] = int((codes != PREFILTER_KEPT).sum())
    job.store.write_json(combined_counts_url(job, index), counts)
    write_columns(job.store, basic_codes_url(job, index, COMBINED), {"code": codes.astype(np.int8)})
    return counts
