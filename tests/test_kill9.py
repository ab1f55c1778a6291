"""kill -9: a real ``d2prune run`` process is SIGKILLed inside every stage and at every stage
boundary, one kill per run, each run resuming what the previous one left; the last run finishes and
everything it committed is byte-identical to an uninterrupted run. Along the way: every rerun takes
over the dead run's lease at once (same machine, its process is gone), the killed run's Ray agents
do not outlive it, a second concurrent run refuses (exit 5), and stdout holds only the summary."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from pipeline.errors import EXIT_BUSY
from pipeline.job import run_job
from pipeline.reaper import instance_processes
from pipeline.testing import write_pool

from tiny_job import committed_files, raylet_of, wait_for, write_config  # tests/tiny_job.py (tests/ is on sys.path)

pytestmark = pytest.mark.slow

# (where, the file whose appearance times the kill): inside a stage = after it claimed its folder
# or committed a first part; at a boundary = right after its commit marker
KILL_POINTS = [
    ("inside embed", "work/embeddings/part-00000.parquet"),
    ("after embed", "work/embeddings/_SUCCESS.json"),
    ("inside graph", "work/graph/_FINGERPRINT.json"),
    ("after graph", "work/graph/_SUCCESS.json"),
    ("inside select", "work/selection/_FINGERPRINT.json"),
    ("after select", "work/selection/_SUCCESS.json"),
    ("inside write", "out/shards/00000.tar"),
]


def _start(config: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("kill9-pool")), n_shards=4, per_shard=20, seed=21, broken=True)


def test_kill_9_everywhere_then_the_same_output(tmp_path, pool, tiny_model_config, ray_local):
    """Over 60 s (108 s idle): eight `d2prune run` processes, each starting its own embedded Ray (one
    killed at each of the seven points, then the one that finishes), and the reference run."""
    reference_root = tmp_path / "reference"
    run_job(write_config(reference_root, pool.shards, tiny_model_config))
    reference = committed_files(reference_root)

    root = tmp_path / "killed"
    config = write_config(root, pool.shards, tiny_model_config)
    rayless = []
    for where, marker in KILL_POINTS:
        proc = _start(config)
        if where == KILL_POINTS[0][0]:
            # a second run while this one holds the workdir (frozen meanwhile, so it surely does)
            assert wait_for(str(root / "work" / "_LEASE.json"), proc, timeout=300)
            proc.send_signal(signal.SIGSTOP)
            try:
                second = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", config], capture_output=True,
                                        text=True, timeout=300)
            finally:
                proc.send_signal(signal.SIGCONT)
            assert second.returncode == EXIT_BUSY, second.stderr[-2000:]
            assert f"pid {proc.pid}" in second.stderr.strip().splitlines()[-1]
        appeared = wait_for(str(root / marker), proc)
        raylet = raylet_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert appeared, f"{where}: {marker} never appeared; the run ended with {proc.returncode}:\n{err[-3000:]}"
        assert proc.returncode == -signal.SIGKILL, where
        if raylet is None:
            rayless.append(where)
            continue
        # the killed driver's embedded Ray leaves nothing behind (raylet, agents, workers)
        deadline = time.monotonic() + 60
        while instance_processes(*raylet) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert instance_processes(*raylet) == [], f"{where}: processes of the killed run's Ray survive"
    assert len(rayless) < len(KILL_POINTS)  # most kills hit a running Ray

    final = _start(config)
    out, err = final.communicate(timeout=900)
    assert final.returncode == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert lines[0] == "d2prune summary" and all(line.startswith("  ") for line in lines[1:]), out  # nothing else
    assert committed_files(root) == reference
