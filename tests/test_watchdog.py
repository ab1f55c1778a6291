"""The stall detector: a stage that makes no progress for job.stall_timeout_s fails with a clear
message and exit 1 (a scheduler retries, the retry resumes) instead of waiting forever; progress
(committed parts, batches, finished Ray tasks) keeps it alive."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.errors import StallError, exit_code_for, one_line
from pipeline.stage import Stage, StageContext, run_stage
from pipeline.storage import Store
from pipeline.testing import make_config
from pipeline.watchdog import Watchdog, beat


def test_a_stage_blocked_forever_fails_within_the_timeout_naming_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(StallError) as info:
        with Watchdog("embed", 0.5, describe=lambda: "2 alive node(s), CPU 0 free of 2"):
            beat("embedded batches from the actor pool (3 shard(s) pending)")
            threading.Event().wait()  # blocks in C until a signal arrives
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "stage embed made no progress for" in message and "job.stall_timeout_s=0.5" in message
    assert "waiting for embedded batches from the actor pool (3 shard(s) pending)" in message
    assert "CPU 0 free of 2" in message
    # exit 1: the one code a scheduler retries
    assert exit_code_for(info.value) == 1 and one_line(info.value).startswith("StallError: stage embed")


def test_progress_keeps_a_slow_stage_alive():
    with Watchdog("graph", 0.6) as dog:
        for _ in range(12):  # 1.2 s in all, never 0.6 s without progress
            time.sleep(0.1)
            beat()
    assert dog.error is None and dog.beats == 12
    with Watchdog("graph", None):  # null = wait forever: no thread at all
        time.sleep(0.05)


def test_a_stage_in_another_thread_is_stopped_too():
    errors = []

    def stage():
        try:
            with Watchdog("write", 0.4):
                while True:
                    time.sleep(0.01)
        except StallError as err:
            errors.append(err)

    worker = threading.Thread(target=stage)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1 and "stage write made no progress" in str(errors[0])


def test_run_stage_fails_a_stage_waiting_for_resources_that_never_come(ray_local, tmp_path):
    """A Ray task that needs a GPU the cluster has not: ray.get waits forever (what a starved
    actor pool looks like to a driver). The stage gets the stall error; a stage whose tasks keep
    finishing does not."""
    import ray

    from pipeline.runtime import as_completed

    cfg = make_config(str(tmp_path / "work"), str(tmp_path / "none.tar"), job={"stall_timeout_s": 3})

    def blocked(cfg, store, ctx):
        return ray.get(ray.remote(num_gpus=1)(lambda: 1).remote())

    def pause(seconds):  # defined here: Ray ships it by value (workers cannot import test modules)
        time.sleep(seconds)

    def steady(cfg, store, ctx):
        task = ray.remote(num_cpus=1)(pause)
        return {"done": len(list(as_completed([task.remote(0.8) for _ in range(8)])))}  # ~3.2 s on 2 CPUs

    ctx = StageContext(fingerprint="f", fingerprints={"embed": "f"})
    with pytest.raises(StallError, match=r"stage embed made no progress .*waiting for its first step"):
        run_stage(Stage("embed", (), lambda c: {}, blocked), cfg, Store(), ctx)
    stats, ran = run_stage(Stage("embed", (), lambda c: {}, steady), cfg.model_copy(update={"workdir": str(tmp_path / "w2")}),
                           Store(), ctx)
    assert ran and stats == {"done": 8}
