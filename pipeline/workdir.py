"""The work directory's layout and the commit protocol's primitives.

Stages talk through files (docs/design.md#5-files-each-stage-commits)::

    WORKDIR/embeddings/part-NNNNN.parquet   one per input shard (NNNNN = index in the expanded shard list)
    WORKDIR/embeddings/part-NNNNN.stats.json  that shard's counts, committed before the part
    WORKDIR/embeddings/_skipped/part-NNNNN.parquet  shard, key, uid, reason of each sample not in the part
                                            (written before the stats json; beside the part as
                                            part-NNNNN.skipped.parquet in workdirs embedded before)
    WORKDIR/graph/nodes.parquet             node (row id), uid, part
    WORKDIR/graph/part-NNNNN.parquet        node, neighbors[k], sq_distances[k], cell
    WORKDIR/graph/lists.parquet             per IVF list: nodes, coarse cell, search group
    WORKDIR/selection/selected.parquet      uid, rank, forward_score, final_score, partition, selected
    WORKDIR/selection/subset.npy            DataComp subset file (subset_keep{rate}.npy per extra keep rate)
    WORKDIR/selection/nodes/part-PPPPP.parquet  every node's rank, scores, blame and pre-filter, one file per partition
    WORKDIR/selection/decisions.parquet/part-NNNNN.parquet  one row per input sample of shard NNNNN: what
                                            happened to it and why (decision, reason, rank, score, blame_uid)
    WORKDIR/selection/_work/                the select stage's shuffle, basic-filter, merge and decision-join
                                            files (removed at commit)
    WORKDIR/embeddings/precomputed.json     the precomputed encoder's join counts (its _join/ is temporary)
    WORKDIR/write/plan.json, plan/part-*.parquet  the write stage's fixed shard plan (its _join/ is temporary)
    WORKDIR/<stage>/_FINGERPRINT.json       the settings fingerprint of the run that wrote parts there
    WORKDIR/<stage>/_stats.json             the stage's stats
    WORKDIR/<stage>/_MANIFEST.json          every file the stage committed: path, size (checksum where the
                                            store's listing has one); written just before the marker
    WORKDIR/<stage>/_SUCCESS.json           the commit marker (written last)

Each file's schema, writer and checked reader live in :mod:`pipeline.formats`; how a stage uses
these primitives (skip, require upstream, claim, commit) is :func:`pipeline.stage.run_stage`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .errors import StaleStageError
from .stage_names import EMBED, GRAPH, SELECT, STAGE_DIRS, WRITE  # the stages' names and folders, re-exported
from .storage import Store, basename, join

SUCCESS = "_SUCCESS.json"
FINGERPRINT = "_FINGERPRINT.json"
STATS = "_stats.json"
_PART = re.compile(r"part-\d+\.parquet")

__all__ = ["EMBED", "GRAPH", "SELECT", "WRITE", "STAGE_DIRS", "SUCCESS", "StaleStageError", "stage_dir", "part_name"]


def stage_dir(workdir: str, stage: str) -> str:
    """The folder of `stage` (EMBED, GRAPH, SELECT or WRITE) in `workdir`."""
    return join(workdir, STAGE_DIRS[stage])


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def read_success(store: Store, directory: str) -> dict[str, Any] | None:
    url = join(directory, SUCCESS)
    return store.read_json(url) if store.exists(url) else None


def read_stats(store: Store, directory: str) -> dict[str, Any] | None:
    url = join(directory, STATS)
    return store.read_json(url) if store.exists(url) else None


def is_committed(store: Store, directory: str, fingerprint: str, stage: str) -> bool:
    """True when the stage in `directory` is committed with `fingerprint`; StaleStageError when
    committed with another one."""
    marker = read_success(store, directory)
    if marker is None:
        return False
    if marker.get("fingerprint") != fingerprint:
        raise StaleStageError(
            f"stage '{stage}' in {directory} was committed with other settings "
            f"(fingerprint {marker.get('fingerprint')} != {fingerprint}); rerun `d2prune run` with --force-from {stage} "
            "to recompute it and every later stage, or use another workdir"
        )
    return True


def claim(store: Store, directory: str, fingerprint: str, stage: str) -> None:
    """Record the fingerprint before the first part is written, so resumed parts are known to
    match. Parts left by a run with other settings must not be mixed with new ones: refuse."""
    url = join(directory, FINGERPRINT)
    existing = store.read_json(url)["fingerprint"] if store.exists(url) else None
    if existing is not None and existing != fingerprint:
        raise StaleStageError(
            f"{directory} holds partial output of a run with other settings "
            f"(fingerprint {existing} != {fingerprint}); rerun `d2prune run` with --force-from {stage} or use another "
            "workdir"
        )
    if existing is None:
        store.write_json(url, {"fingerprint": fingerprint})


def commit(store: Store, directory: str, fingerprint: str, stage: str, stats: dict[str, Any],
           outside: tuple[str, list[str]] | None = None) -> None:
    """Write the stage's stats, then the manifest of every file it committed (sizes, and the
    store's checksums where its listing has them: :mod:`pipeline.formats.manifest`), then its
    commit marker (always last). `outside`: (output.url, the names under it the stage committed)."""
    from .formats import manifest  # formats modules import this one

    store.write_json(join(directory, STATS), stats)
    manifest.record(store, directory, stage, fingerprint, outside)
    store.write_json(join(directory, SUCCESS),
                     {"stage": stage, "fingerprint": fingerprint, "committed_at": time.time()})


def committed_parts(store: Store, directory: str) -> list[str]:
    """URLs of the committed ``part-NNNNN.parquet`` files in `directory`, in part order (the node
    order of the graph). Temporary files of an interrupted local write are hidden
    (``.part-…tmp-…``) and never match."""
    # not part-NNNNN.skipped.parquet (skip records, beside the parts in workdirs embedded before
    # they got a folder of their own) nor any other part-*.parquet
    return [u for u in store.glob(join(directory, "part-*.parquet")) if _PART.fullmatch(basename(u))]
