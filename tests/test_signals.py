"""SIGTERM and SIGINT: what Kubernetes sends a preempted pod, Slurm a job at its time limit (to every
process of the job), ``ray job stop`` its entrypoint's process group, and ^C a terminal's foreground
group. A real ``d2prune run`` (and the Ray job entrypoint ``jobs/filter_pool.py``) gets a real
signal inside the embed, graph and select stages (parked there by ``tests/stop_point.py`` until the
signal comes, so it surely lands inside the stage), one stop per run, each run resuming what the
previous one left. Each stop: exit 128 + the signal (143, 130) within the stop deadline, one line
on stderr naming the signal and the stage, no C++ stack from Ray, the running stage not committed,
the workdir's lease released (so the next run starts at once), and nothing left of the job's
processes (its session: the driver, the embedded Ray's GCS, raylet, agents and workers). The last
run finishes, and everything committed is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pipeline.job import run_job
from pipeline.lease import LEASE, holder
from pipeline.reaper import instance_processes
from pipeline.runtime import STOP_GRACE_S
from pipeline.storage import Store
from pipeline.testing import write_pool
from pipeline.workdir import SUCCESS, stage_dir

from tiny_job import committed_files, processes, raylet_of, wait_for, write_config  # tests/tiny_job.py (tests/ is on sys.path)

pytestmark = pytest.mark.slow

TESTS = os.path.dirname(os.path.abspath(__file__))
# the real CLI / Ray job entrypoint, parked inside a stage until the signal comes (tests/stop_point.py)
PARKED = [sys.executable, os.path.join(TESTS, "stop_point.py")]
CLI = ["d2prune", "run"]
ENTRYPOINT = [os.path.join(os.path.dirname(TESTS), "jobs", "filter_pool.py")]

# (what it stands for, where the driver is when the signal comes, the signal, to the whole process
# group (else to the driver alone), the command)
STOPS = [
    ("a preempted pod: SIGTERM to the driver", "embed:part", signal.SIGTERM, False, CLI),
    ("^C in a terminal: SIGINT to the foreground group", "graph:step", signal.SIGINT, True, CLI),
    ("a Slurm time limit: SIGTERM to every process, of the Ray job entrypoint", "select:part", signal.SIGTERM,
     True, ENTRYPOINT),
]
LINE = re.compile(r"^d2prune: stopped by (SIG[A-Z]+)(?: during the (\w+) stage)?; rerun the same command to resume$")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("signals-pool")), n_shards=4, per_shard=20, seed=21, broken=True)


def _session(sid: int) -> list[str]:
    """Live (not zombie) processes of session `sid`: 'pid state command'."""
    return [f"{pid} {fields[0]} {_command(cmdline)}" for pid, fields, cmdline in processes()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X")]


def _command(cmdline: bytes) -> str:
    return cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]


def _gone_within(seconds: float, probe) -> list:
    deadline = time.monotonic() + seconds
    left = probe()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = probe()
    return left


def test_sigterm_and_sigint_stop_cleanly_and_resume(tmp_path, pool, tiny_model_config, ray_local):
    """Over 60 s (97 s idle) because it must be: a reference run, then a real job process per stop
    point, each starting its own embedded Ray, signalled, reaped and resumed."""
    reference_root = tmp_path / "reference"
    run_job(write_config(reference_root, pool.shards, tiny_model_config))
    reference = committed_files(reference_root)

    root = tmp_path / "stopped"
    config = write_config(root, pool.shards, tiny_model_config)
    work = str(root / "work")
    for n, (what, where, sig, group, command) in enumerate(STOPS):
        stage = where.split(":")[0]
        parked = str(tmp_path / f"parked-{n}")
        proc = subprocess.Popen(PARKED + [where, parked] + command + [config], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own session and group: the job's processes
        appeared = wait_for(parked, proc, poll_s=0.02)
        raylet = raylet_of(proc.pid)
        sent = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, sig)
        try:
            out, err = proc.communicate(timeout=STOP_GRACE_S + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{what}: still running {STOP_GRACE_S + 30:.0f} s after the signal:\n{err[-3000:]}")
        took = time.monotonic() - sent
        assert appeared, f"{what}: never reached {where}; the run ended with {proc.returncode}:\n{err[-3000:]}"
        assert raylet is not None, what  # its embedded Ray was running
        if n > 0:  # the previous run released its lease: this one did not have to take it over
            assert "taking over the stale lease" not in err and "already committed" in err, err[-3000:]

        # exit 128 + the signal, within the stop deadline, and one line saying so (no C++ stack from Ray)
        assert proc.returncode == 128 + sig, f"{what}: exit {proc.returncode}:\n{err[-3000:]}"
        assert took < STOP_GRACE_S, f"{what}: {took:.1f} s from the signal to the exit"
        lines = err.strip().splitlines()
        assert [line for line in lines if sig.name in line] == [lines[-1]], f"{what}:\n{err[-3000:]}"
        match = LINE.match(lines[-1])
        assert match and match.groups() == (sig.name, stage), lines[-1]
        assert "logging.cc" not in err and "*** SIG" not in err and "Traceback" not in err, f"{what}:\n{err[-3000:]}"
        assert out == "", what  # stdout holds only a summary, and there is none

        # the stage stopped without committing; the lease is released (not left to its 5-minute takeover)
        assert not os.path.exists(os.path.join(stage_dir(work, stage), SUCCESS)), what
        assert not os.path.exists(os.path.join(work, LEASE)) and holder(Store(), work) is None, what

        # nothing of the job is left: its session (driver, GCS, raylet, agents, workers), its Ray instance
        left = _gone_within(10, lambda: _session(proc.pid))
        assert left == [], f"{what}: the job's processes survive: {left}"
        assert _gone_within(10, lambda: instance_processes(*raylet)) == [], f"{what}: its Ray's processes survive"

    final = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", config], capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    assert final.stdout.splitlines()[0] == "d2prune summary"
    assert "stage graph: already committed" in final.stderr  # it resumed what the stopped runs committed
    assert committed_files(root) == reference
