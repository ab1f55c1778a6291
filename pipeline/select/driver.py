"""The select stage's driver: plans, runs the shuffle tasks, steps the partition workers through
the method, runs the output tasks. It holds O(partitions + parts + cells) numbers, never a node.

Steps (spec sections in brackets; the workers' side is :mod:`.hosts`):

1. plan [§7]: graph parts, per-cell counts (tasks), partitions of whole cells, workers;
   ``select.prefilter.basic``: DataComp's basic filter per embedding part (tasks, :mod:`.prefilter`);
   the M samples that pass are the pool: budget, keep rates and β are fractions of M;
2. ``select.score_file``: hash join by uid (tasks) [scores];
3. shuffle (tasks, :mod:`.shuffle`): each partition's rows, both directions; none for one partition;
4. workers load their partitions; boundary scores exchanged (the halo's raw scores);
5. pre-filter [§1]: the basic filter's drops, then the ``round(beta*M)`` lowest scores of the rest
   (ranking: score desc, id asc) found by a distributed rank search
   (:class:`pipeline.core.coreset.RankSearch`); the budget is from M;
6. shift [§3-4]: ``score_offset`` or minus the survivors' minimum (a reduction);
7. D2: forward rounds [§3]; the fixed-point shift from the partitions' maxima; reverse rounds
   [§4, §7] until the largest budget is settled (:class:`pipeline.core.d2_exact.ReverseRounds`,
   each partition's settle report folded into the next round's call); or a baseline's cuts;
8. outputs (tasks, :mod:`.outputs`): the merge writes ``selected.parquet`` and each partition's
   ranks; the final scores' exchange; the workers write ``nodes/part-*.parquet`` and sorted subset
   runs; merges write ``subset*.npy``;
9. decisions (tasks, :mod:`.decisions`): ``decisions.parquet``, one row per input sample.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from ..config import JobConfig
from ..core import coreset, d2
from ..core.d2_exact import ReverseRounds
from ..errors import ConfigError
from ..formats.selection import NODES_DIR, SELECTED, not_hex_message, subset_name
from ..runtime import peak_rss_bytes
from ..storage import Store, join, node_cache_root
from ..workdir import stage_dir
from . import decisions as decision_files
from . import outputs, prefilter, shuffle
from .hosts import HostSettings, LocalHosts, RayHosts
from .plan import graph_parts, make_plan, range_groups, resolve_partitions

log = logging.getLogger(__name__)

# Baselines that need every survivor's embedding in one process run in one Ray task, up to this
# many survivors (k-center's and moderate's float32 vectors: 2e6 x 768 x 4 B = 6 GB); above it the
# stage refuses at start (exit 2).
IN_TASK_MAX_NODES = 2_000_000
SEARCH_POINTS = 64


class Tasks:
    """Run stage tasks in this process or as Ray tasks, calling the part hook after each one
    commits; results in call order. A task takes one CPU, except while the partition workers hold
    the cluster's CPUs (``cpus=0``: the output tasks, which run while the workers wait)."""

    def __init__(self, use_ray: bool, hook: Callable[[int], None] | None = None):
        self.use_ray = use_ray
        self.hook = hook
        self.count = 0

    def run(self, fn, calls: list[tuple], cpus: float = 1) -> list:
        results: list = [None] * len(calls)
        if not self.use_ray:
            for i, args in enumerate(calls):
                results[i] = fn(*args)
                self._done()
            return results
        import ray

        from ..runtime import as_completed

        remote = ray.remote(num_cpus=cpus)(_indexed)
        refs = [remote.remote(fn, i, *args) for i, args in enumerate(calls)]
        for i, value in as_completed(refs):
            results[i] = value
            self._done()
        return results

    def _done(self) -> None:
        if self.hook is not None:
            self.hook(self.count)
        self.count += 1


def _indexed(fn, i, *args):
    return i, fn(*args)


def _search(hosts, kind, rank: int, stats: dict) -> tuple[int, int]:
    search = coreset.RankSearch(rank, SEARCH_POINTS)
    while not search.done:
        replies = list(hosts.call("search_samples", kind, search.after, search.upto, SEARCH_POINTS).values())
        queries = search.samples(replies)
        if queries is not None:
            search.counts(sum(hosts.call("search_counts", kind, queries).values()))
    hosts.call("drop_runs", kind)
    stats["search_steps"] = stats.get("search_steps", 0) + search.steps
    return search.key


def budgets_of(cfg: JobConfig, n: int) -> tuple[int, list[tuple[float, int]]]:
    """The configured budget and (rate, budget) of each extra keep rate."""
    return d2.budget_for(n, cfg.select.prune_rate), [(r, int(round(r * n))) for r in cfg.select.keep_rates]


def compute(cfg: JobConfig, store: Store, out_dir: str, use_ray: bool, hook=None,
            decisions: bool = True) -> dict[str, Any]:
    """Run the select stage's computation, writing its outputs into ``out_dir`` (with
    ``decisions``, ``decisions.parquet`` too); returns the stats."""
    s = cfg.select
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        log.info("select: %s done", name)
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock[0], 3)
        clock[0] = now

    cpus, worker_bytes = 1, float(s.worker_memory_mb or 0) * 2**20
    if use_ray:
        from ..runtime import init_ray, resources

        init_ray(cfg.ray)
        cluster = resources()
        cpus = max(1, int(cluster.cpus))
        worker_bytes = worker_bytes or cluster.memory_per_cpu  # a worker per CPU: its share of a node
    tasks = Tasks(use_ray, hook)
    parts = graph_parts(store, cfg)
    n = sum(p.embedding.rows for p in parts)
    partitions = resolve_partitions(cfg, n, cpus, worker_bytes)
    graph_dir = stage_dir(cfg.workdir, "graph")
    edges = s.method == "d2"

    # 1. plan: per-cell counts only when the partitions depend on cells
    counts = None
    if partitions != 1 and n:
        pre = make_plan(cfg, parts, None, 1, cpus, s.workers)
        job0 = shuffle.ShuffleJob(store, pre, graph_dir, s.score, cfg.graph.distance)
        per_group = tasks.run(shuffle.count_cells, [(job0, g) for g in range(pre.n_groups)])
        size = max((len(c) for c in per_group), default=0)
        counts = np.zeros(size, np.int64)
        for c in per_group:
            counts[: len(c)] += c
    basic = bool(s.prefilter.basic)
    # the node records carry the basic filter's codes only with it on: a plan of its own
    inputs = (store.identity(s.score_file) if s.score_file else "") + ("+basic" if basic else "")
    plan = make_plan(cfg, parts, counts, partitions, cpus, s.workers, inputs)
    join_buckets = shuffle.join_bucket_count(n, cpus) if s.score_file else 0
    job = shuffle.ShuffleJob(store, plan, graph_dir, s.score, cfg.graph.distance, s.score_file, join_buckets, basic)
    lap("plan")

    # 1b. DataComp's basic filter: codes per part for the workers, counts for the stats
    basic_stats = None
    if basic:
        _run_missing(tasks, store, prefilter.filter_part,
                     [(prefilter.codes_url(job, i), (job, i)) for i in range(len(plan.parts))])
        basic_stats = prefilter.summary([store.read_json(prefilter.counts_url(job, i))
                                         for i in range(len(plan.parts))])
        lap("basic_filter")
    # the pool selected from: the samples that pass the basic filter; the budget, the keep rates
    # and β are fractions of it (a sample the filter drops was never a candidate)
    m = n - (basic_stats["dropped"] if basic_stats else 0)

    # 2. score file
    if s.score_file:
        chunks = shuffle.score_file_chunks(store, s.score_file)
        _run_missing(tasks, store, shuffle.score_file_map,
                     [(job.path(f"scorefile-{i:05d}.col"), (job, i, c)) for i, c in enumerate(chunks)])
        _run_missing(tasks, store, shuffle.uid_map,
                     [(job.path(f"uids-{g:05d}.col"), (job, g)) for g in range(plan.n_groups)])
        reports = tasks.run(shuffle.join_scores, [(job, h, len(chunks)) for h in range(join_buckets)])
        repeated = [u for r in reports for u in r["repeated_examples"]]
        if repeated:
            raise ValueError(f"select.score_file {s.score_file}: uids appear more than once, e.g. {repeated[:5]}")
        missing = sum(r["missing"] for r in reports)
        if missing:
            examples = [u for r in reports for u in r["missing_examples"]][:5]
            raise ValueError(f"select.score_file {s.score_file} has no {s.score!r} for {missing} of {n} samples, "
                             f"e.g. uids {examples}")
        lap("score_join")

    # 3. shuffle
    shuffled = []
    if not plan.direct:
        last = "pending" if edges else "nodes"
        shuffled += _run_missing(tasks, store, shuffle.map_group,
                                 [(job.path(f"{last}-{g:05d}.col"), (job, g, edges)) for g in range(plan.n_groups)])
        if edges:
            shuffled += _run_missing(tasks, store, shuffle.reduce_group,
                                     [(job.path(f"edges-b-{g:05d}.col"), (job, g)) for g in range(plan.n_groups)])
    lap("shuffle")

    budget, rates = budgets_of(cfg, m)
    b_max = max([budget] + [b for _, b in rates])
    n_drop = int(round(s.beta * m))
    stats: dict[str, Any] = {
        "method": s.method, "n_nodes": n, "candidates": m, "budget": budget, "prune_rate": s.prune_rate,
        "keep_rates": {f"{r:g}": b for r, b in rates}, "ranked": 0,
        "prefilter_beta": s.beta, "prefiltered": n - m + n_drop, "prefiltered_beta": n_drop,
        "distance": cfg.graph.distance,
        "gamma_forward": s.gamma_forward, "gamma_reverse": s.gamma_reverse, "forward_rounds": s.forward_rounds,
        "partitions": plan.n_partitions, "partitions_requested": s.partitions, "workers": plan.n_hosts,
        "partition_sizes": {"min": int(min(plan.partition_sizes)), "median": float(np.median(plan.partition_sizes)),
                            "max": int(max(plan.partition_sizes))},
        "range_groups": plan.n_groups, "used_ray": bool(use_ray), "approximate": bool(s.approximate),
        "shuffle_bytes": sum(r["bytes"] for r in shuffled),
        "shuffle_task_peak_rss_mb": round(max((r["rss"] for r in shuffled), default=0) / 2**20, 1),
        "score_source": f"{s.score_file}:{s.score}" if s.score_file else f"embeddings:{s.score}",
    }
    if basic_stats is not None:
        stats["basic_filter"] = basic_stats
        if budget == 0 and not rates:
            raise ConfigError(f"select.prune_rate={s.prune_rate} keeps round((1-p)*M) = 0 of the M={m} samples that "
                              f"pass the basic filter (of {n})")
    if m - n_drop < budget or m - n_drop < b_max:
        raise ValueError(f"select.beta={s.beta} leaves {m - n_drop} samples, fewer than the budget {b_max}")

    # a worker keeps its partitions resident up to its memory (select.worker_memory_mb, else its
    # share of the node's on a cluster) and parks the others
    per_worker = min(1.0, cpus / plan.n_hosts) if use_ray else 1.0
    settings = HostSettings(cfg.seed, s.gamma_forward, s.gamma_reverse,
                            s.worker_memory_mb * 2**20 if s.worker_memory_mb else (worker_bytes * per_worker or None),
                            join(node_cache_root(), "select-spill", plan.work_dir.rsplit("/", 1)[-1]))
    hosts = RayHosts(job, settings, cpus) if use_ray else LocalHosts(job, settings)
    try:
        # 4. load
        loaded = hosts.call("load", edges)
        passed = sum(v["passed"] for v in loaded.values())
        if passed != m:  # pragma: no cover - the workers read the codes the counts were made from
            raise RuntimeError(f"the partitions hold {passed} nodes that pass the basic filter, the parts' counts {m}")
        mins = [v["score_min"] for v in loaded.values() if v["score_min"] is not None]
        stats["score_min"] = min(mins) if mins else None
        stats["score_max"] = max((v["score_max"] for v in loaded.values() if v["score_max"] is not None), default=None)
        if edges:
            stats["forward_bytes"] = sum(hosts.call("send_scores").values())
        lap("load")

        # 5-6. pre-filter, shift
        last_kept = None
        if n_drop:
            last_kept = _search(hosts, "prefilter", m - n_drop - 1, stats) if m > n_drop else (2**63 - 1, -1)
        kept = hosts.call("prefilter", last_kept)
        n_kept = sum(v["kept"] for v in kept.values())
        if n_kept != m - n_drop:  # pragma: no cover - the search is exact
            raise RuntimeError(f"pre-filter kept {n_kept} nodes, expected {m - n_drop}")
        if s.score_offset is None:
            mins = [v["min"] for v in kept.values() if v["min"] is not None]
            offset = float(-min(mins)) if mins else 0.0
        else:
            offset = float(s.score_offset)
        negative = [v["negative"] for v in hosts.call("shift", offset).values() if v["negative"]]
        if negative:
            worst = min(negative, key=lambda v: v["value"])
            raise ConfigError(f"score of uid {worst['uid']!r} (node {worst['node']}) + select.score_offset {offset} = "
                              f"{worst['value']!r} is negative; use a larger offset")
        stats["score_offset"] = offset
        lap("prefilter")

        # 7. the method
        runs_template = join(plan.work_dir, "run-{:05d}.col")
        d2_scores = False
        if edges:
            d2_scores = True
            shift_bits = _d2(hosts, cfg, plan, stats, b_max, budget, n_kept, lap)
        else:
            _baseline(hosts, cfg, plan, job, tasks, stats, budget, n_kept)
        lap(s.method)

        # 8. outputs
        hosts.call("write_run", runs_template)
        merged = tasks.run(outputs.merge_selection, [(
            store, [runs_template.format(p) for p in range(plan.n_partitions)], join(out_dir, SELECTED),
            join(plan.work_dir, "ranks-{:05d}.bin"), b_max, budget, bool(s.approximate))], cpus=0)[0]
        if merged["rows"] != b_max:  # pragma: no cover - the runs hold at least b_max picks
            raise RuntimeError(f"the merge ranked {merged['rows']} nodes, expected {b_max}")
        stats["ranked"] = merged["rows"]
        if edges and not s.approximate and stats.get("rounds"):  # else _d2 has settled the final scores
            if budget:
                stats["final_bytes"] = sum(hosts.call("finish_send", merged["last"]).values())
                stats["blamed"] = sum(hosts.call("finish_receive", shift_bits).values())
            else:  # budget 0, ranked only for larger keep rates
                hosts.call("no_reverse")
        lap("final_scores")
        rate_budgets = [(None, budget)] + list(rates)
        subset_runs = [join(plan.work_dir, f"subset{i}-" + "{:05d}.col") for i in range(len(rate_budgets))]
        written = hosts.call("write_outputs", join(plan.work_dir, "ranks-{:05d}.bin"),
                             join(out_dir, NODES_DIR, "part-{:05d}.parquet"), subset_runs,
                             [b for _, b in rate_budgets], d2_scores, decisions)
        n_bad = max((v["bad_uids"] for v in written.values()), default=0)
        subsets = [join(out_dir, subset_name(r)) for r, _ in rate_budgets]
        if n_bad:
            examples = [u for v in written.values() for u in v["bad_examples"]]
            stats["subset_file"] = None
            stats["subset_file_skipped"] = not_hex_message(n_bad, examples)
            log.warning("select: subset files not written: %s", stats["subset_file_skipped"])
            for url in subsets:
                store.rm(url)
        else:
            tasks.run(outputs.merge_subset, [(store, [t.format(p) for p in range(plan.n_partitions)], url)
                                             for t, url in zip(subset_runs, subsets)], cpus=0)
            stats["subset_file"] = subsets[0]
            stats["subset_files"] = {f"{r:g}": u for (r, _), u in zip(rates, subsets[1:])}
        lap("outputs")
        stats["worker_peak_rss_mb"] = round(hosts.peak_rss / 2**20, 1)
        stats["worker_spilled_mb"] = round(hosts.spilled_bytes / 2**20, 1)
        stats["worker_seconds"] = {k: round(v, 3) for k, v in hosts.seconds.items()}
        stats["worker_exchange_seconds"] = {k: round(v, 3) for k, v in hosts.exchange_seconds.items()}
    finally:
        hosts.close()

    # 9. decisions: one row per input sample (tasks, :mod:`.decisions`), once the workers are gone
    if decisions and plan.n_groups:
        if not all(store.exists(decision_files.decisions_url(out_dir, p)) for p in plan.parts):
            _run_missing(tasks, store, decision_files.resolve_blame,
                         [(decision_files.blame_url(job, g), (job, g)) for g in range(plan.n_groups)])
        reports = tasks.run(decision_files.write_decisions, [(job, g, out_dir, budget) for g in range(plan.n_groups)])
        stats["decisions"] = {k: sum(r["counts"][k] for r in reports) for k in reports[0]["counts"]}
        stats["decisions_without_skip_records"] = sum(r["without_skip_records"] for r in reports)
        if stats["decisions_without_skip_records"]:
            log.info("select: %d embedding parts have no skip records (written before the embed stage kept them): "
                     "decisions.parquet lists only their embedded samples", stats["decisions_without_skip_records"])
        lap("decisions")
    stats["selected"] = budget
    stats["pruned"] = m - budget - n_drop
    stats["driver_peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 3)
    stats["seconds"] = seconds
    return stats


def _run_missing(tasks: Tasks, store: Store, fn, items: list[tuple[str, tuple]]) -> list:
    """Run ``fn(*args)`` for the items whose output file (the last one the task writes) is not
    committed yet: a resumed stage redoes only unfinished tasks. Their results."""
    todo = [args for url, args in items if not store.exists(url)]
    return tasks.run(fn, todo)


def _d2(hosts, cfg: JobConfig, plan, stats: dict, b_max: int, budget: int, n_kept: int, lap) -> int:
    """Forward and reverse rounds; leaves each partition's run of picks. Returns the fixed-point shift."""
    s = cfg.select
    built = hosts.call("build", stats["score_offset"])
    entries = sum(v["entries"] for v in built.values())
    stats["graph_edges"] = entries // 2
    stats["cross_partition_edge_fraction"] = (sum(v["cross_entries"] for v in built.values()) / entries
                                              if entries else 0.0)
    stats["halo_nodes"] = sum(v["halo"] for v in built.values())
    lap("build")
    fwd_bytes = 0
    for r in range(1, s.forward_rounds + 1):
        fwd_bytes += sum(hosts.call("forward_round", r).values())
    top = max(hosts.call("forward_done", s.forward_rounds).values(), default=0.0)
    stats["forward_bytes"] = stats.get("forward_bytes", 0) + fwd_bytes
    lap("forward")
    shift = d2.fixed_point_shift(top)
    stats["shift"] = shift
    if n_kept == 0 or b_max == 0:
        hosts.call("no_reverse")
        for key in ("rounds", "exact_rounds"):
            stats[key] = 0
        return shift
    if s.approximate:
        sizes = np.zeros(plan.n_partitions, np.int64)
        for p, v in built.items():
            sizes[p] = v["nodes"]
        shares = coreset.approximate_budgets(sizes, budget, s.budget_mode, cfg.graph.k)
        hosts.call("approximate_picks", {p: int(b) for p, b in enumerate(shares)})
        stats["budget_mode"] = s.budget_mode
        stats["rank_order"] = "partitions merged by pick score (desc), ties by partition id then partition order"
        if n_kept <= s.exact_check_max_n:
            _reverse_rounds(hosts, stats, budget, n_kept, shift)
            last = _search(hosts, "picks", budget - 1, stats) if budget else None
            common = sum(hosts.call("overlap", last).values()) if budget else 0
            stats["overlap_with_exact"] = common / budget if budget else 1.0
        else:
            stats["overlap_with_exact"] = None
            stats["overlap_skipped"] = f"{n_kept} nodes > select.exact_check_max_n={s.exact_check_max_n}"
        hosts.call("use_approximate")
        return shift
    _reverse_rounds(hosts, stats, b_max, n_kept, shift)
    stats["overlap_with_exact"] = 1.0
    stats["rank_order"] = "greedy order"
    return shift


def _reverse_rounds(hosts, stats: dict, b_max: int, n_kept: int, shift: int) -> None:
    """Reverse rounds until ``b_max`` picks are settled; then each partition's run of picks."""
    hosts.call("start_reverse", shift)
    book = ReverseRounds(b_max, ReverseRounds.safety_stop(n_kept))
    rounds: dict[str, list] = {k: [] for k in ("picks", "messages", "bytes", "seconds", "step_seconds",
                                               "exchange_seconds")}
    settle, threshold, limit, rnd = False, None, b_max, 0
    while True:
        book.start_round()
        rnd += 1
        t0 = time.perf_counter()
        res = hosts.call("reverse_round", rnd, settle, threshold, limit, book.remaining, book.dead_level)
        if settle and book.settle([v["settle"] for v in res.values()]):
            break
        rounds["picks"].append(sum(v["picks"] for v in res.values()))
        rounds["messages"].append(sum(v["messages"] for v in res.values()))
        rounds["bytes"].append(sum(v["bytes"] for v in res.values()))
        rounds["step_seconds"].append(round(max(v["step_seconds"] for v in res.values()), 4))
        rounds["exchange_seconds"].append(round(max(r["exchange_seconds"] for r in hosts.last), 4))
        rounds["seconds"].append(round(time.perf_counter() - t0, 4))
        settle, threshold, limit = True, ReverseRounds.threshold([v["best"] for v in res.values()]), book.remaining
    summary = hosts.call("reverse_summary")
    late = sum(v["late"] for v in summary.values())
    if late:  # pragma: no cover - would mean the protocol is wrong
        raise RuntimeError(f"{late} suppression messages arrived for picked nodes")
    stats.update({
        "rounds": len(rounds["picks"]), "picks_per_round": rounds["picks"],
        "settled_per_round": book.settled_per_round, "messages_per_round": rounds["messages"],
        "bytes_per_round": rounds["bytes"], "seconds_per_round": rounds["seconds"],
        "compute_seconds_per_round": rounds["step_seconds"], "exchange_seconds_per_round": rounds["exchange_seconds"],
        "bytes_exchanged": int(sum(rounds["bytes"])),
        "total_picks": sum(v["picks"] for v in summary.values()),
        "total_parks": sum(v["parks"] for v in summary.values()),
        "total_rechecks": sum(v["rechecks"] for v in summary.values()),
    })
    hosts.call("exact_picks", threshold, b_max, shift)


def _baseline(hosts, cfg: JobConfig, plan, job, tasks: Tasks, stats: dict, budget: int, n_kept: int) -> None:
    """A baseline's selection as each partition's run of picks (module docstring of .hosts)."""
    s = cfg.select
    method = s.method
    if method in ("score_topk", "random"):
        kind = "topk" if method == "score_topk" else "random"
        last = _search(hosts, kind, budget - 1, stats) if budget else None
        hosts.call("cut_picks", kind, last)
    elif method == "ccs":
        lo_hi = hosts.call("ccs_range")
        los = [v[0] for v in lo_hi.values() if v is not None]
        his = [v[1] for v in lo_hi.values() if v is not None]
        strata = s.ccs_strata
        counts = sum(hosts.call("ccs_strata", min(los) if los else 0.0, max(his) if his else 0.0, strata).values())
        counts = np.asarray(counts, np.int64).reshape(-1) if n_kept else np.zeros(strata, np.int64)
        from ..core.selectors import balanced_budgets

        nonempty = np.flatnonzero(counts)
        shares = balanced_budgets(counts[nonempty], budget, mode="uniform")
        for stratum, share in zip(nonempty, shares):
            if share:
                last = _search(hosts, ("ccs", int(stratum)), int(share) - 1, stats)
                hosts.call("cut_picks", ("ccs", int(stratum)), last)
        stats["ccs_strata"] = strata
    else:  # moderate, kcenter: one task with every survivor's vector
        template = join(plan.work_dir, "survivors-{:05d}.col")
        hosts.call("survivors_file", template)
        url = join(plan.work_dir, "single-run.col")
        tasks.run(single_task_baseline, [(job, cfg.graph.vector, method, budget, cfg.seed,
                                          [template.format(p) for p in range(plan.n_partitions)], url)], cpus=0)
        hosts.call("adopt_picks", url)
        return
    hosts.call("baseline_picks", method)


def single_task_baseline(job, vector: str, method: str, budget: int, seed: int, survivor_urls: list[str],
                         url: str) -> int:
    """moderate / k-center on every survivor's graph vector, in one task (IN_TASK_MAX_NODES)."""
    from ..core import selectors
    from ..formats.embeddings import read_vectors_at
    from ..formats.shuffle import read_buckets

    got = read_buckets(job.store, survivor_urls, 0, ["node", "owner"])
    order = np.argsort(got["node"], kind="stable")
    nodes, owners = got["node"][order], got["owner"][order]
    vectors = read_vectors_at(job.store, [p.embedding for p in job.plan.parts], vector, nodes)
    if method == "moderate":
        picked = np.asarray(selectors.moderate_select(vectors, budget), np.int64)
    else:
        picked = np.asarray(selectors.kcenter_greedy(vectors, budget, seed), np.int64)
    outputs.write_single_run(job.store, url, nodes[picked], owners[picked])
    return int(picked.size)


def check_size(cfg: JobConfig, n: int) -> None:
    """Refuse at stage start what cannot run: a one-task baseline above its size limit."""
    if cfg.select.method in ("moderate", "kcenter") and n > IN_TASK_MAX_NODES:
        raise ConfigError(f"select.method {cfg.select.method!r} runs in one task and handles at most "
                          f"{IN_TASK_MAX_NODES} samples; this pool has {n} (use d2, score_topk, random or ccs)")


__all__ = ["IN_TASK_MAX_NODES", "budgets_of", "check_size", "compute", "range_groups"]
