"""One resumable step runner: the tasks of a step whose output is missing run (as Ray tasks, or
in this process), in parallel, with one progress line per step.

Every stage is a few steps of many small tasks ("bucket every part by uid", "search every cell
group", "write every output shard"). Each task commits one file last (its *output*); a task whose
output is already committed is not run again, so a stage killed anywhere and started again redoes
only its unfinished tasks. A step says what one task needs from the cluster (:class:`Resources`),
so the scheduler (Ray) packs the tasks; the step never schedules anything itself.

::

    step = Step("graph.assign", tasks.assign_unit, calls=[(store, layout, u) for u in units],
                outputs=[layout.assign(u) for u in units], resources=Resources(cpus=1))
    results = run_step(step, store)            # None for the tasks that were already done

    started = start_step(step, store)          # submitted now, to overlap with what follows
    ...
    results = started.wait()                   # len(started.todo): the tasks that ran

Progress (:class:`Progress`): ``done/total``, rate and ETA; a bar redrawn in place on a terminal,
plain log lines (the start, at most one per ``LOG_EVERY_S`` seconds, and the end) in a log.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from . import watchdog
from .runtime import as_completed

log = logging.getLogger(__name__)

# seconds between two progress lines in a log (a terminal's bar is redrawn at most 4 times a second)
LOG_EVERY_S = 30.0
# outputs of one step in one folder from which the folder is listed once instead of asking for
# each file (an object store answers a listing of 1000 names in one request, an exists in one each)
LIST_FROM = 8


@dataclass(frozen=True)
class Resources:
    """What one task of a step reserves on the cluster: CPUs (0 for a task that runs while other
    work holds the CPUs, e.g. the select stage's outputs while its workers wait) and memory in
    bytes (None: no reservation; a task whose memory grows with its input declares it, so a node
    runs no more of them at once than its memory holds)."""

    cpus: float = 1.0
    memory: int | None = None

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus}
        if self.memory:
            options["memory"] = int(self.memory)
        return options


@dataclass
class Step:
    """A step: ``fn(*args)`` for each ``args`` of ``calls``.

    ``outputs[i]`` is the file task i commits last (None: no output, always run; ``outputs``
    None: no task has one); a task whose output exists is skipped (``exists(url)`` when given,
    else the store's, listing a folder once where many outputs share it). ``on_result(i, result)``
    runs in the driver as each task finishes (completion order), e.g. to report a committed part.
    ``unit`` names the tasks in the progress line ("parts", "groups").
    """

    name: str
    fn: Callable[..., Any]
    calls: Sequence[tuple]
    outputs: Sequence[str | None] | None = None
    resources: Resources = field(default_factory=Resources)
    exists: Callable[[str], bool] | None = None
    on_result: Callable[[int, Any], None] | None = None
    unit: str = "tasks"

    def todo(self, store) -> list[int]:
        """Indices of the tasks whose output is not committed yet."""
        if self.outputs is None:
            return list(range(len(self.calls)))
        if len(self.outputs) != len(self.calls):
            raise ValueError(f"step {self.name}: {len(self.outputs)} outputs for {len(self.calls)} tasks")
        exists = self.exists or _existing(store, [u for u in self.outputs if u is not None])
        return [i for i, url in enumerate(self.outputs) if url is None or not exists(url)]


def _existing(store, urls: list[str]) -> Callable[[str], bool]:
    """``url -> committed?`` for `urls`: one listing per folder holding LIST_FROM of them or more,
    else the store's exists."""
    per_folder: dict[str, int] = defaultdict(int)
    for url in urls:
        per_folder[url.rpartition("/")[0]] += 1
    listed = {folder: set(store.ls(folder)) for folder, count in per_folder.items() if count >= LIST_FROM}

    def exists(url: str) -> bool:
        folder, _, name = url.rpartition("/")
        return name in listed[folder] if folder in listed else store.exists(url)

    return exists


class Progress:
    """``name: done/total unit (rate/s, ETA)`` — a bar on a terminal, a log line elsewhere."""

    def __init__(self, name: str, total: int, unit: str = "tasks", skipped: int = 0, stream=None,
                 interval_s: float | None = None):
        self.name, self.total, self.unit, self.skipped = name, total, unit, skipped
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval_s if interval_s is not None else (0.25 if self.tty else LOG_EVERY_S)
        self.done = 0
        self.start = time.perf_counter()
        self._shown = -math.inf

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.name}: {self.done}/{self.total} {self.unit}"
        if self.skipped:
            text += f" (+{self.skipped} done before)"
        if self.done and self.done < self.total:
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            text += f", {rate:.3g}/s, ETA {_duration(eta)}"
        elif self.done >= self.total:
            text += f" in {_duration(elapsed)}"
        return text

    def show(self) -> None:
        """The line now (the start: a user sees at once how many tasks a step has)."""
        self._shown = time.perf_counter()
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.line()}\x1b[K")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info("%s", self.line())

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.total or time.perf_counter() - self._shown >= self.interval:
            self.show()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_step(step: Step, store, use_ray: bool = True, actors: Sequence | None = None) -> list[Any]:
    """Run the step's missing tasks; their results in call order (None where a task was already
    done). In this process when ``use_ray`` is false (small pools, tests), else as Ray tasks, or
    with ``actors`` as calls of their ``run_task`` (:func:`_on_actors`)."""
    return start_step(step, store, use_ray, actors).wait()


def start_step(step: Step, store, use_ray: bool = True, actors: Sequence | None = None) -> "StartedStep":
    """Submit the step's missing tasks now (as Ray tasks; in this process they run in
    :meth:`StartedStep.wait`), so that the driver can go on with other steps meanwhile."""
    return StartedStep(step, step.todo(store), use_ray, actors)


class StartedStep:
    """A step whose missing tasks (``todo``: their indices) are submitted; :meth:`wait` collects
    their results (what :func:`run_step` returns)."""

    def __init__(self, step: Step, todo: list[int], use_ray: bool, actors: Sequence | None = None):
        self.step, self.todo = step, todo
        self._finished = _execute(step, todo, use_ray, actors) if todo else iter(())

    def wait(self) -> list[Any]:
        step = self.step
        results: list[Any] = [None] * len(step.calls)
        if not self.todo:
            return results
        progress = Progress(step.name, len(self.todo), step.unit, skipped=len(step.calls) - len(self.todo))
        progress.show()
        for i, value in self._finished:
            results[i] = value
            if step.on_result is not None:
                step.on_result(i, value)
            watchdog.beat(f"the next task of step {step.name} ({progress.done + 1} of {len(self.todo)} done)")
            progress.advance()
        return results


def _execute(step: Step, todo: list[int], use_ray: bool, actors: Sequence | None = None) -> Iterator[tuple[int, Any]]:
    """(index, result) of each task of `todo`, in completion order; Ray tasks are submitted before
    this returns."""
    if not use_ray:
        return ((i, step.fn(*step.calls[i])) for i in todo)
    if actors:
        return _on_actors(step, todo, actors)
    import ray

    # named after the step: Ray's dashboard, `ray list tasks` and the worker's process title say
    # "graph.search", not the wrapper's name (memory samplers and operators find the step by it)
    remote = ray.remote(**step.resources.ray_options())(_indexed).options(name=step.name)
    return as_completed([remote.remote(step.fn, i, *step.calls[i]) for i in todo])


def _on_actors(step: Step, todo: list[int], actors: Sequence) -> Iterator[tuple[int, Any]]:
    """The tasks as ``actor.run_task(fn, i, *args)`` calls on live actors whose processes have
    already imported what the tasks need (Ray's ActorPool: one call per idle actor, the next as
    one finishes). Why: a step of short tasks after a stage's workers hold the CPUs otherwise makes
    Ray start a fresh worker process per CPU and import the pipeline in each (seconds per process,
    more than the select stage's outputs and decisions take to compute at 10^6 nodes). The actors'
    CPUs are already reserved, so the step's own resources are not asked for again."""
    from ray.util import ActorPool

    pool = ActorPool(list(actors))
    for i in todo:  # the first len(actors) start now, the others queue in the pool
        pool.submit(lambda actor, i: actor.run_task.options(name=step.name).remote(step.fn, i, *step.calls[i]), i)

    def finished() -> Iterator[tuple[int, Any]]:
        done = 0
        while pool.has_next():
            result = pool.get_next_unordered()
            done += 1
            watchdog.beat(f"the next of {len(todo)} calls of {step.name} on {len(actors)} actors ({done} done)")
            yield result

    return finished()


def _indexed(fn, i, *args):
    return i, fn(*args)


__all__ = ["LOG_EVERY_S", "Progress", "Resources", "StartedStep", "Step", "run_step", "start_step"]
