"""The small whole job the process-level tests run (kill -9, stop signals, damaged files): its
config on the shipped tiny model, the files it commits, and the embedded Ray a driver started."""

from __future__ import annotations

import glob
import os
import subprocess
import time

import yaml

from pipeline.reaper import _start_ticks

# every file the stages commit that a resumed run must reproduce byte for byte
COMMITTED = ("work/embeddings/part-*.parquet", "work/embeddings/_skipped/*.parquet", "work/graph/part-*.parquet",
             "work/selection/*.parquet", "work/selection/*.npy", "work/selection/nodes/*.parquet",
             "work/selection/decisions.parquet/*", "out/shards/*")


def write_config(root, shards, tiny_model_config, graph: dict | None = None, embed: dict | None = None) -> str:
    """``root/job.yaml``: the job over `shards` with its workdir and output under `root`."""
    raw = {
        "workdir": str(root / "work"),
        "input": {"shards": shards},
        "embed": {"model": "d2prune-tiny", "model_config_path": tiny_model_config, "pretrained": None,
                  "batch_size": 8, "cpus_per_actor": 1, "torch_threads": 1, **(embed or {})},
        "graph": graph or {"k": 4, "index": "ivfflat", "nlist": 2, "nprobe": 2, "train_size": 1000,
                           "recall_sample": 0},
        "select": {"prune_rate": 0.5},
        "output": {"url": str(root / "out"), "samples_per_shard": 10},
        "ray": {"num_cpus": 2, "object_store_memory": 200_000_000},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.yaml").write_text(yaml.safe_dump(raw))
    return str(root / "job.yaml")


def committed_files(root) -> dict[str, bytes]:
    """Every committed file under `root` (:data:`COMMITTED`): relative path -> bytes."""
    out = {}
    for pattern in COMMITTED:
        for path in sorted(p for p in glob.glob(str(root / pattern)) if os.path.isfile(p)):
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def processes():
    """(pid, stat fields after the command name, cmdline bytes) of every live entry of /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:  # ended meanwhile
            continue
        yield int(name), stat[stat.rindex(")") + 2:].split(), cmdline


def raylet_of(pid: int) -> tuple[int, int] | None:
    """(pid, start) of the raylet the driver `pid` started, if it has one yet."""
    for child, fields, cmdline in processes():
        if int(fields[1]) == pid and b"raylet/raylet" in cmdline:
            return child, _start_ticks(child)
    return None


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 600, poll_s: float = 0.01) -> bool:
    """Whether `path` appears before `proc` ends (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    return False
