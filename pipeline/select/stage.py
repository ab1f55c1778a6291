"""The select stage: read the committed graph and scores → one pure call
(:func:`pipeline.core.coreset.select_coreset`) → write ``selected.parquet`` and ``subset.npy``.

Scores: the ``select.score`` column of the embedding parts (``clip_score`` by default; any numeric
column), or of ``select.score_file`` joined by uid; every node must have one. Above
``RAY_MIN_NODES`` nodes the forward pass and the per-partition greedies fan out over Ray tasks
(:mod:`.parallel`); the result is the same either way.

When a selected uid is not hex, ``subset.npy`` is not written and the stats say why, naming
examples (``selected.parquet`` stays the complete record).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import JobConfig
from ..core.coreset import InProcess, select_coreset
from ..formats.selection import SELECTED, SUBSET, datacomp_subset, selected_table, subset_npy_bytes
from ..runtime import init_ray
from ..stage import Stage, StageContext
from ..storage import Store, join
from ..workdir import stage_dir
from .inputs import read_inputs
from .parallel import RayExecutor

log = logging.getLogger(__name__)

# Below this many nodes everything runs in the driver process: for small graphs shipping arrays
# to Ray workers costs more than the O(N·k) work itself.
RAY_MIN_NODES = 200_000


def settings(cfg: JobConfig) -> dict[str, Any]:
    # exact_check_max_n only decides whether the overlap is measured; graph.distance is applied here
    return {"select": cfg.select.model_dump(exclude={"exact_check_max_n"}), "distance": cfg.graph.distance,
            "seed": cfg.seed}


def check(cfg: JobConfig, store: Store) -> None:
    if cfg.select.score_file and not store.exists(cfg.select.score_file):
        raise FileNotFoundError(f"select.score_file {cfg.select.score_file} does not exist")


def select(cfg: JobConfig, store: Store, use_ray: bool | None = None):
    """Compute the selection without writing it: (selected.parquet's table, stats).

    ``use_ray``: None = Ray tasks when N >= RAY_MIN_NODES; True/False force either path."""
    t0 = time.perf_counter()
    inputs = read_inputs(store, cfg)
    read_seconds = time.perf_counter() - t0
    n = len(inputs["uids"])
    if use_ray is None:
        use_ray = n >= RAY_MIN_NODES
    if use_ray:
        init_ray(cfg.ray)
    result = select_coreset(inputs["neighbors"], inputs["sq_distances"], inputs["cells"], inputs["scores"],
                            cfg.select, cfg.graph.distance, cfg.seed, cfg.graph.k,
                            vectors_of=inputs["vectors_of"], executor=RayExecutor() if use_ray else InProcess())
    stats = dict(result.stats, score_source=inputs["score_source"], used_ray=bool(use_ray))
    stats["seconds"] = {"read": round(read_seconds, 3), **stats["seconds"]}
    table = selected_table(inputs["uids"][result.nodes], result.forward, result.final, result.partition)
    return table, stats


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Select the coreset from the committed graph; write selected.parquet + subset.npy."""
    sel_dir = stage_dir(cfg.workdir, "select")
    started = time.perf_counter()
    table, stats = select(cfg, store)
    # both files are whole-file atomic writes; the stage is committed only after both
    store.write_parquet(join(sel_dir, SELECTED), table)
    try:
        subset = datacomp_subset(table.column("uid").to_pylist())
        store.write_bytes(join(sel_dir, SUBSET), subset_npy_bytes(subset))
        stats["subset_file"] = join(sel_dir, SUBSET)
    except ValueError as err:
        store.rm(join(sel_dir, SUBSET))
        stats["subset_file"] = None
        stats["subset_file_skipped"] = str(err)
        log.warning("select: subset.npy not written: %s", err)
    stats["seconds"]["total"] = round(time.perf_counter() - started, 3)
    log.info("select stage: %d of %d samples selected (%s)", stats["selected"], stats["n_nodes"], stats["method"])
    return stats


STAGE = Stage(name="select", upstream="graph", settings=settings, check=check, run=run)
