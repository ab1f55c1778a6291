"""Soak: the whole job (``d2prune run``, a real subprocess) over a large pool of small samples on a
local S3 endpoint, at two pool sizes, with the peak memory of every process it starts.

    .venv/bin/python benchmarks/soak.py --json benchmarks/results/soak.json           # 50k and 200k samples
    .venv/bin/python benchmarks/soak.py --quick                                           # 2k and 8k samples

What it shows: the job finishes with its integrity check passed (every selected uid written once,
exact counts), and its memory does not grow with the pool: the peak RSS of the driver, of the
largest Ray worker and of the whole process tree are read from /proc every 0.25 s (psutil is not
a dependency) and compared between the two sizes and against a stated cap.

The pool: ``--shards`` WebDataset tars on a moto S3 server (its own process, not measured), each
sample a 24 px JPEG, a caption and a json uid, written by worker processes. The job: the tiny
open_clip model (random weights) on one CPU actor, IVF-Flat k=10, D2 keeping 30%, 1000 samples per
output shard, Ray with 2 CPUs and a 300 MB object store.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

BUCKET = "d2prune-soak"
WORDS = ("red blue green small large round square striped dotted bright dark photo of a an the cat dog car "
         "tree house boat bird flower cup chair lamp").split()
# The cap the job must stay under, whatever the pool size (summed RSS of every process it starts;
# the object store is capped at 300 MB in the config, shared memory counted in each process that
# maps it, so the sum over-counts).
CAP_TREE_BYTES = 8 * 2**30
CAP_DRIVER_BYTES = 2 * 2**30


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {cpu} ({platform.machine()}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


# -- the pool -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shard_bytes(shard: int, per_shard: int, prefix: str) -> bytes:
    import numpy as np
    from PIL import Image

    from pipeline.formats.tar import TarWriter

    rng = np.random.default_rng(shard)
    buf = io.BytesIO()
    with TarWriter(buf) as tar:
        for i in range(per_shard):
            pixels = np.empty((24, 24, 3), np.uint8)
            pixels[:] = rng.integers(0, 256, 3)
            y, x = rng.integers(0, 16, 2)
            pixels[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
            image = io.BytesIO()
            Image.fromarray(pixels).save(image, format="JPEG", quality=85)
            caption = " ".join(rng.choice(WORDS, 6))
            uid = hashlib.md5(f"{prefix}/{shard}/{i}".encode()).hexdigest()
            key = f"{shard:05d}{i:05d}"
            tar.add(f"{key}.jpg", image.getvalue())
            tar.add(f"{key}.txt", caption.encode())
            tar.add(f"{key}.json", json.dumps({"uid": uid, "caption": caption}).encode())
    return buf.getvalue()


def _write_shard(args: tuple[str, str, int, int]) -> int:
    endpoint, prefix, shard, per_shard = args
    from pipeline.config import StorageConfig
    from pipeline.storage import Store

    data = _shard_bytes(shard, per_shard, prefix)
    Store(StorageConfig(endpoint_url=endpoint)).write_bytes(f"s3://{BUCKET}/{prefix}/pool/{shard:05d}.tar", data)
    return len(data)


def write_soak_pool(endpoint: str, prefix: str, shards: int, per_shard: int) -> int:
    with Pool(processes=max(1, min(2, os.cpu_count() or 1))) as workers:
        return sum(workers.map(_write_shard, [(endpoint, prefix, s, per_shard) for s in range(shards)], chunksize=4))


# -- memory -------------------------------------------------------------------------------------------

def _status(pid: int) -> tuple[int, int, str] | None:
    """(ppid, VmRSS bytes, name) of a process."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, ValueError):
        return None
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return int(fields["PPid"]), rss, cmd or fields.get("Name", "").strip()


class TreeSampler(threading.Thread):
    """Peak RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, root: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak = {"driver": 0, "largest_ray_worker": 0, "ray_system": 0, "tree_total": 0}
        self.largest_worker_name = ""
        self.processes_seen: set[int] = set()
        # peak RSS of each kind of process, by its title's first word ("ray::graph.search",
        # "ray::MapWorker(MapBatches(ClipEmbedder))", "raylet"...): the step tasks carry their
        # step's name, so a process that grows with the pool is named
        self.peak_by_name: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        infos = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                info = _status(int(name))
                if info:
                    infos[int(name)] = info
        tree = {self.root}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in infos.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        total = system = 0
        for pid in tree & set(infos):
            _, rss, cmd = infos[pid]
            self.processes_seen.add(pid)
            total += rss
            kind = "driver" if pid == self.root else os.path.basename(cmd.split(" ")[0])
            self.peak_by_name[kind] = max(self.peak_by_name.get(kind, 0), rss)
            if pid == self.root:
                self.peak["driver"] = max(self.peak["driver"], rss)
            elif cmd.startswith("ray::") and "Agent" not in cmd:
                if rss > self.peak["largest_ray_worker"]:
                    self.peak["largest_ray_worker"], self.largest_worker_name = rss, cmd.split(" ")[0]
            else:
                system += rss
        self.peak["ray_system"] = max(self.peak["ray_system"], system)
        self.peak["tree_total"] = max(self.peak["tree_total"], total)


# -- one size -----------------------------------------------------------------------------------------

def run_size(endpoint: str, base: str, samples: int, shards: int, env: dict) -> dict:
    from pipeline.core.d2 import budget_for
    from pipeline.config import StorageConfig
    from pipeline.storage import Store

    per_shard = samples // shards
    prefix = f"n{samples}"
    t0 = time.perf_counter()
    pool_bytes = write_soak_pool(endpoint, prefix, shards, per_shard)
    pool_seconds = time.perf_counter() - t0
    raw = {
        "workdir": f"s3://{BUCKET}/{prefix}/work",
        "storage": {"endpoint_url": endpoint},
        "input": {"shards": f"s3://{BUCKET}/{prefix}/pool/{{00000..{shards - 1:05d}}}.tar"},
        "embed": {"model": "d2prune-tiny", "model_config_path": os.path.join(base, "tiny.json"), "pretrained": None,
                  "batch_size": 256, "num_actors": 1, "cpus_per_actor": 1, "torch_threads": 1},
        "graph": {"k": 10, "index": "ivfflat", "recall_sample": 1000},
        "select": {"prune_rate": 0.7},
        "output": {"url": f"s3://{BUCKET}/{prefix}/out", "samples_per_shard": 1000},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    config = os.path.join(base, f"{prefix}.yaml")
    with open(config, "w") as fh:
        json.dump(raw, fh)  # JSON is YAML
    t0 = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", config], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(job.pid)
    sampler.start()
    out, err = job.communicate()
    sampler.stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if job.returncode != 0:
        raise RuntimeError(f"the job failed ({job.returncode}):\n{err[-4000:]}")
    store = Store(StorageConfig(endpoint_url=endpoint))
    embed = store.read_json(f"s3://{BUCKET}/{prefix}/work/embeddings/_stats.json")
    written = store.read_json(f"s3://{BUCKET}/{prefix}/out/_stats.json")
    graph = store.read_json(f"s3://{BUCKET}/{prefix}/work/graph/_stats.json")
    n = per_shard * shards
    integrity = (embed["samples"] == n and embed["skipped_total"] == 0
                 and written["samples_written"] == budget_for(n, 0.7) and written["integrity"].startswith("ok"))
    stage_seconds = {}
    for line in out.splitlines():  # "  embed      : 12.3 s"
        parts = line.strip().split(":")
        if len(parts) == 2 and parts[0].strip() in ("embed", "graph", "select", "write"):
            stage_seconds[parts[0].strip()] = float(parts[1].split()[0])
    return {
        "samples": n, "shards": shards, "pool_mb": round(pool_bytes / 2**20, 1),
        "pool_generation_seconds": round(pool_seconds, 1), "job_seconds": round(seconds, 1),
        "stage_seconds": stage_seconds, "kept": written["samples_written"], "recall_at_k": graph.get("recall_at_k"),
        "integrity_passed": bool(integrity), "integrity": written["integrity"],
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sampler.peak.items()},
        "largest_ray_worker": sampler.largest_worker_name, "processes_seen": len(sampler.processes_seen),
        "peak_rss_by_process_mb": {k: round(v / 2**20, 1) for k, v in
                                   sorted(sampler.peak_by_name.items(), key=lambda kv: -kv[1])},
        "under_cap": sampler.peak["tree_total"] <= CAP_TREE_BYTES and sampler.peak["driver"] <= CAP_DRIVER_BYTES,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000, help="the larger pool")
    parser.add_argument("--shards", type=int, default=200, help="shards of the larger pool")
    parser.add_argument("--small", type=float, default=0.25, help="the smaller pool, as a fraction of the larger")
    parser.add_argument("--quick", action="store_true", help="8,000 samples in 32 shards (and 2,000 in 8)")
    parser.add_argument("--json", default=None, help="write the results here (and a .md next to it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.shards = 8000, 32

    from pipeline.testing import TINY_MODEL_CONFIG, create_bucket

    base = tempfile.mkdtemp(prefix="d2prune-soak-")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE)] + sys.path)}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_EC2_METADATA_DISABLED")})
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        create_bucket(endpoint, BUCKET)
        with open(os.path.join(base, "tiny.json"), "w") as fh:
            json.dump(TINY_MODEL_CONFIG, fh)
        sizes = [(int(args.samples * args.small), max(1, int(args.shards * args.small))), (args.samples, args.shards)]
        runs = [run_size(endpoint, base, samples, shards, env) for samples, shards in sizes]
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(base, ignore_errors=True)
    small, large = runs
    results = {
        "machine": machine(),
        "command": "benchmarks/soak.py" + (" --quick" if args.quick else f" --samples {args.samples} --shards {args.shards}"),
        "cap_mb": {"tree_total": CAP_TREE_BYTES // 2**20, "driver": CAP_DRIVER_BYTES // 2**20},
        "runs": runs,
        "memory_growth_large_over_small": {k: round(large["peak_rss_mb"][k] / max(small["peak_rss_mb"][k], 1e-9), 3)
                                           for k in large["peak_rss_mb"]},
        "load_average_start": [round(x, 1) for x in load_before],
        "load_average_end": [round(x, 1) for x in os.getloadavg()],
    }
    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        Path(args.json).with_suffix(".md").write_text(table)
    return results


def markdown(r: dict) -> str:
    lines = [
        "# soak: the whole job over a large pool on a local S3 endpoint, at two sizes",
        "",
        f"Machine: {r['machine']}. Command: `{r['command']}`. Load average (1/5/15 min) at start "
        f"{r['load_average_start']}, at end {r['load_average_end']}.",
        "",
        f"Stated cap: the job's whole process tree under {r['cap_mb']['tree_total']} MB summed RSS and the driver "
        f"under {r['cap_mb']['driver']} MB, whatever the pool size (Ray's object store is capped at 300 MB).",
        "",
        "| | " + " | ".join(f"{run['samples']:,} samples / {run['shards']} shards" for run in r["runs"]) + " |",
        "|---|" + "---|" * len(r["runs"]),
    ]

    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(run) for run in r["runs"]) + " |")

    row("pool on S3 (MB)", lambda x: f"{x['pool_mb']}")
    for stage in ("embed", "graph", "select", "write"):
        row(f"{stage} (s)", lambda x, s=stage: f"{x['stage_seconds'].get(s, float('nan')):.1f}")
    row("whole job (s)", lambda x: f"{x['job_seconds']:.1f}")
    row("samples/s (whole job)", lambda x: f"{x['samples'] / x['job_seconds']:.0f}")
    row("peak RSS driver (MB)", lambda x: f"{x['peak_rss_mb']['driver']:.0f}")
    row("peak RSS largest Ray worker (MB)", lambda x: f"{x['peak_rss_mb']['largest_ray_worker']:.0f} ({x['largest_ray_worker']})")
    row("peak RSS Ray system processes (MB)", lambda x: f"{x['peak_rss_mb']['ray_system']:.0f}")
    row("peak RSS whole tree, summed (MB)", lambda x: f"{x['peak_rss_mb']['tree_total']:.0f}")
    row("under the cap", lambda x: "yes" if x["under_cap"] else "NO")
    row("kept (30%)", lambda x: f"{x['kept']:,}")
    row("integrity check", lambda x: "passed" if x["integrity_passed"] else "FAILED")
    growth = r["memory_growth_large_over_small"]
    lines += ["", f"Peak memory of the larger pool over the smaller (x{r['runs'][1]['samples'] / r['runs'][0]['samples']:.0f} "
              f"samples): driver x{growth['driver']}, largest worker x{growth['largest_ray_worker']}, whole tree "
              f"x{growth['tree_total']}.", ""]
    lines += process_table(r["runs"])
    return "\n".join(lines)


def process_table(runs: list[dict], most: int = 12) -> list[str]:
    """Peak RSS of each kind of process (by title: step tasks carry their step's name) at both
    sizes, the largest first; the ones seen at one size only are marked."""
    small, large = (run.get("peak_rss_by_process_mb") for run in runs)
    if not small or not large:
        return []
    names = sorted(set(small) | set(large), key=lambda n: -max(small.get(n, 0), large.get(n, 0)))[:most]
    lines = ["Peak RSS by process (title's first word; the step tasks are named after their step):", "",
             f"| process | {runs[0]['samples']:,} (MB) | {runs[1]['samples']:,} (MB) | larger / smaller |",
             "|---|---|---|---|"]
    for name in names:
        a, b = small.get(name), large.get(name)
        ratio = f"x{b / a:.2f}" if a and b else "one size only"
        lines.append(f"| `{name}` | {a if a is not None else '-'} | {b if b is not None else '-'} | {ratio} |")
    return lines + [""]


if __name__ == "__main__":
    main(sys.argv[1:])
