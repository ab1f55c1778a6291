"""``select.method: d2``: the exact partitioned D2 greedy, the same selection, order and scores as
:func:`pipeline.core.d2.d2_select` on the whole graph (its in-memory form).

The driver's side of the protocol (each partition's side is :mod:`pipeline.select.phases` and
:class:`pipeline.core.d2_exact.PartitionState`): build each partition's state on the survivors'
rows; forward rounds; the fixed-point shift from the partitions' maxima; reverse rounds until the
largest budget is settled (:class:`pipeline.core.d2_exact.ReverseRounds`, each partition's settle
report folded into the next round's call); each partition's picks above the last threshold. After
the merge, the final scores and blame (:meth:`D2.finish`).
"""

from __future__ import annotations

import time

from ...core import d2
from ...core.d2_exact import ReverseRounds
from .base import Selector

ROUND_SERIES = ("picks", "messages", "bytes", "seconds", "step_seconds", "exchange_seconds")


class D2(Selector):
    name = "d2"
    uses_graph = True
    in_memory = staticmethod(d2.d2_select)

    def pick(self, run) -> None:
        _build(run)
        shift = _forward(run)
        run.shift = shift
        if run.n_kept == 0 or run.b_max == 0:
            run.hosts.no_reverse()
            for key in ("rounds", "exact_rounds"):
                run.stats[key] = 0
            return
        threshold = _reverse_rounds(run, shift)
        run.hosts.exact_picks(threshold, run.b_max, shift)
        run.stats["overlap_with_exact"] = 1.0
        run.stats["rank_order"] = "greedy order"

    def finish(self, run, last) -> None:
        if not run.stats.get("rounds"):  # no reverse rounds: pick has settled the final scores
            return
        if run.budget:
            run.stats["final_bytes"] = sum(run.hosts.finish_send(last).values())
            run.stats["blamed"] = sum(run.hosts.finish_receive(run.shift).values())
        else:  # budget 0, ranked only for larger keep rates
            run.hosts.no_reverse()


def _build(run) -> None:
    built = run.hosts.build(run.stats["score_offset"])
    entries = sum(v.entries for v in built.values())
    run.stats["graph_edges"] = entries // 2
    run.stats["cross_partition_edge_fraction"] = (sum(v.cross_entries for v in built.values()) / entries
                                                  if entries else 0.0)
    run.stats["halo_nodes"] = sum(v.halo for v in built.values())
    run.lap("build")


def _forward(run) -> int:
    """Forward rounds; the fixed-point shift of the reverse pass."""
    rounds = run.cfg.select.forward_rounds
    sent = 0
    for r in range(1, rounds + 1):
        sent += sum(run.hosts.forward_round(r).values())
    top = max(run.hosts.forward_done(rounds).values(), default=0.0)
    run.stats["forward_bytes"] = run.stats.get("forward_bytes", 0) + sent
    run.lap("forward")
    shift = d2.fixed_point_shift(top)
    run.stats["shift"] = shift
    return shift


def _reverse_rounds(run, shift: int):
    """Reverse rounds until ``b_max`` picks are settled; the last threshold."""
    hosts = run.hosts
    hosts.start_reverse(shift)
    book = ReverseRounds(run.b_max, ReverseRounds.safety_stop(run.n_kept))
    rounds: dict[str, list] = {k: [] for k in ROUND_SERIES}
    settle, threshold, limit, rnd = False, None, run.b_max, 0
    while True:
        book.start_round()
        rnd += 1
        t0 = time.perf_counter()
        res = list(hosts.reverse_round(rnd, settle, threshold, limit, book.remaining, book.dead_level).values())
        if settle and book.settle([v.settle for v in res]):
            break
        rounds["picks"].append(sum(v.picks for v in res))
        rounds["messages"].append(sum(v.messages for v in res))
        rounds["bytes"].append(sum(v.bytes for v in res))
        rounds["step_seconds"].append(round(max(v.step_seconds for v in res), 4))
        rounds["exchange_seconds"].append(round(max(r.exchange_seconds for r in hosts.last), 4))
        rounds["seconds"].append(round(time.perf_counter() - t0, 4))
        settle, threshold, limit = True, ReverseRounds.threshold([v.best for v in res]), book.remaining
    _round_stats(run, rounds, book)
    return threshold


def _round_stats(run, rounds: dict[str, list], book: ReverseRounds) -> None:
    summary = list(run.hosts.reverse_summary().values())
    late = sum(v.late for v in summary)
    if late:  # pragma: no cover - would mean the protocol is wrong
        raise RuntimeError(f"{late} suppression messages arrived for picked nodes")
    run.stats.update({
        "rounds": len(rounds["picks"]), "picks_per_round": rounds["picks"],
        "settled_per_round": book.settled_per_round, "messages_per_round": rounds["messages"],
        "bytes_per_round": rounds["bytes"], "seconds_per_round": rounds["seconds"],
        "compute_seconds_per_round": rounds["step_seconds"], "exchange_seconds_per_round": rounds["exchange_seconds"],
        "bytes_exchanged": int(sum(rounds["bytes"])),
        "total_picks": sum(v.picks for v in summary),
        "total_parks": sum(v.parks for v in summary),
        "total_rechecks": sum(v.rechecks for v in summary),
    })
