"""D2 core speed and memory: symmetrize_knn, forward_pass, reverse_select on random kNN graphs.

For N <= --dense-max-n (20,000) it also runs the method of the published D2 code re-implemented
here (dense N×N distance and weight matrices, forward pass as a dense mat-vec, one argmax over
all N per selected node) on the same graph and checks that both select the same set in the same
order.

Each size runs in its own subprocess so that the peak resident memory (ru_maxrss) it reports is
that size's own peak, input arrays included. Compiled kernels are warmed up on a small graph
before timing; the warm-up (a numba cache load) and a cold compile (empty cache directory) are
reported separately.

Usage:
    python benchmarks/d2_speed.py                 # N = 1e4, 2e4, 1e5, 1e6
    python benchmarks/d2_speed.py --full          # ... and 1e7 (DataComp small is 1.28e7)
    python benchmarks/d2_speed.py --quick         # N = 5e3, 1e4, 1e5, dense <= 1e4, no cold
                                                  # compile: well under a minute
    python benchmarks/d2_speed.py --json out.json --md out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_SIZES = [10_000, 20_000, 100_000, 1_000_000]
FULL_SIZES = DEFAULT_SIZES + [10_000_000]
QUICK_SIZES = [5_000, 10_000, 100_000]  # dense method at <= 10,000 only

TARGET_REVERSE_1E6_S = 2.0
TARGET_FULL_1E7_S = 60.0
TARGET_FULL_1E7_PEAK_GB = 6.0
TARGET_DENSE_SPEEDUP = 100.0


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_knn_graph(n: int, k: int, seed: int):
    """Directed kNN lists with uniformly random neighbours (no self), float32 distances in [0, 2).

    Uniform neighbours are the worst case for memory locality (a real kNN graph links nearby ids
    far less randomly). Built in place so that at N = 1e7 only the two input arrays
    (N·k int64 + N·k float32 = 1.2 GB) exist.
    """
    rng = np.random.default_rng(seed)
    neighbors = rng.integers(0, n - 1, size=(n, k), dtype=np.int64)
    # Draw from n-1 ids and skip over the node itself: never a self edge.
    step = 1_000_000
    for lo in range(0, n, step):
        block = neighbors[lo : lo + step]
        block += block >= np.arange(lo, lo + block.shape[0], dtype=np.int64)[:, None]
    distances = rng.random((n, k), dtype=np.float32)
    distances *= 2.0  # 2 - 2cos range of unit vectors
    scores = rng.random(n)
    return neighbors, distances, scores


def dense_published_method(graph, scores, budget, gamma_forward, gamma_reverse):
    """The published code's O(N²)-memory method on the same graph: dense distance matrix (inf off
    the graph), dense weights, forward pass as W @ s, then per step an argmax over all N and a
    full-row update. Returns (order, forward_scores, timings)."""
    from pipeline.core import d2  # noqa: F401  (same process; the graph came from it)

    n = graph.n_nodes
    t0 = time.perf_counter()
    dist = np.full((n, n), np.inf, dtype=np.float32)
    rows = np.repeat(np.arange(n), graph.degrees)
    dist[rows, graph.indices] = graph.distances
    del rows
    weights = np.empty((n, n), dtype=np.float64)
    block = 1024  # row blocks: no N×N float64 temporary besides the weights themselves

    def fill_weights(gamma):
        for lo in range(0, n, block):
            np.exp(-gamma * dist[lo : lo + block].astype(np.float64), out=weights[lo : lo + block])

    fill_weights(gamma_forward)
    t1 = time.perf_counter()
    forward = scores + weights @ scores
    t2 = time.perf_counter()
    if gamma_reverse != gamma_forward:
        fill_weights(gamma_reverse)
    del dist
    current = forward.copy()
    order = np.empty(budget, dtype=np.int64)
    for t in range(budget):
        top = int(np.argmax(current))  # first maximum = lowest id
        order[t] = top
        top_score = current[top]
        current -= weights[top] * top_score
        current[top] = -np.inf  # selected: never picked or updated again
    t3 = time.perf_counter()
    return order, forward, {"dense_build_s": t1 - t0, "dense_forward_s": t2 - t1, "dense_reverse_s": t3 - t2}


def run_one(
    n: int, k: int, seed: int, dense_max_n: int, gamma_forward: float, gamma_reverse: float, repeats: int
) -> dict:
    """Benchmark one size in this process (called in a subprocess by main)."""
    t = time.perf_counter()
    from pipeline.core import d2

    import_s = time.perf_counter() - t

    # Warm-up: loads (or compiles) every kernel on a small graph; not part of the timings.
    t = time.perf_counter()
    wn, wd, ws = random_knn_graph(1000, k, seed + 1)
    wg = d2.symmetrize_knn(wn, wd)
    d2.d2_select(wg, ws, 300, gamma_forward, gamma_reverse)
    d2.subgraph(wg, np.arange(10))
    warmup_s = time.perf_counter() - t
    rss_after_warmup = peak_rss_bytes()

    t = time.perf_counter()
    neighbors, distances, scores = random_knn_graph(n, k, seed)
    generate_s = time.perf_counter() - t
    budget = d2.budget_for(n, 0.7)

    # Best of `repeats` runs: the machine is shared, and the minimum is the least disturbed run.
    # Wall-clock and process CPU time are both kept: the kernels are single-threaded, so CPU
    # time is what the work costs on one core even when other jobs share the machine.
    wall = {"symmetrize": float("inf"), "forward": float("inf"), "reverse": float("inf")}
    cpu = dict(wall)

    def timed(phase, fn, *a):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a)
        wall[phase] = min(wall[phase], time.perf_counter() - t)
        cpu[phase] = min(cpu[phase], time.process_time() - c)
        return out

    for _ in range(repeats):
        graph = None  # free the previous graph first: peak memory stays that of one run
        graph = timed("symmetrize", d2.symmetrize_knn, neighbors, distances)
        forward = timed("forward", d2.forward_pass, graph, scores, gamma_forward)
        selection = timed("reverse", d2.reverse_select, graph, forward, budget, gamma_reverse)
    symmetrize_s, forward_s, reverse_s = wall["symmetrize"], wall["forward"], wall["reverse"]

    result = {
        "n": n,
        "k": k,
        "repeats": repeats,
        "budget": budget,
        "undirected_edges": graph.n_edges,
        "mean_degree": graph.n_entries / n,
        "graph_mb": graph.nbytes / 2**20,
        "input_mb": (neighbors.nbytes + distances.nbytes) / 2**20,
        "generate_s": generate_s,
        "symmetrize_s": symmetrize_s,
        "forward_s": forward_s,
        "reverse_s": reverse_s,
        "total_s": symmetrize_s + forward_s + reverse_s,
        "symmetrize_cpu_s": cpu["symmetrize"],
        "forward_cpu_s": cpu["forward"],
        "reverse_cpu_s": cpu["reverse"],
        "total_cpu_s": sum(cpu.values()),
        "reverse_heap_ops_per_s": (n + budget * graph.n_entries / n) / reverse_s,
        "selected": int(len(selection)),
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "rss_after_warmup_mb": rss_after_warmup / 2**20,
        "import_s": import_s,
        "warmup_s": warmup_s,
    }
    if n <= dense_max_n:
        del neighbors, distances
        order, dense_forward, timings = dense_published_method(
            graph, scores, budget, gamma_forward, gamma_reverse
        )
        result.update(timings)
        dense_total = sum(timings.values())
        result["dense_total_s"] = dense_total
        result["identical_order"] = bool(np.array_equal(order, selection.order))
        result["identical_set"] = bool(np.array_equal(np.sort(order), np.sort(selection.order)))
        result["forward_max_rel_diff"] = float(
            np.max(np.abs(dense_forward - forward) / np.maximum(np.abs(forward), 1e-300))
        )
        result["speedup_total"] = dense_total / result["total_s"]
        result["speedup_select"] = (timings["dense_forward_s"] + timings["dense_reverse_s"]) / (
            forward_s + reverse_s
        )
        result["peak_rss_with_dense_mb"] = peak_rss_bytes() / 2**20
    return result


def cold_compile_seconds(k: int) -> float:
    """Time of importing and compiling every kernel with an empty numba cache (fresh checkout)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run(
            [sys.executable, __file__, "--_warmup-only", "--k", str(k)],
            env=env, check=True, capture_output=True, text=True,
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1])["warmup_s"])


def machine_description() -> str:
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = f", {mem_gb:.0f} GiB RAM" if mem_gb else ""
    return (
        f"{os.cpu_count()}-core {platform.machine()} VM ({cpu}){mem}, CPU only (no GPU), "
        f"Python {platform.python_version()}"
    )


def fmt_table(rows: list[dict]) -> str:
    head = (
        "| N | B | edges | symmetrize s | forward s | reverse s | total s (CPU s) | peak RSS MB "
        "| dense s (build+fwd+rev) | speedup total / select | same set & order |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        dense = "–"
        speed = "–"
        same = "–"
        if "dense_total_s" in r:
            dense = (
                f"{r['dense_total_s']:.2f} ({r['dense_build_s']:.2f}+{r['dense_forward_s']:.2f}"
                f"+{r['dense_reverse_s']:.2f})"
            )
            speed = f"{r['speedup_total']:.0f}× / {r['speedup_select']:.0f}×"
            same = "yes" if (r["identical_set"] and r["identical_order"]) else "NO"
        peak = r.get("peak_rss_with_dense_mb", r["peak_rss_mb"])
        lines.append(
            f"| {r['n']:,} | {r['budget']:,} | {r['undirected_edges']:,} | {r['symmetrize_s']:.3f} "
            f"| {r['forward_s']:.3f} | {r['reverse_s']:.3f} | {r['total_s']:.3f} ({r['total_cpu_s']:.3f}) | {peak:,.0f} "
            f"| {dense} | {speed} | {same} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["n"] == 1_000_000:
            ok = r["reverse_s"] < TARGET_REVERSE_1E6_S
            out.append(
                f"{'PASS' if ok else 'FAIL'}: reverse_select N=1e6 k={r['k']} B={r['budget']:,} "
                f"{r['reverse_s']:.2f} s wall, {r['reverse_cpu_s']:.2f} s CPU "
                f"(target < {TARGET_REVERSE_1E6_S} s, one core)"
            )
        if r["n"] == 10_000_000:
            peak_gb = r["peak_rss_mb"] / 1024
            ok = r["total_s"] < TARGET_FULL_1E7_S and peak_gb < TARGET_FULL_1E7_PEAK_GB
            out.append(
                f"{'PASS' if ok else 'FAIL'}: N=1e7 end to end {r['total_s']:.1f} s wall, "
                f"{r['total_cpu_s']:.1f} s CPU (target < {TARGET_FULL_1E7_S:.0f} s), "
                f"peak RSS {peak_gb:.2f} GB incl. inputs "
                f"(target < {TARGET_FULL_1E7_PEAK_GB:.0f} GB)"
            )
        if r["n"] == 20_000 and "dense_total_s" in r:
            same = r["identical_set"] and r["identical_order"]
            ok = r["speedup_total"] >= TARGET_DENSE_SPEEDUP and same
            out.append(
                f"{'PASS' if ok else 'FAIL'}: N=20,000 {r['speedup_total']:.0f}× faster than the dense "
                f"method end to end ({r['speedup_select']:.0f}× on forward+reverse alone), "
                f"identical set and order: {same} (target >= {TARGET_DENSE_SPEEDUP:.0f}×)"
            )
    return out


def to_markdown(report: dict) -> str:
    lines = [
        "# D2 core speed (`benchmarks/d2_speed.py`)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Graph: uniformly random directed kNN lists, k = {report['k']}, symmetrised; "
        f"B = 30% of N; gamma_forward = {report['gamma_forward']}, gamma_reverse = {report['gamma_reverse']}. "
        "Our kernels are single-threaded; the dense mat-vec may use BLAS threads. "
        f"Our times are the best of {report['repeats']} runs up to N = 1e6 and one run above; "
        "the dense method runs once.",
        "",
        fmt_table(report["results"]),
        "",
        "Times are wall-clock; in brackets the process CPU time of the same phases (single-threaded "
        "kernels: the cost on one core, less sensitive to other jobs, though they still compete for "
        "caches and memory bandwidth). "
        "Times exclude numba compilation: warm-up (cache load) "
        f"{report['warmup_s']:.2f} s per process; cold compile of all kernels (empty cache) "
        + (f"{report['cold_compile_s']:.1f} s" if report["cold_compile_s"] is not None else "not measured")
        + ". Peak RSS is the whole process's ru_maxrss for that size "
        "(inputs, graph, Python, numba/LLVM included; with the dense method's N×N matrices where it ran).",
        "",
    ]
    lines += [f"- {t}" for t in report["targets"]]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also N = 1e7")
    ap.add_argument("--quick", action="store_true", help="N = 5e3, 1e4, 1e5; dense <= 1e4 (under a minute)")
    ap.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], help="comma list of N")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gamma-forward", type=float, default=1.0)
    ap.add_argument("--gamma-reverse", type=float, default=1.0)
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per size up to N=1e6 (best is reported); 1 above"
    )
    ap.add_argument("--dense-max-n", type=int, default=20_000, help="run the dense method up to this N")
    ap.add_argument("--json", dest="json_path", help="write the results as JSON here")
    ap.add_argument("--md", dest="md_path", help="write a markdown summary here")
    ap.add_argument("--note", default="", help="free text appended to the markdown (e.g. concurrent load)")
    ap.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_warmup-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._warmup_only:
        t = time.perf_counter()
        from pipeline.core import d2

        wn, wd, ws = random_knn_graph(1000, args.k, 1)
        wg = d2.symmetrize_knn(wn, wd)
        d2.d2_select(wg, ws, 300)
        d2.subgraph(wg, np.arange(10))
        print(json.dumps({"warmup_s": time.perf_counter() - t}))
        return 0
    if args._one is not None:
        res = run_one(
            args._one, args.k, args.seed, args.dense_max_n, args.gamma_forward, args.gamma_reverse, args.repeats
        )
        print(json.dumps(res))
        return 0

    sizes = args.sizes or (FULL_SIZES if args.full else QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.quick:
        args.dense_max_n = min(args.dense_max_n, 10_000)
        cold = None  # a cold compile alone takes ~5 s; not measured in quick mode
    else:
        cold = cold_compile_seconds(args.k)
        print(f"cold compile of the kernels (empty numba cache): {cold:.1f} s", flush=True)
    rows = []
    for n in sizes:
        cmd = [
            sys.executable, __file__, "--_one", str(n), "--k", str(args.k), "--seed", str(args.seed),
            "--dense-max-n", str(args.dense_max_n),
            "--repeats", str(args.repeats if n <= 1_000_000 else 1),
            "--gamma-forward", str(args.gamma_forward), "--gamma-reverse", str(args.gamma_reverse),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        extra = ""
        if "dense_total_s" in row:
            extra = (
                f"  dense {row['dense_total_s']:.2f} s, speedup {row['speedup_total']:.0f}×, "
                f"identical={row['identical_set'] and row['identical_order']}"
            )
        print(
            f"N={n:>11,}: symmetrize {row['symmetrize_s']:.3f} s, forward {row['forward_s']:.3f} s, "
            f"reverse {row['reverse_s']:.3f} s, total {row['total_s']:.3f} s ({row['total_cpu_s']:.3f} s CPU), "
            f"peak RSS {row['peak_rss_mb']:,.0f} MB{extra}",
            flush=True,
        )
    targets = check_targets(rows)
    print()
    print(fmt_table(rows))
    print()
    for t in targets:
        print(t)
    report = {
        "benchmark": "d2_speed",
        "command": "python benchmarks/d2_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "k": args.k,
        "gamma_forward": args.gamma_forward,
        "gamma_reverse": args.gamma_reverse,
        "repeats": args.repeats,
        "cold_compile_s": cold,
        "warmup_s": float(np.median([r["warmup_s"] for r in rows])) if rows else 0.0,
        "results": rows,
        "targets": targets,
        "note": args.note,
    }
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    if args.md_path:
        with open(args.md_path, "w") as fh:
            fh.write(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
