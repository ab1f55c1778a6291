"""The whole job, metadata-only, on a DataComp-layout pool: per stage seconds, bytes read and
written, peak memory of the driver and of the largest Ray worker; and the floor of reading the
metadata (DataComp's CLIP-score baseline: read the score column, keep the top 30%, write a
subset file) on the same files in the same run.

    python benchmarks/pool_scale.py --quick                       # N = 10^5, under 3 minutes
    python benchmarks/pool_scale.py --n 1000000 --json benchmarks/results/pool_scale.json

The pool (``--root``, reused when its ``pool.json`` says the same settings): hash-named
``<md5>.parquet`` + ``<md5>.npz`` files of ``--rows-per-file`` rows (DataComp's metadata files hold
1-2·10^6), columns uid (md5 of the url), url, text, original_width/height, sha256,
clip_l14_similarity_score; the npz holds float16 unit vectors ``l14_img``/``l14_txt``
(``--dim``, 768 as DataComp's L/14; 512 as ``b32_img``): √N clusters whose sizes follow a long tail
(Zipf, exponent 1.1), 5% near-duplicates of earlier rows, text vectors near their image vector. A
cluster has CLIP's low-dimensional shape (``pipeline.testing.ClipLikeClusters``, as the graph
benchmarks' ``clip_like_chunks``): its centre and its spread live in a 64-d latent space (centres grouped under 20
topics) mapped to ``--dim`` by a fixed random matrix, plus a little isotropic noise and a shared
offset. (Pool version 1, until 2026-12-08, spread each cluster by isotropic ``--dim``-d noise 0.9-3.6
times the centre's norm: vectors nearly uniform on the sphere, where a nearest neighbour is barely
nearer than a random row and an IVF index has no structure to use; the 1.28·10^7 run of
``results/pool_scale_12.8m`` used it.) The npz is written member by member in chunks (no array of
the whole file in memory).

How it is measured: one Ray head (``ray start --head``, 2 CPUs) for the whole run; each stage
(``d2prune embed|graph|select|write CONFIG --address``, then ``d2prune report``) is its own driver
process. Every 0.5 s the driver and the Ray cluster's processes (descendants of the head) are
sampled from /proc: peak RSS (VmHWM, reset with clear_refs at each stage's start) and rchar /
wchar, the bytes the processes passed through read() and write() (files and sockets: an upper
bound on what the stage read and wrote). The stage's own seconds are its ``_stats.json``
``seconds`` where it has them (else the driver's wall time, which includes joining Ray).

Checks (a failed one is an error): subset.npy is exactly the first B of selected.parquet's order
(the selected rows), decisions.parquet has one row per metadata row; with ``--partitions-check``
the select stage runs again with 8 partitions and must select the same uids.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STAGES = ("embed", "graph", "select", "write")


# -- the pool ---------------------------------------------------------------------------------------

def _npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(root: str, n: int, dim: int, rows_per_file: int, seed: int = 0, chunk: int = 50_000) -> dict:
    """The pool under ``root/metadata`` (module docstring); reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.testing import ClipLikeClusters

    spec = {"n": n, "dim": dim, "rows_per_file": rows_per_file, "seed": seed, "version": 2}
    meta_dir = os.path.join(root, "metadata")
    done = os.path.join(root, "pool.json")
    if os.path.exists(done) and json.load(open(done)) == spec:
        return spec
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(meta_dir)
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(np.sqrt(n)))
    geometry = ClipLikeClusters(rng, n_clusters, dim)  # CLIP-like clusters (module docstring)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 1.1  # a long tail of rare clusters
    weights /= weights.sum()
    words = np.array("a photo of the cat dog house tree car street beach mountain red blue small large "
                     "old new man woman child food table city night sky".split())
    started = time.perf_counter()
    recent = np.zeros((0, dim), np.float32)  # the previous chunk: near-duplicates copy from it
    for f, lo in enumerate(range(0, n, rows_per_file)):
        rows = min(rows_per_file, n - lo)
        name = hashlib.md5(f"pool_scale/{seed}/{f}".encode()).hexdigest()
        npz = os.path.join(meta_dir, name + ".npz")
        columns: dict[str, list] = {c: [] for c in ("uid", "url", "text", "original_width", "original_height",
                                                   "sha256", "clip_l14_similarity_score")}
        with zipfile.ZipFile(npz, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            img_member = zf.open("l14_img.npy", "w", force_zip64=True)
            img_member.write(_npy_header((rows, dim), np.dtype(np.float16)))
            # the text vectors go to a temporary file, then into the second member
            tmp_txt = npz + ".txt.tmp"
            with open(tmp_txt, "wb") as txt_fh:
                for c0 in range(0, rows, chunk):
                    m = min(chunk, rows - c0)
                    cluster = rng.choice(n_clusters, size=m, p=weights)
                    img = geometry.rows(rng, cluster)
                    if len(recent):
                        dup = rng.random(m) < 0.05
                        src = rng.integers(0, len(recent), size=int(dup.sum()))
                        img[dup] = _unit(recent[src] + 0.02 * rng.normal(size=(int(dup.sum()), dim)).astype(np.float32)
                                         / np.sqrt(dim))
                    txt = _unit(img + 0.9 * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim) * 3)
                    recent = img
                    img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
                    img_member.write(img16.tobytes())
                    txt_fh.write(txt16.tobytes())
                    score = (img16.astype(np.float32) * txt16.astype(np.float32)).sum(axis=1)
                    ids = np.arange(lo + c0, lo + c0 + m)
                    urls = [f"https://img.example.com/{seed}/{i}.jpg" for i in ids]
                    columns["url"] += urls
                    columns["uid"] += [hashlib.md5(u.encode()).hexdigest() for u in urls]
                    picks = rng.integers(0, len(words), size=(m, 6))
                    columns["text"] += [" ".join(w) for w in words[picks]]
                    columns["original_width"] += rng.integers(64, 2000, size=m).tolist()
                    columns["original_height"] += rng.integers(64, 2000, size=m).tolist()
                    columns["sha256"] += [hashlib.sha256(u.encode()).hexdigest() for u in urls]
                    columns["clip_l14_similarity_score"] += score.astype(np.float64).tolist()
            img_member.close()
            with zf.open("l14_txt.npy", "w", force_zip64=True) as txt_member, open(tmp_txt, "rb") as src:
                txt_member.write(_npy_header((rows, dim), np.dtype(np.float16)))
                shutil.copyfileobj(src, txt_member, 64 << 20)
            os.remove(tmp_txt)
        pq.write_table(pa.table(columns), os.path.join(meta_dir, name + ".parquet"), row_group_size=100_000)
        print(f"  generated {name} ({rows} rows) at {time.perf_counter() - started:.0f} s", flush=True)
    json.dump(spec, open(done, "w"))
    return spec


# -- measuring processes -----------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        out = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        return out
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _proc(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            status = dict(line.split(":", 1) for line in fh if ":" in line)
        with open(f"/proc/{pid}/io") as fh:
            io_ = dict(line.split(": ") for line in fh.read().splitlines())
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    return {"hwm": int(status.get("VmHWM", "0 kB").split()[0]) * 1024, "rchar": int(io_["rchar"]),
            "wchar": int(io_["wchar"]), "cmd": cmd}


def _reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _volume_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Meter:
    """Samples the stage's driver tree and the Ray head's tree until stopped, and the used bytes of
    the work directory's volume (its growth over the stage's start: the stage's scratch and outputs,
    on an otherwise idle disk)."""

    def __init__(self, head_pid: int, driver_pid: int, volume: str):
        self.head_pid, self.driver_pid, self.volume = head_pid, driver_pid, volume
        self.volume_start = self.volume_peak = _volume_used(volume)
        self.base: dict[int, dict] = {}
        for pid in _tree(head_pid):
            _reset_peak(pid)
            info = _proc(pid)
            if info:
                self.base[pid] = info
        self.last: dict[int, dict] = {}
        self.driver_tree: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        self.volume_peak = max(self.volume_peak, _volume_used(self.volume))
        driver = _tree(self.driver_pid)
        self.driver_tree.update(driver)
        for pid in set(driver) | set(_tree(self.head_pid)):
            info = _proc(pid)
            if info:
                self.last[pid] = info

    def _run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(0.5)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        read = written = 0
        worker_peak = 0
        for pid, info in self.last.items():
            base = self.base.get(pid, {"rchar": 0, "wchar": 0})
            read += info["rchar"] - base["rchar"]
            written += info["wchar"] - base["wchar"]
            if pid not in self.driver_tree and ("ray::" in info["cmd"] or "default_worker" in info["cmd"]):
                worker_peak = max(worker_peak, info["hwm"])
        # the driver's own high-water mark (VmHWM, per process image): wait4's ru_maxrss would also
        # count the RSS this benchmark process had when it forked the driver (kept across exec)
        driver_peak = max((self.last[p]["hwm"] for p in self.driver_tree if p in self.last), default=0)
        return {"bytes_read": read, "bytes_written": written, "max_worker_peak_rss_mb": round(worker_peak / 2**20, 1),
                "driver_peak_rss_mb": round(driver_peak / 2**20, 1),
                "disk_growth_peak_mb": round((self.volume_peak - self.volume_start) / 2**20, 1)}


def _wait_for_head(ray_cli: str, address: str, timeout_s: float = 300) -> None:
    """Until the head answers `ray status` (it takes long on a loaded machine)."""
    deadline = time.time() + timeout_s
    while subprocess.run([ray_cli, "status", "--address", address], capture_output=True).returncode != 0:
        if time.time() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not come up in {timeout_s} s")
        time.sleep(3)


def _run_stage(args: list[str], head_pid: int, address: str, log_path: str, attempt: int = 1) -> dict:
    volume = os.path.dirname(log_path)
    started = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli"] + args, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": address})
    meter = Meter(head_pid, proc.pid, volume)
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    measured = meter.finish()
    if proc.returncode != 0:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log_path) - 2000))
            tail = fh.read().decode(errors="replace")
        if "Failed to connect to Ray cluster" in tail and attempt < 3:  # a loaded machine: the head answers late
            return _run_stage(args, head_pid, address, log_path, attempt + 1)
        raise RuntimeError(f"d2prune {' '.join(args)} exited {proc.returncode} (see the log)")
    return {**measured, "wall_seconds": round(time.perf_counter() - started, 2)}


# -- the floor ----------------------------------------------------------------------------------------

def floor_pass(meta_dir: str, out: str, keep: float = 0.3) -> float:
    """DataComp's CLIP-score baseline: every file's score (and uid) column, the top `keep`, a subset file."""
    import pyarrow.parquet as pq

    from pipeline.formats.selection import datacomp_subset

    started = time.perf_counter()
    uids, scores = [], []
    for name in sorted(os.listdir(meta_dir)):
        if name.endswith(".parquet"):
            t = pq.read_table(os.path.join(meta_dir, name), columns=["uid", "clip_l14_similarity_score"])
            uids.append(t.column("uid").to_numpy(zero_copy_only=False))
            scores.append(t.column("clip_l14_similarity_score").to_numpy())
    uid, score = np.concatenate(uids), np.concatenate(scores)
    k = int(round(keep * len(score)))
    top = np.argpartition(-score, k - 1)[:k]
    np.save(out, datacomp_subset(uid[top]))
    return round(time.perf_counter() - started, 2)


# -- checks -------------------------------------------------------------------------------------------

def check_result(work: str, n_rows: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline.formats.selection import datacomp_subset

    sel = pq.read_table(os.path.join(work, "selection", "selected.parquet"), columns=["uid", "selected"])
    kept = sel.filter(sel.column("selected")).column("uid").to_pylist()
    subset = np.load(os.path.join(work, "selection", "subset.npy"))
    if subset.tobytes() != datacomp_subset(kept).tobytes():
        raise AssertionError("subset.npy is not the selected rows of selected.parquet")
    ddir = os.path.join(work, "selection", "decisions.parquet")
    decided = sum(pq.ParquetFile(os.path.join(ddir, f)).metadata.num_rows for f in os.listdir(ddir)
                  if f.endswith(".parquet"))
    if decided != n_rows:
        raise AssertionError(f"decisions.parquet has {decided} rows, the metadata {n_rows}")
    return {"selected": len(kept), "decisions": decided}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10^5 (under 3 minutes)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rows-per-file", type=int, default=None, help="default: 1.5·10^6 (quick: 25,000)")
    ap.add_argument("--root", default="/tmp/d2prune-pool-scale")
    ap.add_argument("--json", default=None)
    ap.add_argument("--port", type=int, default=6390, help="the Ray head's port (one per concurrent run)")
    ap.add_argument("--partitions-check", action="store_true", help="run select again with 8 partitions, compare")
    ap.add_argument("--resume", action="store_true",
                    help="keep the run directory of an earlier run with the same settings (stages resume)")
    ap.add_argument("--scratch-gb", type=float, default=None,
                    help="graph.scratch_gb: the disk bound of the search's shuffle files (default: the config's)")
    args = ap.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    rows_per_file = args.rows_per_file or (25_000 if n <= 200_000 else 1_500_000)
    import yaml

    t0 = time.perf_counter()
    pool_root = os.path.join(args.root, f"pool-{n}-{args.dim}")
    print(f"pool: {n} rows, {args.dim}-d, {rows_per_file} rows per file under {pool_root}", flush=True)
    generate(pool_root, n, args.dim, rows_per_file)
    generate_s = round(time.perf_counter() - t0, 1)
    meta_dir = os.path.join(pool_root, "metadata")
    source_bytes = sum(os.path.getsize(os.path.join(meta_dir, f)) for f in os.listdir(meta_dir))
    run_dir = os.path.join(args.root, f"run-{n}-{args.dim}")
    raw = {"workdir": os.path.join(run_dir, "work"),
           "embed": {"encoder": "precomputed", "precomputed": {"metadata": meta_dir}},
           "graph": {"k": 10, **({} if args.scratch_gb is None else {"scratch_gb": args.scratch_gb})},
           "select": {"method": "d2", "prune_rate": 0.7},
           "output": {"url": os.path.join(run_dir, "out")}}
    config = os.path.join(run_dir, "config.yaml")
    # --resume: the same config's committed stages are skipped (each reports the seconds it took when
    # it ran); a stage cut off mid-way resumes, its seconds then being those of the rest only
    resumed = args.resume and os.path.exists(config) and yaml.safe_load(open(config)) == raw
    if not resumed:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        with open(config, "w") as fh:
            yaml.safe_dump(raw, fh)

    floor_s = floor_pass(meta_dir, os.path.join(run_dir, "floor_subset.npy"))
    print(f"floor (read scores, keep top 30%, write subset): {floor_s} s", flush=True)

    log = open(os.path.join(run_dir, "ray_head.log"), "w")
    stage_log = os.path.join(run_dir, "job.log")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    # a token of this run's own: the head and every stage's driver share it (Ray's token authentication)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=hashlib.sha256(os.urandom(16)).hexdigest())
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "false",
                             "--node-ip-address", "127.0.0.1", "--port", str(args.port), "--object-store-memory", str(2 * 10**9),
                             "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{args.port}"
    results: dict = {}
    try:
        _wait_for_head(ray_cli, address)
        for stage in STAGES:
            m = _run_stage([stage, config, "--address", address], head.pid, address, stage_log)
            stats = json.load(open(os.path.join(raw["workdir"], {"embed": "embeddings", "select": "selection"}.get(
                stage, stage), "_stats.json")))
            own = stats.get("seconds")
            if isinstance(own, dict):  # per step (the graph stage): their sum, or the stage's own total
                own = own.get("total", sum(v for v in own.values() if isinstance(v, (int, float))))
            m["seconds"] = round(float(own), 2) if own is not None else m["wall_seconds"]
            results[stage] = m
            print(f"  {stage}: {m}", flush=True)
        results["report"] = _run_stage(["report", raw["workdir"]], head.pid, address, stage_log)
        results["report"]["seconds"] = results["report"]["wall_seconds"]
        checks = check_result(raw["workdir"], n)
        if args.partitions_check:
            before = open(os.path.join(raw["workdir"], "selection", "subset.npy"), "rb").read()
            _run_stage(["select", config, "--address", address, "--set", "select.partitions=8", "--force"],
                       head.pid, address, stage_log)
            after = open(os.path.join(raw["workdir"], "selection", "subset.npy"), "rb").read()
            checks["partitions_8_identical_to_default"] = before == after
            if before != after:
                raise AssertionError("the selection with 8 partitions differs")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    embed = json.load(open(os.path.join(raw["workdir"], "embeddings", "_stats.json")))
    work_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(raw["workdir"]) for f in fs)
    total = round(sum(results[s]["seconds"] for s in STAGES), 2)
    out = {"n": n, "dim": args.dim, "rows_per_file": rows_per_file, "metadata_files": embed["metadata_files"],
           "source_bytes": source_bytes, "workdir_bytes": work_bytes, "generate_seconds": generate_s, "resumed": resumed,
           "stages": results, "total_seconds": total, "floor_seconds": floor_s,
           "ratio_to_floor": round(total / floor_s, 1) if floor_s else None, "checks": checks,
           "embed_io": embed.get("io"), "graph": _graph_summary(raw["workdir"]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}}
    print(f"\n{'stage':<8} {'seconds':>9} {'read MB':>10} {'written MB':>11} {'driver MB':>10} {'worker MB':>10} "
          f"{'disk peak MB':>13}")
    for stage in STAGES + ("report",):
        r = results[stage]
        print(f"{stage:<8} {r['seconds']:>9} {r['bytes_read'] / 2**20:>10.0f} {r['bytes_written'] / 2**20:>11.0f} "
              f"{r['driver_peak_rss_mb']:>10} {r['max_worker_peak_rss_mb']:>10} {r['disk_growth_peak_mb']:>13}")
    print(f"total {total} s (stages' own seconds), floor {floor_s} s, ratio {out['ratio_to_floor']}; checks {checks}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as fh:
            fh.write(markdown(out))


def _graph_summary(work: str) -> dict:
    """The graph stage's own account of its search: groups, waves under graph.scratch_gb, bytes shuffled."""
    stats = json.load(open(os.path.join(work, "graph", "_stats.json")))
    return {k: stats.get(k) for k in ("nlist", "groups", "groups_per_query", "scratch_gb", "waves", "recall_at_k",
                                      "seconds")} | {"shuffled_bytes": (stats.get("search") or {}).get("shuffled_bytes")}


def markdown(out: dict) -> str:
    """The results as the table committed beside the json."""
    lines = [f"# pool_scale: N = {out['n']:,}, {out['dim']}-d, metadata-only", "",
             f"{out['metadata_files']} metadata files of {out['rows_per_file']:,} rows ({out['source_bytes'] / 2**30:.2f} GiB); "
             f"workdir after the job {out['workdir_bytes'] / 2**30:.2f} GiB. Machine: {out['machine']['cpus']} CPUs, "
             f"load average at the end {out['machine']['load_average_at_end']}.", "",
             "| stage | seconds | read MB | written MB | driver peak MB | largest worker MB | disk peak MB |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES + ("report",):
        r = out["stages"][stage]
        lines.append(f"| {stage} | {r['seconds']} | {r['bytes_read'] / 2**20:.0f} | {r['bytes_written'] / 2**20:.0f} | "
                     f"{r['driver_peak_rss_mb']} | {r['max_worker_peak_rss_mb']} | {r.get('disk_growth_peak_mb')} |")
    lines += ["", f"Total (the stages' own seconds): {out['total_seconds']} s; floor (read the score column, keep the "
              f"top 30%, write subset.npy): {out['floor_seconds']} s; ratio {out['ratio_to_floor']}.",
              f"Checks: {out['checks']}.", "", f"Graph search: {json.dumps(out.get('graph'))}.", "",
              "read/written: rchar/wchar of the stage's driver and of the Ray cluster's processes (files and sockets; "
              "an upper bound). disk peak: the largest growth of the volume's used bytes over the stage's start "
              "(its scratch and outputs; the disk was otherwise idle). The embed stage's own file-level counts: "
              + json.dumps(out.get("embed_io")), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
