"""The work directory's layout and the stage commit protocol.

Stages talk through files (see ../shared/design/architecture.md)::

    WORKDIR/embeddings/part-NNNNN.parquet   one per input shard (NNNNN = index in the expanded shard list)
    WORKDIR/embeddings/part-NNNNN.stats.json  that shard's counts (samples, skipped by reason), committed
                                              before the part so a committed part always has its stats
    WORKDIR/embeddings/_stats.json          the stage's aggregated stats
    WORKDIR/graph/nodes.parquet             node (row id), uid, part
    WORKDIR/graph/part-NNNNN.parquet        node, neighbors[k], sq_distances[k], cell
    WORKDIR/selection/selected.parquet      uid, rank, forward_score, final_score, partition
    WORKDIR/selection/subset.npy            DataComp subset file
    WORKDIR/<stage>/_SUCCESS.json           the stage's commit marker (written last)

A stage is *committed* when its ``_SUCCESS.json`` exists; it records the fingerprint of the
settings the stage depended on (:meth:`JobConfig.fingerprint`), so a re-run with changed settings
is detected rather than silently reusing stale output.
"""

from __future__ import annotations

import time
from typing import Any

from .config import JobConfig
from .storage import Store, join

STAGE_DIRS = {"embed": "embeddings", "graph": "graph", "select": "selection", "write": "write"}
SUCCESS = "_SUCCESS.json"


class StaleStageError(RuntimeError):
    """A committed stage was produced with settings other than the current config's."""


def stage_dir(cfg: JobConfig, stage: str) -> str:
    return join(cfg.workdir, STAGE_DIRS[stage])


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def read_success(store: Store, cfg: JobConfig, stage: str) -> dict[str, Any] | None:
    url = join(stage_dir(cfg, stage), SUCCESS)
    return store.read_json(url) if store.exists(url) else None


def is_committed(store: Store, cfg: JobConfig, stage: str) -> bool:
    """True when `stage` is committed with the current settings; StaleStageError when with others."""
    marker = read_success(store, cfg, stage)
    if marker is None:
        return False
    expected = cfg.fingerprint(stage)
    if marker.get("fingerprint") != expected:
        raise StaleStageError(
            f"stage '{stage}' in {stage_dir(cfg, stage)} was committed with other settings "
            f"(fingerprint {marker.get('fingerprint')} != {expected}); rerun with --force-from {stage} "
            "to recompute it and every later stage, or use another workdir"
        )
    return True


def fingerprint_of_dir(store: Store, cfg: JobConfig, stage: str) -> str | None:
    """The fingerprint recorded for in-progress parts of a stage (``_FINGERPRINT.json``), if any."""
    url = join(stage_dir(cfg, stage), "_FINGERPRINT.json")
    return store.read_json(url)["fingerprint"] if store.exists(url) else None


def claim_stage_dir(store: Store, cfg: JobConfig, stage: str) -> None:
    """Record the fingerprint before the first part is written, so resumed parts are known to match.

    Parts left by a run with other settings must not be mixed with new ones: refuse.
    """
    existing = fingerprint_of_dir(store, cfg, stage)
    expected = cfg.fingerprint(stage)
    if existing is not None and existing != expected:
        raise StaleStageError(
            f"{stage_dir(cfg, stage)} holds partial output of a run with other settings "
            f"(fingerprint {existing} != {expected}); rerun with --force-from {stage} or use another workdir"
        )
    if existing is None:
        store.write_json(join(stage_dir(cfg, stage), "_FINGERPRINT.json"), {"fingerprint": expected})


def commit_stage(store: Store, cfg: JobConfig, stage: str, stats: dict[str, Any]) -> None:
    """Write the stage's stats and then its commit marker (the marker is always last)."""
    directory = stage_dir(cfg, stage)
    store.write_json(join(directory, "_stats.json"), stats)
    store.write_json(
        join(directory, SUCCESS),
        {"stage": stage, "fingerprint": cfg.fingerprint(stage), "committed_at": time.time()},
    )


def clear_stage(store: Store, cfg: JobConfig, stage: str) -> None:
    """Remove a stage's output (used by --force-from)."""
    store.rm(stage_dir(cfg, stage), recursive=True)


def committed_parts(store: Store, cfg: JobConfig, stage: str) -> list[str]:
    """URLs of a stage's committed ``part-NNNNN.parquet`` files, in part order (the node order of
    the graph). Temporary files of an interrupted local write are hidden (``.part-…tmp-…``) and
    never match."""
    return store.glob(join(stage_dir(cfg, stage), "part-*.parquet"))
