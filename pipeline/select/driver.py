"""The select stage's driver: plans, runs the shuffle tasks, steps the partition workers through
the method, runs the output tasks. It holds O(partitions + parts + cells) numbers, never a node.

One function per phase, in the order :func:`compute` runs them (the workers' side of each is
:mod:`.hosts`, their state per phase :mod:`.phases`):

1. :func:`_plan`: graph parts, per-cell counts (tasks), partitions of whole cells, workers;
2. :func:`_basic_filter` (``select.prefilter.basic``): DataComp's basic filter per embedding part
   (tasks, :mod:`.prefilter`), then :func:`_copies` (``exact_duplicates``, ``decontaminate``:
   tasks, :mod:`.duplicates`, :mod:`.eval_sets`); the M samples that pass are the pool:
   budget, keep rates and β are fractions of M (:class:`Budgets`);
3. :func:`_join_score_file` (``select.score_file``): hash join by uid (tasks);
4. :func:`_shuffle` (tasks, :mod:`.shuffle`): each partition's rows, both directions; none for one
   partition;
5. :func:`_load`: workers load their partitions; boundary scores exchanged (the halo's raw scores);
6. :func:`_prefilter`: the basic filter's drops, then the ``round(beta*M)`` lowest scores of the
   rest (ranking: score desc, id asc) found by a distributed rank search; then the shift:
   ``score_offset`` or minus the survivors' minimum (a reduction);
7. the method (:mod:`.methods`: one selector per ``select.method``) leaves each partition's run of
   picks;
8. :func:`_merge` and :func:`_write_outputs` (tasks, :mod:`.outputs`): ``selected.parquet`` and
   each partition's ranks; the method's final scores; the workers write ``nodes/part-*.parquet``
   and sorted subset runs; merges write ``subset*.npy``;
9. :func:`_decisions` (tasks, :mod:`.decisions`): ``decisions.parquet``, one row per input sample.

The subset merges of step 8 and the decisions of step 9 run on the partition workers' own
processes (``on_workers``; by then they hold no partition): a Ray task per CPU would first start a
fresh worker process and import the pipeline into it, which costs more than these tasks compute.
The merge of ``selected.parquet`` runs while the workers still hold their partitions: on a worker
only when every worker's partitions are small (``MERGE_ON_WORKER_MAX_NODES``), else a task of its own
(on a worker it would add its buffers to that worker's peak).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..config import JobConfig
from ..core import d2
from ..errors import ConfigError
from ..formats.selection import NODES_DIR, SELECTED, not_hex_message, subset_name
from ..runtime import peak_rss_bytes
from ..steps import Resources, Step, run_step
from ..storage import Store, expand_urls, join, node_cache_root
from ..workdir import GRAPH, stage_dir
from . import decisions as decision_files
from . import duplicates, eval_sets, outputs, prefilter, shuffle
from .hosts import HostSettings, Hosts, LocalHosts, RayHosts
from .methods import SELECTORS, selector
from .phases import PREFILTER
from .picking import MethodRun, rank_key
from .plan import SelectPlan, graph_parts, make_plan, resolve_partitions

log = logging.getLogger(__name__)

# the largest partition worker (its nodes) beside which the merge of selected.parquet runs on the
# worker's own process: ~1.5 GB of partition at 2*10^6 nodes, beside the merge's bounded buffers
# (the worker's peak grew 739 -> 773 MB at 10^6)
MERGE_ON_WORKER_MAX_NODES = 2_000_000

# rows of the pool per sha256 bucket of select.prefilter.exact_duplicates (at most one per part)
SHA256_BUCKET_ROWS = 1_000_000


class Tasks:
    """The stage's tasks as steps (:mod:`pipeline.steps`), calling the part hook after each one
    finishes, counted over the whole stage (a test's hook kills the stage after its n-th task)."""

    def __init__(self, store: Store, use_ray: bool, hook: Callable[[int], None] | None = None):
        self.store, self.use_ray, self.hook = store, use_ray, hook
        self.count = 0
        self.workers: Hosts | None = None  # while the partition workers are up

    def run(self, name: str, fn, calls: list[tuple], outputs: list[str] | None = None, cpus: float = 1.0,
            on_workers: bool = False) -> list:
        """``fn(*args)`` per call whose output (the file it commits last) is missing (every call
        without ``outputs``); results in call order, None for the ones already done. ``cpus=0``
        for tasks that run while the partition workers hold the cluster's CPUs. ``on_workers``:
        on the partition workers' processes while they are up (light tasks of bounded memory: no
        fresh Ray worker process per CPU to start and import into, see
        :func:`pipeline.steps._on_actors`)."""
        step = Step(f"select.{name}", fn, calls, outputs, Resources(cpus=cpus), on_result=self._done)
        actors = self.workers.actors if on_workers and self.workers is not None else None
        return run_step(step, self.store, self.use_ray, actors)

    def _done(self, index: int, result) -> None:
        if self.hook is not None:
            self.hook(self.count)
        self.count += 1


class Clock:
    """Seconds per phase (``lap`` ends one), for the stats."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        log.info("select: %s done", name)
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 3)
        self.last = now


@dataclass
class Setup:
    """What the stage runs on: the cluster's CPUs and memory per worker, the graph parts."""

    cfg: JobConfig
    store: Store
    use_ray: bool
    tasks: Tasks
    cpus: int
    worker_bytes: float
    parts: tuple
    n: int  # nodes in the graph (embedded samples)


@dataclass
class Planned:
    plan: SelectPlan
    job: shuffle.ShuffleJob
    join_buckets: int


@dataclass
class Budgets:
    """The pool's numbers: ``m`` of the ``n`` nodes pass the basic filter; ``n_drop`` of them the
    β pre-filter drops; ``budget`` is the configured keep, ``b_max`` the largest with the keep
    rates (``rates``: (rate, budget))."""

    n: int
    m: int
    n_drop: int
    budget: int
    rates: list[tuple[float, int]]

    @property
    def b_max(self) -> int:
        return max([self.budget] + [b for _, b in self.rates])


def budgets_of(cfg: JobConfig, n: int) -> tuple[int, list[tuple[float, int]]]:
    """The configured budget and (rate, budget) of each extra keep rate."""
    return d2.budget_for(n, cfg.select.prune_rate), [(r, int(round(r * n))) for r in cfg.select.keep_rates]


def compute(cfg: JobConfig, store: Store, out_dir: str, use_ray: bool, hook=None,
            decisions: bool = True) -> dict[str, Any]:
    """Run the select stage's computation, writing its outputs into ``out_dir`` (with
    ``decisions``, ``decisions.parquet`` too); returns the stats."""
    clock = Clock()
    setup = _setup(cfg, store, use_ray, hook)
    chosen = selector(cfg.select.method)
    planned = _plan(setup, out_dir)
    clock.lap("plan")
    basic_stats = _basic_filter(setup, planned, clock)
    copies = _copies(setup, planned, clock)
    budgets = _budgets(cfg, setup.n, basic_stats, copies)
    _join_score_file(setup, planned, clock)
    shuffled = _shuffle(setup, planned, chosen.uses_graph)
    clock.lap("shuffle")
    stats = _initial_stats(setup, planned, budgets, shuffled, basic_stats, copies)
    hosts = setup.tasks.workers = _start_hosts(setup, planned)
    try:
        _load(hosts, chosen.uses_graph, budgets, stats)
        clock.lap("load")
        n_kept = _prefilter(hosts, cfg, budgets, stats)
        clock.lap("prefilter")
        run = MethodRun(cfg, planned.plan, planned.job, hosts, stats, budgets.budget, budgets.b_max, n_kept,
                        lambda fn, args: setup.tasks.run("one_task", fn, [args], cpus=0)[0], clock.lap)
        chosen.pick(run)
        clock.lap(cfg.select.method)
        last = _merge(setup, planned, hosts, budgets, out_dir, stats)
        chosen.finish(run, last)
        clock.lap("final_scores")
        _write_outputs(setup, planned, hosts, budgets, out_dir, decisions, stats)
        clock.lap("outputs")
        if decisions and planned.plan.n_groups:  # the workers hold no partition any more
            _decisions(setup, planned, out_dir, budgets.budget, stats)
            clock.lap("decisions")
        hosts.memory()  # the workers' peaks include the tasks they ran
        _worker_stats(hosts, stats)
    finally:
        setup.tasks.workers = None
        hosts.close()
    stats["selected"] = budgets.budget
    stats["pruned"] = budgets.m - budgets.budget - budgets.n_drop
    stats["driver_peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    stats["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - clock.start, 3)}
    return stats


def _setup(cfg: JobConfig, store: Store, use_ray: bool, hook) -> Setup:
    cpus, worker_bytes = 1, float(cfg.select.worker_memory_mb or 0) * 2**20
    if use_ray:
        from ..runtime import init_ray, resources

        init_ray(cfg.ray)
        cluster = resources()
        cpus = max(1, int(cluster.cpus))
        worker_bytes = worker_bytes or cluster.memory_per_cpu  # a worker per CPU: its share of a node
    parts = graph_parts(store, cfg)
    return Setup(cfg, store, use_ray, Tasks(store, use_ray, hook), cpus, worker_bytes, parts,
                 sum(p.embedding.rows for p in parts))


def _plan(setup: Setup, out_dir: str) -> Planned:
    """The partitions (from per-cell counts when they depend on cells) and the shuffle's job."""
    cfg, s, n = setup.cfg, setup.cfg.select, setup.n
    partitions = resolve_partitions(cfg, n, setup.cpus, setup.worker_bytes)
    graph_dir = stage_dir(cfg.workdir, GRAPH)
    counts = None
    if partitions != 1 and n:
        pre = make_plan(cfg, setup.parts, None, 1, setup.cpus, s.workers)
        job0 = shuffle.ShuffleJob(setup.store, pre, graph_dir, s.score, cfg.graph.distance)
        per_group = setup.tasks.run("count_cells", shuffle.count_cells, [(job0, g) for g in range(pre.n_groups)])
        counts = np.zeros(max((len(c) for c in per_group), default=0), np.int64)
        for c in per_group:
            counts[: len(c)] += c
    pre = s.prefilter
    basic, exact, decon = bool(pre.basic), bool(pre.exact_duplicates), pre.decontaminate
    # the node records carry the pre-filters' codes only with one on: a plan of its own (each
    # pre-filter, and the decontamination's sets and threshold, in the key only when on, so a
    # config without them keeps its work directory)
    inputs = (setup.store.identity(s.score_file) if s.score_file else "") + ("+basic" if basic else "")
    if exact:
        inputs += "+exact"
    if decon is not None:
        inputs += "+eval:" + json.dumps(decon.model_dump(), sort_keys=True) + "".join(
            setup.store.identity(e.vectors) for e in decon.sets if e.vectors)
    plan = make_plan(cfg, setup.parts, counts, partitions, setup.cpus, s.workers, inputs)
    join_buckets = shuffle.join_bucket_count(n, setup.cpus) if s.score_file else 0
    job = shuffle.ShuffleJob(setup.store, plan, graph_dir, s.score, cfg.graph.distance, s.score_file, join_buckets,
                             basic or exact or decon is not None, codes=prefilter.COMBINED if exact or decon else
                             prefilter.BASIC, exact=exact,
                             eval_sets=eval_sets.sources(cfg, out_dir) if decon is not None else ())
    return Planned(plan, job, join_buckets)


def _basic_filter(setup: Setup, planned: Planned, clock: Clock) -> dict | None:
    """DataComp's basic filter: codes per part for the workers; its counts (None: off)."""
    if not setup.cfg.select.prefilter.basic:
        return None
    job, n_parts = planned.job, len(planned.plan.parts)
    setup.tasks.run("basic_filter", prefilter.filter_part, [(job, i) for i in range(n_parts)],
                    [prefilter.codes_url(job, i) for i in range(n_parts)])
    counts = prefilter.summary([setup.store.read_json(prefilter.counts_url(job, i)) for i in range(n_parts)])
    clock.lap("basic_filter")
    return counts


def _copies(setup: Setup, planned: Planned, clock: Clock) -> dict | None:
    """``select.prefilter.exact_duplicates`` and ``decontaminate`` (tasks, :mod:`.duplicates`,
    :mod:`.eval_sets`), then every pre-filter's first failed rule per part
    (:func:`.prefilter.combine_part`): their counts (None: both off)."""
    cfg, tasks = setup.cfg, setup.tasks
    pre = cfg.select.prefilter
    if not (pre.exact_duplicates or pre.decontaminate):
        return None
    job, n_parts = planned.job, len(planned.plan.parts)
    parts = range(n_parts)
    if pre.exact_duplicates:
        # a function of the plan alone (a resumed stage finds the same buckets)
        buckets = max(1, min(n_parts, math.ceil(setup.n / SHA256_BUCKET_ROWS)))
        tasks.run("sha256_map", duplicates.map_part, [(job, i, buckets, bool(pre.basic)) for i in parts],
                  [duplicates.map_url(job, i) for i in parts])
        tasks.run("sha256_groups", duplicates.find_duplicates, [(job, h) for h in range(buckets)],
                  [duplicates.dup_url(job, h) for h in range(buckets)])
        tasks.run("sha256_gather", duplicates.gather_part, [(job, i, buckets) for i in parts],
                  [duplicates.kept_url(job, i) for i in parts])
        clock.lap("exact_duplicates")
    threshold = None
    if pre.decontaminate is not None:
        threshold = pre.decontaminate.threshold
        sources = job.eval_sets
        embeds = [(cfg, setup.store, url, out) for s, src in zip(pre.decontaminate.sets, sources) if s.shards
                  for url, out in zip(expand_urls(s.shards), src.parts)]
        if embeds:
            tasks.run("eval_embed", eval_sets.embed_eval_shard, embeds, [e[3] for e in embeds])
            clock.lap("eval_embed")
        tasks.run("eval_search", eval_sets.search_part, [(job, i, sources, threshold) for i in parts],
                  [eval_sets.match_url(job, i) for i in parts])
        clock.lap("decontaminate")
    tasks.run("prefilter_combine", prefilter.combine_part, [(job, i, bool(pre.basic), threshold) for i in parts],
              [shuffle.basic_codes_url(job, i) for i in parts])
    counts = [setup.store.read_json(prefilter.combined_counts_url(job, i)) for i in parts]
    clock.lap("prefilter_combine")
    out: dict[str, Any] = {"dropped": sum(c["dropped"] for c in counts)}
    if pre.exact_duplicates:
        out["exact_duplicates"] = {"dropped": sum(c["exact_duplicate"] for c in counts),
                                   "sha256_unknown": sum(c["sha256_unknown"] for c in counts)}
    if pre.decontaminate is not None:
        out["decontaminate"] = {
            "threshold": threshold, "dropped": sum(c["eval_duplicate"] for c in counts),
            "dropped_by_set": {e.name: sum(c["eval_duplicate_by_set"][e.name] for c in counts) for e in sources},
            "matches": sum(c["eval_matches"] for c in counts)}
    return out


def _budgets(cfg: JobConfig, n: int, basic_stats: dict | None, copies: dict | None = None) -> Budgets:
    # the pool selected from: the samples that pass the pre-filters before β; the budget, the keep
    # rates and β are fractions of it (a sample a filter drops was never a candidate)
    if copies is not None:  # every pre-filter's first failed rule: the basic filter's drops included
        m = n - copies["dropped"]
    else:
        m = n - (basic_stats["dropped"] if basic_stats else 0)
    budget, rates = budgets_of(cfg, m)
    return Budgets(n, m, int(round(cfg.select.beta * m)), budget, rates)


def _join_score_file(setup: Setup, planned: Planned, clock: Clock) -> None:
    """``select.score_file``'s scores joined to the nodes by uid; every node must have one."""
    s, job, tasks = setup.cfg.select, planned.job, setup.tasks
    if not s.score_file:
        return
    chunks = shuffle.score_file_chunks(setup.store, s.score_file)
    tasks.run("score_file_map", shuffle.score_file_map, [(job, i, c) for i, c in enumerate(chunks)],
              [shuffle.join_file(job, "scorefile", i) for i in range(len(chunks))])
    groups = range(planned.plan.n_groups)
    tasks.run("uid_map", shuffle.uid_map, [(job, g) for g in groups], [shuffle.join_file(job, "uids", g) for g in groups])
    reports = tasks.run("join_scores", shuffle.join_scores, [(job, h, len(chunks)) for h in range(planned.join_buckets)])
    repeated = [u for r in reports for u in r["repeated_examples"]]
    if repeated:
        raise ValueError(f"select.score_file {s.score_file}: uids appear more than once, e.g. {repeated[:5]}")
    missing = sum(r["missing"] for r in reports)
    if missing:
        examples = [u for r in reports for u in r["missing_examples"]][:5]
        raise ValueError(f"select.score_file {s.score_file} has no {s.score!r} for {missing} of {setup.n} samples, "
                         f"e.g. uids {examples}")
    clock.lap("score_join")


def _shuffle(setup: Setup, planned: Planned, edges: bool) -> list[dict]:
    """Each partition's node records (and with ``edges`` its rows, both directions): the reports
    of the tasks that ran."""
    plan, job = planned.plan, planned.job
    if plan.direct:
        return []
    groups = range(plan.n_groups)
    last = "pending" if edges else "nodes"
    done = setup.tasks.run("map_group", shuffle.map_group, [(job, g, edges) for g in groups],
                           [job.path(f"{last}-{g:05d}.col") for g in groups])
    if edges:
        done += setup.tasks.run("reduce_group", shuffle.reduce_group, [(job, g) for g in groups],
                                [job.path(f"edges-b-{g:05d}.col") for g in groups])
    return [r for r in done if r is not None]


def _initial_stats(setup: Setup, planned: Planned, b: Budgets, shuffled: list[dict],
                   basic_stats: dict | None, copies: dict | None = None) -> dict[str, Any]:
    """The stats known before the workers start; refuses budgets the pool cannot serve."""
    s, plan = setup.cfg.select, planned.plan
    stats: dict[str, Any] = {
        "method": s.method, "n_nodes": b.n, "candidates": b.m, "budget": b.budget, "prune_rate": s.prune_rate,
        "keep_rates": {f"{r:g}": k for r, k in b.rates}, "ranked": 0,
        "prefilter_beta": s.beta, "prefiltered": b.n - b.m + b.n_drop, "prefiltered_beta": b.n_drop,
        "distance": setup.cfg.graph.distance,
        "gamma_forward": s.gamma_forward, "gamma_reverse": s.gamma_reverse, "forward_rounds": s.forward_rounds,
        "partitions": plan.n_partitions, "partitions_requested": s.partitions, "workers": plan.n_hosts,
        "partition_sizes": {"min": int(min(plan.partition_sizes)), "median": float(np.median(plan.partition_sizes)),
                            "max": int(max(plan.partition_sizes))},
        "range_groups": plan.n_groups, "used_ray": bool(setup.use_ray),
        "shuffle_bytes": sum(r["bytes"] for r in shuffled),
        "shuffle_task_peak_rss_mb": round(max((r["rss"] for r in shuffled), default=0) / 2**20, 1),
        "score_source": f"{s.score_file}:{s.score}" if s.score_file else f"embeddings:{s.score}",
    }
    if basic_stats is not None:
        stats["basic_filter"] = basic_stats
    for name in ("exact_duplicates", "decontaminate"):
        if copies is not None and name in copies:
            stats[name] = copies[name]
    if (basic_stats is not None or copies is not None) and b.budget == 0 and not b.rates:
        raise ConfigError(f"select.prune_rate={s.prune_rate} keeps round((1-p)*M) = 0 of the M={b.m} samples "
                          f"that pass the pre-filters (of {b.n})" if copies is not None else
                          f"select.prune_rate={s.prune_rate} keeps round((1-p)*M) = 0 of the M={b.m} samples "
                          f"that pass the basic filter (of {b.n})")
    if b.m - b.n_drop < b.b_max:
        raise ValueError(f"select.beta={s.beta} leaves {b.m - b.n_drop} samples, fewer than the budget {b.b_max}")
    return stats


def _start_hosts(setup: Setup, planned: Planned) -> Hosts:
    """The partition workers. A worker keeps its partitions resident up to its memory
    (select.worker_memory_mb, else its share of the node's on a cluster) and parks the others."""
    s, plan = setup.cfg.select, planned.plan
    per_worker = min(1.0, setup.cpus / plan.n_hosts) if setup.use_ray else 1.0
    settings = HostSettings(setup.cfg.seed, s.gamma_forward, s.gamma_reverse,
                            s.worker_memory_mb * 2**20 if s.worker_memory_mb
                            else (setup.worker_bytes * per_worker or None),
                            join(node_cache_root(), "select-spill", plan.work_dir.rsplit("/", 1)[-1]))
    return RayHosts(planned.job, settings, setup.cpus) if setup.use_ray else LocalHosts(planned.job, settings)


def _load(hosts: Hosts, edges: bool, b: Budgets, stats: dict) -> None:
    loaded = hosts.load(edges).values()
    passed = sum(v.passed for v in loaded)
    if passed != b.m:  # pragma: no cover - the workers read the codes the counts were made from
        raise RuntimeError(f"the partitions hold {passed} nodes that pass the basic filter, the parts' counts {b.m}")
    mins = [v.score_min for v in loaded if v.score_min is not None]
    stats["score_min"] = min(mins) if mins else None
    stats["score_max"] = max((v.score_max for v in loaded if v.score_max is not None), default=None)
    if edges:
        stats["forward_bytes"] = sum(hosts.send_scores().values())


def _prefilter(hosts: Hosts, cfg: JobConfig, b: Budgets, stats: dict) -> int:
    """The β pre-filter and the shift; the survivors counted."""
    last_kept = None
    if b.n_drop:
        last_kept = rank_key(hosts, PREFILTER, b.m - b.n_drop - 1, stats) if b.m > b.n_drop else (2**63 - 1, -1)
    kept = hosts.prefilter(last_kept).values()
    n_kept = sum(v.kept for v in kept)
    if n_kept != b.m - b.n_drop:  # pragma: no cover - the search is exact
        raise RuntimeError(f"pre-filter kept {n_kept} nodes, expected {b.m - b.n_drop}")
    if cfg.select.score_offset is None:
        mins = [v.min for v in kept if v.min is not None]
        offset = float(-min(mins)) if mins else 0.0
    else:
        offset = float(cfg.select.score_offset)
    negative = [v for v in hosts.shift(offset).values() if v is not None]
    if negative:
        worst = min(negative, key=lambda v: v.value)
        raise ConfigError(f"score of uid {worst.uid!r} (node {worst.node}) + select.score_offset {offset} = "
                          f"{worst.value!r} is negative; use a larger offset")
    stats["score_offset"] = offset
    return n_kept


def _merge(setup: Setup, planned: Planned, hosts: Hosts, b: Budgets, out_dir: str, stats: dict):
    """``selected.parquet`` and each partition's ranks from the runs of picks; the key of the
    budget's last pick."""
    plan = planned.plan
    runs_template = join(plan.work_dir, "run-{:05d}.col")
    hosts.write_run(runs_template)
    # the merge streams (its buffers: outputs.ROW_GROUP_ROWS rows at most): beside partitions small
    # enough it runs on a partition worker's process, sparing a fresh Ray worker's start and imports
    # (seconds: most of the merge's time below a few million nodes); beside larger ones it is a
    # task of its own, so that it adds nothing to the largest worker's peak
    per_host = np.bincount(np.asarray(plan.host_of, np.int64), weights=np.asarray(plan.partition_sizes, np.float64))
    merged = setup.tasks.run("merge_selection", outputs.merge_selection, [(
        setup.store, [runs_template.format(p) for p in range(plan.n_partitions)], join(out_dir, SELECTED),
        join(plan.work_dir, "ranks-{:05d}.bin"), b.b_max, b.budget)], cpus=0,
        on_workers=bool(per_host.max(initial=0) <= MERGE_ON_WORKER_MAX_NODES))[0]
    if merged["rows"] != b.b_max:  # pragma: no cover - the runs hold at least b_max picks
        raise RuntimeError(f"the merge ranked {merged['rows']} nodes, expected {b.b_max}")
    stats["ranked"] = merged["rows"]
    return merged["last"]


def _write_outputs(setup: Setup, planned: Planned, hosts: Hosts, b: Budgets, out_dir: str, decisions: bool,
                   stats: dict) -> None:
    """Each partition's nodes file, subset runs (and decision records); ``subset*.npy`` merged."""
    plan, store = planned.plan, setup.store
    rate_budgets = [(None, b.budget)] + list(b.rates)
    subset_runs = [join(plan.work_dir, f"subset{i}-" + "{:05d}.col") for i in range(len(rate_budgets))]
    written = hosts.write_outputs(join(plan.work_dir, "ranks-{:05d}.bin"),
                                  join(out_dir, NODES_DIR, "part-{:05d}.parquet"), subset_runs,
                                  [k for _, k in rate_budgets], decisions)
    if decisions:  # blamed nodes owned by another partition: their uids are looked up by range group
        stats["blame_requests"] = sum(v["blame_requests"] for v in written.values())
    n_bad = max((v["bad_uids"] for v in written.values()), default=0)
    subsets = [join(out_dir, subset_name(r)) for r, _ in rate_budgets]
    if n_bad:
        examples = [u for v in written.values() for u in v["bad_examples"]]
        stats["subset_file"] = None
        stats["subset_file_skipped"] = not_hex_message(n_bad, examples)
        log.warning("select: subset files not written: %s", stats["subset_file_skipped"])
        for url in subsets:
            store.rm(url)
        return
    setup.tasks.run("merge_subset", outputs.merge_subset,
                    [(store, [t.format(p) for p in range(plan.n_partitions)], url)
                     for t, url in zip(subset_runs, subsets)], cpus=0, on_workers=True)
    stats["subset_file"] = subsets[0]
    stats["subset_files"] = {f"{r:g}": u for (r, _), u in zip(b.rates, subsets[1:])}


def _worker_stats(hosts: Hosts, stats: dict) -> None:
    stats["worker_peak_rss_mb"] = round(hosts.peak_rss / 2**20, 1)
    stats["worker_spilled_mb"] = round(hosts.spilled_bytes / 2**20, 1)
    stats["worker_seconds"] = {k: round(v, 3) for k, v in hosts.seconds.items()}
    stats["worker_exchange_seconds"] = {k: round(v, 3) for k, v in hosts.exchange_seconds.items()}


def _decisions(setup: Setup, planned: Planned, out_dir: str, budget: int, stats: dict) -> None:
    """``decisions.parquet``: one row per input sample (tasks, :mod:`.decisions`)."""
    plan, job, tasks = planned.plan, planned.job, setup.tasks
    groups = range(plan.n_groups)
    if not all(setup.store.exists(decision_files.decisions_url(out_dir, p)) for p in plan.parts):
        tasks.run("resolve_blame", decision_files.resolve_blame, [(job, g) for g in groups],
                  [decision_files.blame_url(job, g) for g in groups], on_workers=True)
    reports = tasks.run("write_decisions", decision_files.write_decisions, [(job, g, out_dir, budget) for g in groups],
                        on_workers=True)
    stats["decisions"] = {k: sum(r["counts"][k] for r in reports) for k in reports[0]["counts"]}
    stats["decisions_without_skip_records"] = sum(r["without_skip_records"] for r in reports)
    if stats["decisions_without_skip_records"]:
        log.info("select: %d embedding parts have no skip records (written before the embed stage kept them): "
                 "decisions.parquet lists only their embedded samples", stats["decisions_without_skip_records"])


def check_size(cfg: JobConfig, n: int) -> None:
    """Refuse at stage start what cannot run: a selector above its size limit."""
    chosen = selector(cfg.select.method)
    if chosen.max_nodes is not None and n > chosen.max_nodes:
        small = [name for name, other in SELECTORS.items() if other.max_nodes is None]
        raise ConfigError(f"select.method {cfg.select.method!r} runs in one task and handles at most "
                          f"{chosen.max_nodes} samples; this pool has {n} (use {', '.join(small)})")


__all__ = ["Budgets", "budgets_of", "check_size", "compute"]
