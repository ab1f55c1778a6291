"""One job per work directory (pipeline/lease.py): a second job refuses naming the holder (exit 5),
a stale lease is taken over, racers for a free lease never both win (local, S3 with conditional
writes, S3 through the read-back fallback), a lease taken over is noticed, and the job runner holds
the lease for the whole job and releases it also on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import lease as leases
from pipeline.cli import main
from pipeline.errors import EXIT_BUSY, LeaseHeldError
from pipeline.job import run_job
from pipeline.lease import LeaseLostError, acquire, holder
from pipeline.storage import Store, join


def _stale_record(**extra) -> dict:
    return {"token": "dead", "host": "elsewhere", "boot_id": "b", "pid_namespace": "1", "pid": 1,
            "started_at": time.time() - 5000, "heartbeat_at": time.time() - 1000, "timeout_s": 300.0, **extra}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return Store(), str(tmp_path / "work")
    s3_store = request.getfixturevalue("s3_store")
    bucket = request.getfixturevalue("s3_bucket")
    return s3_store, f"{bucket}/lease-{request.node.name.replace('[', '-').strip(']')}-{time.time_ns()}"


def test_second_job_refused_naming_the_holder_then_free_after_release(where):
    store, workdir = where
    held = acquire(store, workdir, {"command": "d2prune run job.yaml"}, settle_s=0.2)
    try:
        record = holder(store, workdir)
        assert record["pid"] == os.getpid() and record["command"] == "d2prune run job.yaml"
        with pytest.raises(LeaseHeldError) as err:
            acquire(store, workdir, settle_s=0.2)
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and "since" in message and "d2prune run job.yaml" in message
    finally:
        held.release()
    assert holder(store, workdir) is None
    acquire(store, workdir, settle_s=0.2, heartbeat=False).release()


def test_stale_lease_is_taken_over(where):
    store, workdir = where
    leases._Backend(store, workdir).write(_stale_record(), None, exists=False)
    assert holder(store, workdir) is None  # its heartbeat is older than its timeout
    taken = acquire(store, workdir, settle_s=0.2, heartbeat=False)
    assert holder(store, workdir)["token"] == taken.token
    taken.release()


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional-writes", "read-back-only"])
def test_racers_for_a_stale_lease_never_both_win(where, conditional):
    store, workdir = where
    leases._Backend(store, workdir).write(_stale_record(), None, exists=False)
    winners, refused, barrier = [], [], threading.Barrier(6)

    def race():
        barrier.wait()
        try:
            winners.append(acquire(store, workdir, settle_s=1.0, conditional=conditional, heartbeat=False))
        except LeaseHeldError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) <= 1 and len(winners) + len(refused) == 6
    if winners:
        assert holder(store, workdir)["token"] == winners[0].token
        winners[0].release()


def test_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(tmp_path):
    store, workdir = Store(), str(tmp_path / "work")
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.lease import acquire; "
            "from pipeline.storage import Store; acquire(Store(), sys.argv[2]); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, os.getcwd(), workdir], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(store, workdir)["pid"] == proc.pid
        with pytest.raises(LeaseHeldError, match=f"pid {proc.pid}"):
            acquire(store, workdir, heartbeat=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(store, workdir) is None  # same machine, its process is gone: no need to wait 300 s
    acquire(store, workdir, heartbeat=False).release()


def test_taken_over_lease_is_noticed_at_the_next_heartbeat(where):
    store, workdir = where
    mine = acquire(store, workdir, settle_s=0.2, heartbeat=False)
    # another job took it over (ours looked stale to it): its record replaces ours
    backend = leases._Backend(store, workdir)
    _, version = backend.read()
    backend.write(dict(_stale_record(), token="theirs", heartbeat_at=time.time()), version, exists=True)
    with pytest.raises(LeaseLostError, match="taken over"):
        mine.renew()
    with pytest.raises(LeaseLostError):
        mine.check()
    mine.release()  # a lost lease is not released: the record stays the other job's
    assert holder(store, workdir)["token"] == "theirs"


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    store, workdir = Store(), str(tmp_path / "work")
    held = acquire(store, workdir, timeout_s=2.0, heartbeat_s=0.2)
    try:
        first = holder(store, workdir)["heartbeat_at"]
        time.sleep(1.0)
        assert holder(store, workdir)["heartbeat_at"] > first
    finally:
        held.release()


def _config(tmp_path, pool) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(f"workdir: {tmp_path / 'work'}\ninput: {{shards: {pool.shards}}}\noutput: {{url: {tmp_path / 'out'}}}\n"
                    "embed: {torch_threads: 1}\n")
    return str(path)


def test_a_second_job_on_a_busy_workdir_exits_5_before_any_write(tmp_path, small_pool, capsys):
    config = _config(tmp_path, small_pool)
    other = acquire(Store(), str(tmp_path / "work"), {"command": "d2prune run other.yaml"})
    try:
        assert main(["run", config]) == EXIT_BUSY
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("d2prune: error:") and "in use by another job" in err and "other.yaml" in err
        assert sorted(os.listdir(tmp_path / "work")) == ["_LEASE.json", "_LEASE.lock"]  # the other job's only
        assert main(["lease", config]) == EXIT_BUSY
        assert "held by host" in capsys.readouterr().out
    finally:
        other.release()
    assert main(["lease", config]) == 0
    assert capsys.readouterr().out.strip().endswith(": free")


def test_job_releases_the_lease_when_it_fails(tmp_path, small_pool):
    config = _config(tmp_path, small_pool)
    with pytest.raises(Exception, match="committed graph stage"):
        run_job(config, stages=["select"])  # fails (exit 4) inside the lease
    assert holder(Store(), str(tmp_path / "work")) is None
    assert not os.path.exists(join(str(tmp_path / "work"), leases.LEASE))
