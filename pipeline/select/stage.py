"""The select stage: the committed graph and scores → ``selected.parquet``, ``subset*.npy``,
``nodes/part-*.parquet`` and ``decisions.parquet/`` (:mod:`pipeline.formats.selection`), computed
by partition workers and tasks on Ray (:mod:`.driver`, :mod:`.hosts`, :mod:`.prefilter`,
:mod:`.decisions`; one selector per method in :mod:`.methods`) with no process holding the pool.

D2 is exact: the selection, its order and every score are the single-process greedy's
(:func:`pipeline.core.d2.d2_select` on the whole graph) bit for bit, for any number of partitions
(docs/d2.md#10-the-exact-partitioned-greedy). Scores: the ``select.score`` column of the embedding parts (``clip_score`` by default; any
numeric column), or of ``select.score_file`` joined by uid; every node must have one.

Below ``RAY_MIN_NODES`` nodes everything runs in this process (the same workers and tasks as
objects and calls): for small graphs starting Ray costs more than the work. When a selected uid is
not hex, no ``subset*.npy`` is written and the stats say why, naming examples.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import JobConfig, output_settings
from ..errors import ConfigError
from ..formats.embeddings import list_parts, numeric_columns
from ..formats.selection import read_selected
from ..stage import Stage, StageContext
from ..storage import Store, join
from ..workdir import EMBED, GRAPH, SELECT, stage_dir
from .driver import check_size, compute

log = logging.getLogger(__name__)

# Below this many nodes everything runs in the driver process (see the module docstring).
RAY_MIN_NODES = 200_000
WORK = "_work"


def settings(cfg: JobConfig) -> dict[str, Any]:
    # graph.distance is applied here (the graph stage writes squared L2 whatever it says)
    select = output_settings(cfg.select)
    prefilter = select["prefilter"]
    # the pre-filters added after the basic filter enter only when on: a config without them keeps
    # the fingerprint (and so the committed selection) it had before they existed
    for name in ("exact_duplicates", "decontaminate"):
        if not prefilter.get(name):
            prefilter.pop(name, None)
    return {"select": select, "distance": cfg.graph.distance, "seed": cfg.seed}


def check(cfg: JobConfig, store: Store) -> None:
    """Inputs usable, before any work: the score source, the one-task baselines' size limit."""
    s = cfg.select
    if s.score_file:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not store.exists(s.score_file):
            raise FileNotFoundError(f"select.score_file {s.score_file} does not exist")
        with store.open(s.score_file, "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
        for needed in ("uid", s.score):
            if needed not in schema.names:
                raise ConfigError(f"select.score_file {s.score_file} has no column {needed!r} (columns: {schema.names})")
        typ = schema.field(s.score).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)):
            raise ConfigError(f"select.score_file {s.score_file} column {s.score!r} must be numeric, got {typ}")
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED))
    if not s.score_file:
        numeric = numeric_columns(store, parts[0])
        if s.score not in numeric:
            raise ConfigError(
                f"select.score={s.score!r} is not a column of the embedding parts ({parts[0].url}); numeric columns "
                f"there: {numeric}; or give select.score_file"
            )
    check_size(cfg, sum(p.rows for p in parts))
    if s.prefilter.decontaminate is not None:
        from .eval_sets import check_eval_sets

        check_eval_sets(cfg, store, parts)


def _use_ray(store: Store, cfg: JobConfig, use_ray: bool | None) -> bool:
    if use_ray is not None:
        return use_ray
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED))
    return sum(p.rows for p in parts) >= RAY_MIN_NODES


def run(cfg: JobConfig, store: Store, ctx: StageContext, use_ray: bool | None = None) -> dict[str, Any]:
    """Compute the selection into the stage's directory (module docstring)."""
    sel_dir = stage_dir(cfg.workdir, SELECT)
    started = time.perf_counter()
    stats = compute(cfg, store, sel_dir, _use_ray(store, cfg, use_ray),
                    hook=lambda index: ctx.part_committed("select", index))
    store.rm(join(sel_dir, WORK), recursive=True)  # intermediate files, once the outputs are written
    stats["seconds"]["total"] = round(time.perf_counter() - started, 3)
    log.info("select stage: %d of %d samples selected (%s)", stats["selected"], stats["n_nodes"], stats["method"])
    return stats


def select(cfg: JobConfig, store: Store, use_ray: bool | None = None):
    """The selection of ``cfg`` computed beside the committed one, without committing anything:
    (its selected.parquet table, its stats). For comparisons (the demo's baselines, sweeps)."""
    import hashlib

    key = hashlib.sha256(repr(settings(cfg)).encode()).hexdigest()[:12]
    work = join(stage_dir(cfg.workdir, SELECT), WORK)
    out = join(work, f"variant-{key}")
    try:
        stats = compute(cfg, store, out, _use_ray(store, cfg, use_ray), decisions=False)  # compared, not acted on
        return read_selected(store, out), stats
    finally:
        store.rm(work, recursive=True)


STAGE = Stage(name=SELECT, reads=(EMBED, GRAPH), settings=settings, check=check, run=run)
