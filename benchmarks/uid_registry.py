"""Where the embed stage's duplicate-uid check keeps the uids seen: the driver, or Ray actors.

    .venv/bin/python benchmarks/uid_registry.py [--quick] [--n N] [--actors K] [--json PATH --md PATH]

The embed driver checks every committed shard's uids against all uids of earlier shards
(``pipeline.embed.parts``). With ``embed.uid_registry_actors: 1`` the set lives in the driver
(:class:`UidRegistry`, 8 bytes per uid); with K > 1 it is split by uid hash over K Ray actors
(:class:`ShardedUidRegistry`). Each mode runs in its own process on the real classes: N uids
arrive in shards of ``--per-shard`` (1% of each shard repeats a uid of an earlier shard, as a
duplicate the check must find), each shard is asked ``contains`` then ``add`` exactly as
``PartCommitter`` does. Reported: the duplicates found (must be the planted count), the seconds
spent in the registry (hashing excluded: the stage hashes either way), the driver's peak RSS
growth over its RSS before the first shard, and each actor's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DUPLICATE_SHARE = 0.01


def shard_uids(shard: int, per_shard: int) -> list[str]:
    """The uids of one shard: new ones, and 1% repeated from the shard before (none in shard 0)."""
    uids = [f"{shard:08d}-{i:06d}" for i in range(per_shard)]
    if shard:
        for i in range(0, per_shard, int(1 / DUPLICATE_SHARE)):
            uids[i] = f"{shard - 1:08d}-{i + 1:06d}"
    return uids


def current_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def child(n: int, per_shard: int, actors: int) -> dict:
    """One mode in this process: insert the pool shard by shard, as the embed driver does."""
    from pipeline.embed.parts import ShardedUidRegistry, UidRegistry
    from pipeline.formats.buckets import uid_hashes
    from pipeline.runtime import peak_rss_bytes

    if actors > 1:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200_000_000)
        registry = ShardedUidRegistry(actors)
    else:
        registry = UidRegistry()
    base_rss = current_rss_bytes()
    registry_s = hashing_s = 0.0
    found = 0
    shards = n // per_shard
    for shard in range(shards):
        t0 = time.perf_counter()
        hashes = uid_hashes(shard_uids(shard, per_shard))
        t1 = time.perf_counter()
        seen = registry.contains(hashes)
        registry.add(hashes[~seen])
        t2 = time.perf_counter()
        hashing_s += t1 - t0
        registry_s += t2 - t1
        found += int(seen.sum())
    out = {"actors": actors, "n": shards * per_shard, "shards": shards, "duplicates_found": found,
           "duplicates_planted": sum(len(range(0, per_shard, int(1 / DUPLICATE_SHARE))) for _ in range(1, shards)),
           "uids_held": len(registry), "registry_s": round(registry_s, 2), "hashing_s": round(hashing_s, 2),
           "driver_rss_growth_mb": round((peak_rss_bytes() - base_rss) / 2**20, 1),
           "driver_peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)}
    if actors > 1:
        import ray

        peaks = ray.get([a.__ray_call__.remote(lambda _self: __import__("pipeline.runtime").runtime.peak_rss_bytes())
                         for a in registry.actors])
        out["actor_peak_rss_mb"] = [round(b / 2**20, 1) for b in peaks]
        registry.close()
        ray.shutdown()
    return out


def run_mode(n: int, per_shard: int, actors: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(per_shard), str(actors)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mode actors={actors} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = [
        "# uid_registry: the duplicate-uid check's uids seen, in the driver or over Ray actors",
        "",
        f"Machine: {report['machine']}. {report['n']:,} uids in shards of {report['per_shard']:,} "
        f"({DUPLICATE_SHARE:.0%} of each shard repeats an earlier uid). Each mode in its own process; "
        "registry seconds exclude hashing (the stage hashes either way).",
        "",
        "| where | duplicates found / planted | uids held | registry s | hashing s | driver peak RSS growth MB | actor peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        where = "driver (uid_registry_actors: 1)" if r["actors"] == 1 else f"{r['actors']} Ray actors"
        actor = ", ".join(f"{v:.0f}" for v in r.get("actor_peak_rss_mb", [])) or "–"
        lines.append(f"| {where} | {r['duplicates_found']:,} / {r['duplicates_planted']:,} | {r['uids_held']:,} | "
                     f"{r['registry_s']} | {r['hashing_s']} | {r['driver_rss_growth_mb']} | {actor} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M uids (seconds)")
    parser.add_argument("--n", type=int, default=20_000_000, help="uids in the pool")
    parser.add_argument("--per-shard", type=int, default=10_000, help="uids per shard (DataComp: ~10k)")
    parser.add_argument("--actors", type=int, default=4, help="actors of the sharded mode")
    parser.add_argument("--json", help="write the JSON report here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    n = 1_000_000 if args.quick else args.n
    results = [run_mode(n, args.per_shard, k) for k in (1, args.actors)]
    for r in results:
        if r["duplicates_found"] != r["duplicates_planted"]:
            raise SystemExit(f"actors={r['actors']}: found {r['duplicates_found']} duplicates, planted "
                             f"{r['duplicates_planted']}")
    report = {"benchmark": "uid_registry", "n": n, "per_shard": args.per_shard, "results": results,
              "machine": f"{os.cpu_count()}-core {platform.machine()} VM, no GPU, Python {platform.python_version()}"}
    md = markdown(report)
    print(md)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
