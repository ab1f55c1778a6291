import io
import logging
import os

import pytest

from pipeline import steps
from pipeline.steps import LIST_FROM, Progress, Resources, Step, run_step, start_step
from pipeline.storage import Store


def _write(store: Store, url: str, text: str) -> str:
    store.write_bytes(url, text.encode())
    return text


def _square(x: int) -> int:
    return x * x


def test_resources_become_ray_options():
    assert Resources().ray_options() == {"num_cpus": 1.0}
    assert Resources(cpus=0).ray_options() == {"num_cpus": 0}
    assert Resources(cpus=2, memory=3 * 2**20).ray_options() == {"num_cpus": 2, "memory": 3 * 2**20}


@pytest.mark.parametrize("many", [False, True])  # few outputs: one exists each; many: one listing
def test_committed_outputs_are_skipped_and_results_come_in_call_order(tmp_path, many):
    store = Store()
    n = LIST_FROM + 2 if many else 3
    urls = [str(tmp_path / f"out-{i}.txt") for i in range(n)]
    _write(store, urls[1], "old")
    seen = []
    step = Step("demo.write", _write, [(store, u, f"new-{i}") for i, u in enumerate(urls)], outputs=urls,
                on_result=lambda i, value: seen.append((i, value)))
    assert step.todo(store) == [i for i in range(n) if i != 1]
    results = run_step(step, store, use_ray=False)
    assert results == [None if i == 1 else f"new-{i}" for i in range(n)]
    assert sorted(seen) == [(i, f"new-{i}") for i in range(n) if i != 1]
    assert open(urls[1]).read() == "old"  # committed before: not run again
    assert run_step(step, store, use_ray=False) == [None] * n  # a resumed step with nothing left


def test_tasks_without_outputs_always_run_and_a_custom_exists_decides():
    step = Step("demo.square", _square, [(i,) for i in range(4)])
    assert run_step(step, Store(), use_ray=False) == [0, 1, 4, 9]
    step = Step("demo.square", _square, [(i,) for i in range(4)], outputs=["a", None, "c", "d"],
                exists=lambda url: url in ("a", "d"))
    assert run_step(step, Store(), use_ray=False) == [None, 1, 4, None]
    with pytest.raises(ValueError, match="2 outputs for 4 tasks"):
        Step("bad", _square, [(i,) for i in range(4)], outputs=["a", "b"]).todo(Store())


def test_a_started_step_says_what_it_runs_and_waits_for_it():
    started = start_step(Step("demo.square", _square, [(i,) for i in range(3)], outputs=["x", "y", "z"],
                              exists=lambda url: url == "y"), Store(), use_ray=False)
    assert started.todo == [0, 2]
    assert started.wait() == [0, None, 4]


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_counts_rate_and_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(steps.time, "perf_counter", clock)
    progress = Progress("graph.search", 10, "groups", skipped=2, stream=io.StringIO())
    assert progress.line() == "graph.search: 0/10 groups (+2 done before)"
    clock.now += 4
    progress.done = 2
    assert progress.line() == "graph.search: 2/10 groups (+2 done before), 0.5/s, ETA 16 s"
    clock.now += 600
    progress.done = 10
    assert progress.line() == "graph.search: 10/10 groups (+2 done before) in 10 min"


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(caplog):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress("embed.join", 4, "buckets", stream=tty, interval_s=0)
    bar.show()
    for _ in range(4):
        bar.advance()
    text = tty.getvalue()
    assert text.startswith("\r[........................] embed.join: 0/4 buckets")
    assert "\r[######------" not in text and "[########################] embed.join: 4/4 buckets in 0 s" in text
    assert text.endswith("\n")

    caplog.set_level(logging.INFO, logger="pipeline.steps")
    log = Progress("write.check", 3, "batches", stream=io.StringIO(), interval_s=3600)
    log.show()
    for _ in range(3):
        log.advance()  # the interval holds back the middle lines; the last is always shown
    assert [r.getMessage() for r in caplog.records] == ["write.check: 0/3 batches", "write.check: 3/3 batches in 0 s"]


def _resources_of_task(i: int) -> tuple[int, float]:
    import ray

    return os.getpid(), ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


def _name_of_task(i: int) -> tuple[str, str]:
    import ray

    with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:  # the worker's process title while it runs
        title = fh.read().split(b"\0")[0].decode()
    return ray.get_runtime_context().get_task_name(), title


@pytest.mark.slow
def test_ray_tasks_get_the_step_resources_and_results_in_call_order(tmp_path, ray_local):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    store = Store()
    urls = [str(tmp_path / f"out-{i}.txt") for i in range(5)]
    _write(store, urls[0], "old")
    results = run_step(Step("demo.write", _write, [(store, u, f"new-{i}") for i, u in enumerate(urls)],
                            outputs=urls), store)
    assert results == [None] + [f"new-{i}" for i in range(1, 5)]
    got = run_step(Step("demo.cpus", _resources_of_task, [(i,) for i in range(3)], resources=Resources(cpus=2)), store)
    assert [cpus for _, cpus in got] == [2.0, 2.0, 2.0]
    assert all(pid != os.getpid() for pid, _ in got)
    # each task is named after its step (dashboard, `ray list tasks`, `ps`), not after the wrapper
    named = run_step(Step("demo.named", _name_of_task, [(i,) for i in range(2)]), store)
    assert named == [("demo.named", "ray::demo.named")] * 2


class _Warm:
    """A stand-in for a stage's long-lived worker actor: it only runs tasks."""

    def run_task(self, fn, i, *args):
        return i, fn(*args)

    def pid(self):
        return os.getpid()


def _pid_after(seconds: float, fail: bool = False) -> int:
    import time

    time.sleep(seconds)
    if fail:
        raise ValueError("task failed on purpose")
    return os.getpid()


@pytest.mark.slow
def test_a_step_on_actors_runs_every_missing_task_on_their_processes(tmp_path, ray_local):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    ray = ray_local
    actors = [ray.remote(num_cpus=0)(_Warm).remote() for _ in range(2)]
    pids = set(ray.get([a.pid.remote() for a in actors]))
    store = Store()
    urls = [str(tmp_path / f"out-{i}.txt") for i in range(6)]
    _write(store, urls[2], "old")
    seen = []
    step = Step("demo.on_actors", _write, [(store, u, f"new-{i}") for i, u in enumerate(urls)], outputs=urls,
                on_result=lambda i, value: seen.append(i))
    results = run_step(step, store, actors=actors)
    # results in call order, the committed task skipped, every other one run once
    assert results == [f"new-{i}" if i != 2 else None for i in range(6)]
    assert sorted(seen) == [0, 1, 3, 4, 5]
    assert [store.read_bytes(u).decode() for u in urls] == [f"new-{i}" if i != 2 else "old" for i in range(6)]
    # the tasks ran on the actors' own processes (more tasks than actors: queued, not dropped),
    # both actors used when the first task is slower than the rest
    ran_on = run_step(Step("demo.pids", _pid_after, [(0.5 if i == 0 else 0.0,) for i in range(5)]), store,
                      actors=actors)
    assert set(ran_on) == pids
    # a failing task fails the step with its own error
    with pytest.raises(ValueError, match="failed on purpose"):
        run_step(Step("demo.fails", _pid_after, [(0.0, i == 1) for i in range(3)]), store, actors=actors)
