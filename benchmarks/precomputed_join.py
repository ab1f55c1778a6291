"""The precomputed encoder's join by uid: time per step and the peak memory of its Ray workers,
for pools of several sizes and join bucket sizes.

    python benchmarks/precomputed_join.py --json benchmarks/results/precomputed_join.json
    python benchmarks/precomputed_join.py --quick        # a few minutes on a 2-core CPU

The pool is DataComp's layout at DataComp's widths: metadata parquet files (uid, url, text,
original size, both clip scores) with ``.npz`` of float16 ``l14_img``/``l14_txt`` (768-d) and
``b32_img``/``b32_txt`` (512-d); img2dataset shards of 10,000 attempted samples, one in ten failed
to download, members a small constant jpg, the caption and the json with uid. Rows are in
download order, spread over ``--files`` metadata files.

For each (pool rows, bucket_rows) the whole embed stage runs (``pipeline.job.run_one``) on an
embedded Ray with 2 CPUs. Reported: seconds of each step (bucketing both sides by uid, the
per-bucket joins, writing the parts), metadata rows per second, and per kind of task the largest
resident memory of its worker process, sampled every 0.1 s, each task in a fresh worker (it
includes the ~0.2-0.5 GB a worker holds after importing pyarrow and pandas). The claim it tests:
a task's memory follows ``bucket_rows`` (join, parts) or constants (samples, metadata), not the
pool's size.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.formats.tar import TarWriter  # noqa: E402
from pipeline.job import run_one  # noqa: E402
from pipeline.storage import Store  # noqa: E402
from pipeline.testing import make_config  # noqa: E402

PER_SHARD = 10_000
TASKS = ("samples_task", "metadata_task", "join_task", "parts_task")
DIMS = {"l14": 768, "b32": 512}


def write_pool(root: str, rows: int, files: int, seed: int = 0) -> list[str]:
    """DataComp's layout (module docstring); returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    meta_dir, shard_dir = os.path.join(root, "metadata"), os.path.join(root, "shards")
    os.makedirs(meta_dir)
    os.makedirs(shard_dir)
    uids = [hashlib.md5(f"{seed}/{i}".encode()).hexdigest() for i in range(rows)]
    cuts = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        lo, hi = cuts[f], cuts[f + 1]
        n = hi - lo
        name = hashlib.md5(f"file-{seed}-{f}".encode()).hexdigest()
        pq.write_table(pa.table({
            "uid": uids[lo:hi], "url": [f"https://x/{i}.jpg" for i in range(lo, hi)],
            "text": [f"a picture of thing {i}" for i in range(lo, hi)],
            "original_width": rng.integers(100, 2000, n), "original_height": rng.integers(100, 2000, n),
            "clip_b32_similarity_score": rng.uniform(0.1, 0.4, n), "clip_l14_similarity_score": rng.uniform(0.1, 0.4, n),
        }), os.path.join(meta_dir, name + ".parquet"))
        np.savez(os.path.join(meta_dir, name + ".npz"),
                 **{f"{m}_{k}": rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
                    for m, d in DIMS.items() for k in ("img", "txt")})
    image = b"\xff\xd8\xff" + bytes(300)  # never decoded: sizes come from the json
    shards = []
    for s in range(-(-rows // PER_SHARD)):
        path = os.path.join(shard_dir, f"{s:08d}.tar")
        with TarWriter(path) as tar:
            for i in range(s * PER_SHARD, min(rows, (s + 1) * PER_SHARD)):
                if i % 10 == 9:
                    continue  # failed to download
                key = f"{s:08d}{i % PER_SHARD:04d}"
                tar.add(f"{key}.jpg", image)
                tar.add(f"{key}.txt", f"a picture of thing {i}".encode())
                tar.add(f"{key}.json", json.dumps({"uid": uids[i], "original_width": 640,
                                                   "original_height": 480}).encode())
        shards.append(path)
    return shards


class WorkerMemory:
    """Largest RSS of the Ray worker processes running each kind of task (sampled): a worker's
    title is "ray::<task>" while it runs one."""

    def __init__(self, interval: float = 0.1):
        self.peaks: dict[str, int] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):  # this run's Ray workers, not another job's
                try:
                    cmd = " ".join(proc.cmdline())
                    task = cmd.split()[0][len("ray::"):] if cmd.startswith("ray::") else None
                    if task in TASKS:
                        self.peaks[task] = max(self.peaks.get(task, 0), proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    continue
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def one_task_per_worker() -> None:
    """Every task in a fresh worker process (ray.remote(..., max_calls=1)), so a worker's peak
    memory is its task's, not that of whatever it ran before."""
    import ray

    remote = ray.remote

    def fresh(*args, **kwargs):
        if args:  # @ray.remote without options
            return remote(*args)

        def decorate(target):  # functions only: actors (Ray Data's) take no max_calls
            options = {**kwargs, "max_calls": 1} if inspect.isfunction(target) else kwargs
            return remote(**options)(target)

        return decorate

    ray.remote = fresh


def run_case(tmp: str, rows: int, files: int, bucket_rows: int) -> dict:
    root = os.path.join(tmp, f"pool-{rows}")
    if not os.path.exists(root):
        t0 = time.perf_counter()
        write_pool(root, rows, files)
        print(f"  pool of {rows} rows written in {time.perf_counter() - t0:.0f} s", flush=True)
    shards = sorted(os.path.join(root, "shards", n) for n in os.listdir(os.path.join(root, "shards"))
                    if n.endswith(".tar"))
    work = os.path.join(tmp, f"work-{rows}-{bucket_rows}")
    cfg = make_config(work, shards, embed={"encoder": "precomputed", "precomputed": {
        "metadata": os.path.join(root, "metadata"), "bucket_rows": bucket_rows, "shards_per_task": 4}})
    t0 = time.perf_counter()
    with WorkerMemory() as memory:
        stats = run_one(cfg, Store(), "embed")
    seconds = time.perf_counter() - t0
    shutil.rmtree(work)
    return {"metadata_rows": stats["metadata_rows"], "samples": stats["samples"],
            "not_in_shards": stats["not_in_shards"], "bucket_rows": bucket_rows,
            "buckets": stats["join"]["buckets"], "shard_groups": stats["join"]["shard_groups"],
            "step_seconds": stats["join"]["seconds"], "stage_seconds": round(seconds, 1),
            "metadata_rows_per_s": round(stats["metadata_rows"] / seconds),
            "peak_rss_mb": {task: round(rss / 2**20) for task, rss in sorted(memory.peaks.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import ray

    cases = ([(20_000, 5_000), (60_000, 5_000), (60_000, 20_000)] if args.quick else
             [(50_000, 10_000), (200_000, 10_000), (200_000, 40_000)])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300_000_000, log_to_driver=False)
    one_task_per_worker()
    results = []
    with tempfile.TemporaryDirectory(prefix="d2prune-join-bench-") as tmp:
        for rows, bucket_rows in cases:
            print(f"{rows} metadata rows, bucket_rows={bucket_rows}", flush=True)
            results.append(run_case(tmp, rows, args.files, bucket_rows))
            print("  ", results[-1], flush=True)
    ray.shutdown()
    tasks = TASKS
    print("\n| metadata rows | bucket_rows | buckets | stage s | bucket s | join s | parts s | rows/s | "
          + " | ".join(f"{t} MB" for t in tasks) + " |")
    print("|---" * (8 + len(tasks)) + "|")
    for r in results:
        s = r["step_seconds"]
        print(f"| {r['metadata_rows']:,} | {r['bucket_rows']:,} | {r['buckets']} | {r['stage_seconds']} | "
              f"{s['bucket_by_uid']} | {s['join']} | {s['parts']} | {r['metadata_rows_per_s']:,} | "
              + " | ".join(str(r["peak_rss_mb"].get(t, "-")) for t in tasks) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                       "files": args.files, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
