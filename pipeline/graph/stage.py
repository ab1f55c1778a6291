"""The graph stage: the kNN graph of the committed embedding parts, an IVF-Flat search sharded by
groups of cells on Ray, equal bit for bit to :func:`pipeline.core.ivf.sharded_knn_graph` on the
same vectors (the maths; the task bodies are :mod:`.tasks`, the files :mod:`.layout`).

No process holds the index or anything that grows with N: the driver keeps per-list and per-task
arrays (O(sqrt N + tasks)); a map task holds one *unit* (a run of parts balanced by rows); a search
task holds one *group* of lists (its base vectors and the queries that probe them) under
``graph.max_task_rows``. Steps, each committed in the work directory and skipped on a re-run (a
resumed run recomputes only what a missing output needs, with the same bytes):

1. plan (driver): N from the parts' footers, nlist = round(4*sqrt(N)) (or graph.nlist), the units;
2. train, two-level k-means: gather the seeded samples (a task per unit) -> the coarse centroids
   (one task) -> split the fine sample by coarse cell (a task per unit) -> the fine centroids (a
   task per coarse cell, in parallel) -> the driver concatenates them (nlist x d floats);
3. assign (a task per unit): each vector's home list and nprobe probes, computed once, through the
   coarse level (:func:`pipeline.core.ivf.probe_lists_two_level`: a few coarse cells, then their
   fine centroids, not all nlist);
4. group (driver): lists in id order cut into contiguous groups under the row bound, and groups
   into contiguous *waves* whose shuffle files fit ``graph.scratch_gb`` (the (query, group) pairs
   counted by a task per unit from the probes, when one pair per probe would not fit);
5. shuffle (a task per unit, per wave): base rows to the group of their home list, queries once to
   each group they probe, as blocked scratch files (:mod:`.scratch`: why files, and not the object
   store); only the wave's groups;
6. search (a task per group of the wave): list-major top-(k+1), candidates written by merge unit;
   then the wave's shuffle files are removed, so the disk holds one wave's at a time (each wave
   reads the assigned rows again);
7. merge (a task per unit with a missing part): every group's candidates of its nodes, self dropped
   by id, one graph part per embedding part (cell = home list); nodes.parquet is written by a task;
8. recall@k of the written graph on a seeded sample against exact search (in ``_stats.json``);
   the scratch is removed.

``graph.index: flat`` is the exact search through the same code: one list, one probe, every node
in cell 0 (so the select stage's exact greedy is unchanged), all N nodes in one search task.
The stage always writes squared L2 distances; ``graph.distance`` is applied by the select stage
(and fingerprinted with it).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from ..config import JobConfig, output_settings
from ..core import ivf
from ..core.knn import merge_topk, recall_at_k, recall_sample_ids, remove_self
from ..core.runs import consecutive_runs
from ..errors import ConfigError, StaleStageError
from ..formats.embeddings import EmbeddingPart, list_parts, rows_by_part, vector_widths
from ..formats.graph import LISTS, NODES, read_part, write_lists
from ..runtime import init_ray, resources
from ..stage import Stage, StageContext
from ..steps import Resources, Step, run_step, start_step
from ..storage import Store, join
from ..workdir import EMBED, GRAPH, stage_dir
from . import scratch, tasks
from .layout import PLAN, Layout, plan_units

log = logging.getLogger(__name__)

# A unit (the map side's task) holds its rows' float16 vectors, probes and the shuffle's copies:
# about 1.5x what a search task holds per row, so units get half the search bound; at least one
# quantiser block, and enough units to keep every CPU busy with a few tasks each.
UNIT_ROWS_FRACTION = 0.5
MIN_UNIT_ROWS = ivf.PROBE_BLOCK
UNITS_PER_CPU = 4
# CPUs (and FAISS threads) of one search task. One: the list-major scan parallelises over lists,
# but reading blocks and selecting the top-k do not; tasks side by side keep every core busy.
SEARCH_TASK = Resources(cpus=1)


def slots_for(cluster) -> int:
    """Search tasks the cluster runs side by side."""
    return max(1, int(cluster.cpus // SEARCH_TASK.cpus))


def settings(cfg: JobConfig) -> dict[str, Any]:
    return {"graph": output_settings(cfg.graph), "seed": cfg.seed}


def index_sizes(cfg: JobConfig, n_nodes: int) -> tuple[int, int]:
    """(nlist, nprobe) for N nodes; a setting that cannot work for this N is a ConfigError (exit 2)."""
    g = cfg.graph
    if n_nodes <= 0:
        raise ConfigError("the embedding parts hold no rows: there is no graph to build")
    if g.index == "flat":
        if 2 * n_nodes > g.max_task_rows:
            raise ConfigError(
                f"graph.index=flat searches all {n_nodes} nodes in one task ({2 * n_nodes} rows > "
                f"graph.max_task_rows={g.max_task_rows}); use graph.index=ivfflat, or raise graph.max_task_rows"
            )
        return 1, 1
    try:
        nlist = ivf.nlist_for(n_nodes, g.nlist)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if g.nprobe > nlist:
        raise ConfigError(
            f"graph.nprobe={g.nprobe} exceeds the {nlist} IVF lists of these {n_nodes} nodes "
            f"({'graph.nlist' if g.nlist else 'graph.nlist null: round(4*sqrt(N))'}); lower graph.nprobe"
        )
    fine = min(n_nodes, g.train_size if g.train_size is not None else ivf.FINE_POINTS_PER_LIST * nlist)
    if fine < nlist:
        raise ConfigError(f"graph.train_size={g.train_size} cannot place {nlist} IVF lists; use at least nlist or null")
    return nlist, g.nprobe


def check(cfg: JobConfig, store: Store) -> None:
    """Before any work: the sizes this config gives for the committed parts can work."""
    parts, _ = list_parts(store, stage_dir(cfg.workdir, EMBED), cfg.graph.vector)
    index_sizes(cfg, parts[-1].offset + parts[-1].rows)


def _plan(store: Store, cfg: JobConfig, graph_dir: str, parts: list[EmbeddingPart], dim: int, nlist: int,
          nprobe: int, cpus: float) -> Layout:
    """The layout fixed on the first run; a resumed run must see the same parts and sizes."""
    current = {"parts": [p.name for p in parts], "rows": [p.rows for p in parts], "dim": dim, "nlist": nlist,
               "nprobe": nprobe, "k": cfg.graph.k, "vector": cfg.graph.vector, "seed": cfg.seed}
    url = join(graph_dir, PLAN)
    if store.exists(url):
        plan = store.read_json(url)
        for key, value in current.items():
            if plan.get(key) != value:
                raise StaleStageError(
                    f"{url} was made for other embedding parts or settings ({key} differs); the embedding "
                    "stage changed under a partial graph stage: rerun with --force-from graph"
                )
        return Layout.from_json(graph_dir, plan)
    for name in Layout.SCRATCH + ("index",):  # nothing may outlive the plan it was made with
        store.rm(join(graph_dir, name), recursive=True)
    n = parts[-1].offset + parts[-1].rows
    unit_rows = min(int(cfg.graph.max_task_rows * UNIT_ROWS_FRACTION),
                    max(MIN_UNIT_ROWS, math.ceil(n / (UNITS_PER_CPU * max(1.0, cpus)))))
    unit_parts, unit_starts = plan_units([p.rows for p in parts], unit_rows)
    widths = vector_widths(store, parts[0], cfg.graph.vector)
    budget = cfg.graph.scratch_gb
    raw_copy = budget is None or n * 2 * sum(widths) <= budget * 2**30 / 2  # the copy and a wave, half each
    layout = Layout(graph_dir=graph_dir, vector=cfg.graph.vector, widths=widths,
                    n_nodes=n, nlist=nlist, nprobe=nprobe, k=cfg.graph.k, seed=cfg.seed,
                    unit_parts=unit_parts, unit_starts=unit_starts, raw_copy=raw_copy)
    if not raw_copy:
        log.info("graph: the %d rows' raw copy (%.1f GiB) does not fit graph.scratch_gb=%g beside a wave: every "
                 "wave's shuffle reads the embedding parts again", n, n * 2 * sum(widths) / 2**30, budget)
    store.write_json(url, dict(current, **layout.to_json()))
    return layout


class _Steps:
    """Seconds per step, the steps that ran and their task counts; tells the job's hooks when a step
    is committed (a test stops the stage there). A step of the stage may run several
    runner steps (:mod:`pipeline.steps`; train: gather, coarse, split, fine): :meth:`run` counts their
    tasks for the next :meth:`time`."""

    def __init__(self, ctx: StageContext, store: Store) -> None:
        self.ctx, self.store = ctx, store
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []
        self.tasks: dict[str, int] = {}
        self.counted = 0

    def run(self, step: Step) -> list:
        """:func:`~pipeline.steps.run_step`, counting the tasks that ran (:meth:`take`)."""
        started = start_step(step, self.store)
        self.counted += len(started.todo)
        return started.wait()

    def take(self) -> int:
        """The tasks :meth:`run` ran since the last call."""
        counted, self.counted = self.counted, 0
        return counted

    def time(self, name: str, started: float, tasks: int | None = None) -> None:
        """Step `name` took since `started`; with `tasks` (how many it ran) it ran and is
        committed: the hooks hear of it."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 3)
        if tasks is not None:  # a step runs once per wave (shuffle, search): counted together
            if name not in self.ran:
                self.ran.append(name)
            self.tasks[name] = self.tasks.get(name, 0) + tasks
            self.ctx.step_done("graph", name)


def _train(steps: _Steps, store: Store, cfg: JobConfig, layout: Layout, units: list[list[EmbeddingPart]]) -> dict:
    """Two-level k-means as tasks (:func:`pipeline.core.ivf.train_two_level`, step by step); commits
    index/centroids.npz. Returns the training sizes and seconds."""
    import ray

    g = cfg.graph
    coarse_ids, fine_ids = ivf.training_sample_ids(layout.n_nodes, layout.nlist, layout.seed, g.train_size)
    info = {"coarse_cells": layout.k1, "coarse_sample": int(len(coarse_ids)), "fine_sample": int(len(fine_ids))}
    clock = time.perf_counter()
    split_todo = [u for u in range(layout.n_units) if not scratch.exists(store, layout.split(u))]
    coarse_needed = bool(split_todo) and not store.exists(layout.coarse_url)
    gather_units = [u for u in range(layout.n_units) if coarse_needed or u in split_todo]
    calls = []
    for u in gather_units:
        lo, hi = layout.unit_range(u)
        fine = fine_ids[np.searchsorted(fine_ids, lo):np.searchsorted(fine_ids, hi)]
        coarse = coarse_ids[np.searchsorted(coarse_ids, lo):np.searchsorted(coarse_ids, hi)]
        calls.append((store, layout, u, units[u], fine, coarse))
    del coarse_ids, fine_ids
    steps.run(Step("graph.train.gather", tasks.gather_sample, calls, unit="units",
                   outputs=[scratch.index_url(layout.sample(u)) for u in gather_units]))
    del calls
    info["gather_s"] = round(time.perf_counter() - clock, 3)

    clock = time.perf_counter()
    if coarse_needed:  # one task with a whole node's cores
        steps.run(Step("graph.train.coarse", tasks.train_coarse, [(store, layout)], outputs=[layout.coarse_url],
                       resources=Resources(cpus=resources().max_node_cpus)))
    info["coarse_s"] = round(time.perf_counter() - clock, 3)

    clock = time.perf_counter()
    if split_todo:
        (coarse_centroids,) = tasks.load_arrays(store, layout.coarse_url, ["centroids"])
        centroids_ref = ray.put(coarse_centroids)
        steps.run(Step("graph.train.split", tasks.split_sample, [(store, layout, u, centroids_ref) for u in split_todo],
                       outputs=[scratch.index_url(layout.split(u)) for u in split_todo], unit="units"))
    cell_sizes = np.zeros(layout.k1, np.int64)
    for u in range(layout.n_units):
        cell_sizes += scratch.block_rows(store, layout.split(u))
    counts = ivf.fine_counts(cell_sizes, layout.nlist)
    info["split_s"] = round(time.perf_counter() - clock, 3)

    clock = time.perf_counter()
    cells = [c for c in range(layout.k1) if counts[c] > 0]
    steps.run(Step("graph.train.fine", tasks.train_fine, [(store, layout, c, int(counts[c])) for c in cells],
                   outputs=[layout.fine(c) for c in cells], unit="cells"))
    pieces = [tasks.load_arrays(store, layout.fine(c), ["centroids"])[0] for c in cells]
    centroids = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)
    if centroids.shape != (layout.nlist, layout.dim):
        raise RuntimeError(f"trained {centroids.shape} centroids, expected ({layout.nlist}, {layout.dim})")
    coarse_cell = np.repeat(np.arange(layout.k1, dtype=np.int32), counts)
    (coarse,) = tasks.load_arrays(store, layout.coarse_url, ["centroids"])  # the assign step routes through them
    tasks.save_arrays(store, layout.centroids_url, centroids=centroids, coarse_cell=coarse_cell, coarse=coarse)
    info["fine_s"] = round(time.perf_counter() - clock, 3)
    return info


def _groups(store: Store, layout: Layout, max_task_rows: int) -> dict[str, np.ndarray] | None:
    """The committed search groups, or None when there are none or they were cut under another
    graph.max_task_rows (then the search scratch made with them is removed: a resumed run regroups,
    which changes the tasks, not the graph)."""
    if not store.exists(layout.groups_url):
        return None
    names = ["list_group", "sizes", "probe_counts", "max_task_rows", "bound"]
    groups = dict(zip(names, tasks.load_arrays(store, layout.groups_url, names)))
    if int(groups["max_task_rows"]) == max_task_rows:
        return groups
    log.info("graph: graph.max_task_rows changed from %d to %d: regrouping the search", int(groups["max_task_rows"]),
             max_task_rows)
    _remove_search_scratch(store, layout)
    store.rm(layout.groups_url)
    return None


def _remove_search_scratch(store: Store, layout: Layout) -> None:
    """Everything made with the current search groups: buckets, candidates, waves and their counts."""
    for name in ("buckets", "candidates", "index/pairs"):
        store.rm(join(layout.graph_dir, name), recursive=True)
    store.rm(layout.waves_url)


def _waves(steps: "_Steps", store: Store, layout: Layout, groups: dict[str, np.ndarray],
           scratch_gb: float | None) -> tuple[np.ndarray, bool]:
    """The first group of each wave, then G: contiguous runs of groups whose shuffle files (base
    rows plus (query, group) pairs) fit the disk bound beside the raw copy; and whether they were
    cut now (else committed before under the same bound). The pairs are counted by tasks from the
    committed probes only when the upper bound (one pair per probe) does not fit in one wave."""
    budget = -1 if scratch_gb is None else int(scratch_gb * 2**30)
    if store.exists(layout.waves_url):
        starts, saved = tasks.load_arrays(store, layout.waves_url, ["starts", "budget"])
        if int(saved) == budget:
            return starts, False
        log.info("graph: graph.scratch_gb changed: the search is cut into waves again (its groups are kept)")
        for name in ("buckets", "index/pairs"):  # wave numbers change; searched groups stay searched
            store.rm(join(layout.graph_dir, name), recursive=True)
    # the raw copy of the assigned rows (when planned: at most half the bound) shares the bound with a wave
    room = max(1, budget - (layout.n_nodes * 2 * layout.dim if layout.raw_copy else 0))
    list_group = groups["list_group"]
    n_groups = int(list_group.max()) + 1
    base = np.bincount(list_group, weights=groups["sizes"], minlength=n_groups).astype(np.int64)
    base_bytes = base * layout.base_schema.row_bytes
    probes = np.bincount(list_group, weights=groups["probe_counts"], minlength=n_groups).astype(np.int64)
    if budget < 0 or int((base_bytes + probes * layout.query_schema.row_bytes).sum()) <= room:
        starts = np.array([0, n_groups], np.int64)
    else:
        import ray

        group_ref = ray.put(list_group)
        counts = steps.run(Step("graph.count_pairs", tasks.count_pairs,
                                [(store, layout, u, group_ref) for u in range(layout.n_units)], unit="units"))
        pairs = np.sum(counts, axis=0)
        runs = consecutive_runs(base_bytes + pairs * layout.query_schema.row_bytes, room)
        starts = np.array([a for a, _ in runs] + [n_groups], np.int64)
        log.info("graph: the search's %d groups in %d waves under graph.scratch_gb=%g (%.1f GiB of shuffle files "
                 "in all)", n_groups, len(starts) - 1, scratch_gb,
                 (base_bytes.sum() + pairs.sum() * layout.query_schema.row_bytes) / 2**30)
    tasks.save_arrays(store, layout.waves_url, starts=starts, budget=np.int64(budget))
    return starts, True


def _search_wave(steps: "_Steps", store: Store, layout: Layout, parts: list[list[EmbeddingPart]],
                 groups: dict[str, np.ndarray], wave: int, span: tuple[int, int], todo: list[int]) -> tuple[list[dict], int]:
    """Shuffle the units whose buckets of this wave are missing, count the wave's pairs, search the
    groups in `todo` (of ``span[0] <= g < span[1]``). Returns the search results and bytes shuffled."""
    import ray

    clock = time.perf_counter()
    units = [u for u in range(layout.n_units) if not (scratch.exists(store, layout.base(u, wave))
                                                      and scratch.exists(store, layout.query(u, wave)))]
    written = 0
    if units:
        group_ref = ray.put(groups["list_group"])
        # the query file is written after the base file: its index commits the unit
        shuffled = steps.run(Step(
            "graph.shuffle", tasks.shuffle_unit, [(store, layout, u, parts[u], group_ref, wave, span) for u in units],
            outputs=[scratch.index_url(layout.query(u, wave)) for u in units], unit="units"))
        written = sum(b for b in shuffled if b is not None)
        del group_ref
        steps.time("shuffle", clock, steps.take())
    if not store.exists(layout.pairs(wave)):
        pairs = sum(scratch.block_rows(store, layout.query(u, wave)) for u in range(layout.n_units))
        tasks.save_arrays(store, layout.pairs(wave), pairs=np.asarray(pairs, np.int64))
    clock = time.perf_counter()
    # Largest first (distances to compute: list size x probes of the list): the wave ends when its
    # last task does, and a large group started last would leave the other CPUs idle meanwhile.
    work = np.bincount(groups["list_group"], weights=groups["sizes"] * groups["probe_counts"].astype(np.float64))
    todo = sorted(todo, key=lambda q: (-work[q], q))
    searched = steps.run(Step(
        "graph.search", tasks.search_group, [(store, layout, q, wave, q - span[0]) for q in todo],
        resources=SEARCH_TASK, outputs=[scratch.index_url(layout.candidates(q)) for q in todo], unit="groups"))
    steps.time("search", clock, steps.take())
    return [r for r in searched if r is not None], written


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Build the kNN graph of the committed embedding parts (module docstring)."""
    import ray

    g = cfg.graph
    graph_dir = stage_dir(cfg.workdir, GRAPH)
    steps = _Steps(ctx, store)

    clock = time.perf_counter()
    parts, dim = list_parts(store, stage_dir(cfg.workdir, EMBED), g.vector)
    n_nodes = parts[-1].offset + parts[-1].rows
    nlist, nprobe = index_sizes(cfg, n_nodes)
    init_ray(cfg.ray)
    cluster = resources()
    layout = _plan(store, cfg, graph_dir, parts, dim, nlist, nprobe, cluster.cpus)
    units = [parts[a:b] for a, b in layout.unit_parts]
    steps.time("plan", clock)

    # nodes.parquet: one task, beside the steps below (it reads every part's uids)
    nodes_url = join(graph_dir, NODES)
    nodes = start_step(Step("graph.nodes", tasks.nodes_file, [(store, nodes_url, parts)], outputs=[nodes_url]), store)

    missing = {p.name for p in parts if not store.exists(join(graph_dir, f"{p.name}.parquet"))}
    merge_todo = [u for u in range(layout.n_units) if any(p.name in missing for p in units[u])]
    groups = _groups(store, layout, g.max_task_rows)
    train_info: dict[str, Any] = {}
    search_results: list[dict] = []
    shuffled_bytes = 0

    if merge_todo:
        # what the missing parts need, from the end backwards
        n_groups = None if groups is None else int(groups["list_group"].max()) + 1
        search_todo = (None if n_groups is None else
                       [q for q in range(n_groups) if not scratch.exists(store, layout.candidates(q))])
        # every wave's shuffle reads every unit's assigned rows; the merge reads its units' home lists
        assign_todo = [u for u in range(layout.n_units) if not store.exists(layout.assign(u))
                       and (search_todo is None or bool(search_todo) or u in merge_todo)]

        # 2. train
        clock = time.perf_counter()
        if assign_todo and not store.exists(layout.centroids_url):
            train_info = _train(steps, store, cfg, layout, units)
            steps.time("train", clock, steps.take())

        # 3. assign
        clock = time.perf_counter()
        sizes = np.zeros(layout.nlist, np.int64)
        probe_counts = np.zeros(layout.nlist, np.int64)
        assigned: dict[int, Any] = {}
        if assign_todo:
            coarse, centroids, coarse_cell = tasks.load_arrays(store, layout.centroids_url,
                                                               ["coarse", "centroids", "coarse_cell"])
            quantizer_ref = ray.put((coarse, centroids, coarse_cell))
            del centroids, coarse_cell, coarse
            results = steps.run(Step("graph.assign", tasks.assign_unit,
                                     [(store, layout, u, units[u], quantizer_ref) for u in assign_todo],
                                     outputs=[layout.assign(u) for u in assign_todo], unit="units"))
            assigned = {u: r for u, r in zip(assign_todo, results) if r is not None}
            for s, c in assigned.values():
                sizes += s
                probe_counts += c
            del quantizer_ref, results
            steps.time("assign", clock, steps.take())

        # 4. group, and cut the groups into waves under the scratch bound
        clock = time.perf_counter()
        regroup = groups is None
        if regroup:
            for u in range(layout.n_units):
                if u not in assigned:
                    s, c = tasks.load_arrays(store, layout.assign(u), ["sizes", "probe_counts"])
                    sizes += s
                    probe_counts += c
            slots = slots_for(cluster)
            bound = min(g.max_task_rows, max(1, math.ceil(int((sizes + probe_counts).sum()) / slots)))
            list_group = ivf.group_cells(sizes, probe_counts, bound)
            _remove_search_scratch(store, layout)  # made with other groups, if any
            tasks.save_arrays(store, layout.groups_url, list_group=list_group, sizes=sizes, probe_counts=probe_counts,
                              max_task_rows=np.int64(g.max_task_rows), bound=np.int64(bound))
            groups = _groups(store, layout, g.max_task_rows)
            n_groups = int(list_group.max()) + 1
            search_todo = list(range(n_groups))
        wave_starts, cut = _waves(steps, store, layout, groups, g.scratch_gb)
        per_wave = int(np.diff(wave_starts).min())
        if cut and len(wave_starts) > 2 and per_wave < slots_for(cluster):
            # a wave searches only its own groups: fewer than the CPUs leave CPUs idle
            log.warning("graph: a wave of the search holds %d group(s) for %d search slots: CPUs idle while it "
                        "runs; raise graph.scratch_gb (it bounds the whole cluster's search scratch)", per_wave,
                        slots_for(cluster))
        if regroup or cut:
            steps.time("group", clock, steps.take())

        # 5-6. shuffle and search, wave by wave: a wave's buckets are removed once it is searched
        for wave, (g_lo, g_hi) in enumerate(zip(wave_starts[:-1], wave_starts[1:])):
            todo = [q for q in search_todo if g_lo <= q < g_hi]
            if todo:
                searched, wave_bytes = _search_wave(steps, store, layout, units, groups, wave, (g_lo, g_hi), todo)
                search_results += searched
                shuffled_bytes += wave_bytes
            store.rm(layout.wave_dir(wave), recursive=True)

        # 7. merge
        clock = time.perf_counter()

        def committed(_: int, written: list[int]) -> None:
            for index in written:
                ctx.part_committed("graph", index)

        writes = [[p.name for p in units[u] if p.name in missing] for u in merge_todo]
        steps.run(Step("graph.merge", tasks.merge_unit,
                       [(store, layout, u, units[u], n_groups, graph_dir, write) for u, write in zip(merge_todo, writes)],
                       on_result=committed, unit="units"))
        steps.time("merge", clock, steps.take())

    if nodes.todo:
        clock = time.perf_counter()
        nodes.wait()
        steps.time("nodes", clock, len(nodes.todo))
    groups = groups or _groups(store, layout, g.max_task_rows)
    if groups is None:  # every part was committed and the groups were cut under another bound
        groups = {}
    lists_url = join(graph_dir, LISTS)
    if groups and not store.exists(lists_url):
        (coarse_cell,) = tasks.load_arrays(store, layout.centroids_url, ["coarse_cell"])
        write_lists(store, lists_url, groups["sizes"], coarse_cell, groups["list_group"])
    queries_sent = _queries_sent(store, layout)

    # 8. recall on a seeded sample against exact search over all parts; then the scratch goes
    clock = time.perf_counter()
    recall, sample_size = _measure_recall(store, cfg, layout, units, graph_dir)
    steps.time("recall", clock)
    for name in reversed(Layout.SCRATCH):  # candidates first: what is left always reads as consistent
        store.rm(join(graph_dir, name), recursive=True)

    stats = {
        "n_nodes": n_nodes,
        "k": g.k,
        "vector": g.vector,
        "dim": dim,
        "index": g.index,
        "nlist": nlist,
        "nprobe": nprobe,
        "coarse_probes": min(ivf.coarse_probes_for(nprobe), layout.k1),  # coarse cells each vector is routed through
        "parts": len(parts),
        "units": layout.n_units,
        "parts_searched": len(missing),
        "parts_reused": len(parts) - len(missing),
        "rows_searched": int(sum(p.rows for p in parts if p.name in missing)),
        "steps_run": steps.ran,
        "tasks_run": steps.tasks,
        "seconds": steps.seconds,
        "train": train_info,
        "recall_at_k": recall,
        "recall_sample": sample_size,
        "sq_distances": "squared L2 always; the select stage takes sqrt when graph.distance is 'euclidean'",
    }
    if groups:
        rows = ivf.group_rows(groups["list_group"], groups["sizes"], groups["probe_counts"])
        lists_per_group = np.bincount(groups["list_group"])
        stats.update({
            "groups": int(len(rows)),
            "max_task_rows": int(groups["max_task_rows"]),
            "group_bound": int(groups["bound"]),
            "group_rows_max": int(rows.max()),
            "group_rows_mean": round(float(rows.mean()), 1),
            "groups_over_bound": int(((rows > groups["bound"]) & (lists_per_group == 1)).sum()),
            "groups_per_query": None if queries_sent is None else round(queries_sent / n_nodes, 4),
            "scratch_gb": g.scratch_gb,
            "waves": _wave_count(store, layout),
        })
    if search_results:
        stats["search"] = {
            "tasks": len(search_results),
            "task_seconds_max": round(max(r["seconds"] for r in search_results), 3),
            "task_seconds_sum": round(sum(r["seconds"] for r in search_results), 3),
            "read_seconds_sum": round(sum(r["read_s"] for r in search_results), 3),
            "worker_peak_rss_mb": round(max(r["peak_rss_mb"] for r in search_results), 1),
            "shuffled_bytes": int(shuffled_bytes),
        }
    log.info("graph stage: %s", stats)
    return stats


def _wave_count(store: Store, layout: Layout) -> int | None:
    if not store.exists(layout.waves_url):
        return None
    return len(tasks.load_arrays(store, layout.waves_url, ["starts"])[0]) - 1


def _queries_sent(store: Store, layout: Layout) -> int | None:
    """(query, group) pairs the shuffle sent, from each wave's counts (None when one is missing)."""
    if not store.exists(layout.waves_url):
        return None
    (starts,) = tasks.load_arrays(store, layout.waves_url, ["starts"])
    urls = [layout.pairs(w) for w in range(len(starts) - 1)]
    if not all(store.exists(u) for u in urls):
        return None
    return int(sum(tasks.load_arrays(store, u, ["pairs"])[0].sum() for u in urls))


def _unit_items(layout: Layout, units: list[list[EmbeddingPart]], ids: np.ndarray):
    """(unit, [(part, local rows)]) for the sorted global `ids`, unit by unit."""
    for u, parts in enumerate(units):
        lo, hi = layout.unit_range(u)
        inside = ids[np.searchsorted(ids, lo):np.searchsorted(ids, hi)]
        if len(inside):
            yield u, rows_by_part(parts, inside)


def _measure_recall(store: Store, cfg: JobConfig, layout: Layout, units: list[list[EmbeddingPart]],
                    graph_dir: str) -> tuple[float | None, int]:
    """recall@k of the written graph on `graph.recall_sample` seeded nodes, against exact search."""
    import ray

    g = cfg.graph
    sample = recall_sample_ids(layout.n_nodes, g.recall_sample, cfg.seed)
    if len(sample) == 0:
        return None, 0
    pieces = run_step(Step("graph.recall.gather", tasks.gather_prepared,
                           [(store, g.vector, items) for _, items in _unit_items(layout, units, sample)], unit="units"),
                      store)
    ids = np.concatenate([p[0] for p in pieces])
    vecs = np.concatenate([p[1] for p in pieces])
    if not np.array_equal(ids, sample):
        raise RuntimeError("recall sample rows were not all gathered")

    queries = ray.put(vecs)
    best_d = np.full((len(ids), g.k + 1), np.inf, np.float32)
    best_i = np.full((len(ids), g.k + 1), -1, np.int64)
    for d, i in run_step(Step("graph.recall.exact", tasks.exact_topk,
                              [(store, g.vector, g.k + 1, queries, parts) for parts in units if parts], unit="units"),
                         store):
        best_d, best_i = merge_topk(best_d, best_i, d, i, g.k + 1)
    exact_neighbors, _ = remove_self(best_i, best_d, ids, g.k)

    approx = np.full((len(ids), g.k), -1, np.int64)
    for part, rows in rows_by_part([p for parts in units for p in parts], sample):
        got = read_part(store, join(graph_dir, f"{part.name}.parquet"), rows)
        if not np.array_equal(got["node"], rows + part.offset):
            raise RuntimeError(f"graph part {part.name} rows are not in node order")
        approx[np.searchsorted(ids, got["node"])] = got["neighbors"]
    return recall_at_k(approx, exact_neighbors), int(len(ids))


STAGE = Stage(name=GRAPH, reads=(EMBED,), settings=settings, check=check, run=run)
