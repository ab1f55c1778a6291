"""The stage-level stall detector: a stage that commits nothing and makes no progress for
``job.stall_timeout_s`` fails with :class:`~pipeline.errors.StallError` (exit 1, so a scheduler
retries, and the retry resumes from the committed parts) instead of waiting forever.

Why a watchdog and not per-call timeouts: a Ray job can stop moving without any call failing
(an actor pool whose restarted actor took the CPU its readers needed waits for resources that
never come; a task queued for a GPU no autoscaler will add). Only "nothing has happened for T"
catches every such case, whatever the stage.

:func:`pipeline.stage.run_stage` runs every stage under one :class:`Watchdog`; progress reaches it
through :func:`beat` (``StageContext.part_committed``/``progress``, and every finished task of
:func:`pipeline.runtime.as_completed`), so no stage needs code of its own for it. Pure Python: no
Ray, no storage.

On a stall the watchdog interrupts the stage's thread (the main thread: a signal whose handler
raises, which also wakes blocking calls; another thread: an asynchronous exception) with a
KeyboardInterrupt subclass, the one exception Ray's blocking ``ray.get``/``ray.wait`` let through,
and turns it into the StallError when it leaves the stage. A
stage stuck in native code that never returns to Python is ended after a grace period with
``os._exit(1)`` and the same one-line reason on stderr, so a stall can never outlive the timeout
by more than that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from .errors import StallError

log = logging.getLogger(__name__)

_active: "Watchdog | None" = None
_lock = threading.Lock()


class _StallInterrupt(KeyboardInterrupt):
    """What interrupts a stalled stage (Ray's blocking calls swallow other exceptions raised by
    signal handlers); :class:`Watchdog` replaces it with the StallError on the way out."""


def beat(waiting_for: str | None = None) -> None:
    """Progress in the running stage (a no-op outside one). `waiting_for` says what the stage
    waits for next (named in the error when it never comes)."""
    dog = _active
    if dog is not None:
        dog.beat(waiting_for)


class Watchdog:
    """Fails `stage` when no :meth:`beat` came for `timeout_s` seconds (None: never)."""

    def __init__(self, stage: str, timeout_s: float | None, describe: Callable[[], str] | None = None,
                 grace_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.stage, self.timeout_s, self.describe, self.clock = stage, timeout_s, describe, clock
        # how long the interrupted stage may take to unwind before the process is ended
        self.grace_s = grace_s if grace_s is not None else min(300.0, max(30.0, (timeout_s or 0) / 4))
        self.waiting_for = "its first step"
        self.last = clock()
        self.beats = 0
        self.error: StallError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target = threading.get_ident()
        self._old_handler = None

    def beat(self, waiting_for: str | None = None) -> None:
        self.last = self.clock()
        self.beats += 1
        if waiting_for:
            self.waiting_for = waiting_for

    # -- the watching thread -----------------------------------------------------------------------
    def __enter__(self) -> "Watchdog":
        global _active
        if self.timeout_s is None:
            return self
        self._target = threading.get_ident()
        if self._target == threading.main_thread().ident:
            self._old_handler = signal.signal(signal.SIGUSR1, self._raise_in_main)
        with _lock:
            self._outer = _active
            _active = self
        self._thread = threading.Thread(target=self._watch, name=f"d2prune-watchdog-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _active
        if self._thread is None:
            return False
        with _lock:  # no interrupt is sent once the stage has returned
            self._stop.set()
        self._thread.join()
        with _lock:
            _active = self._outer
        if self._old_handler is not None:
            signal.signal(signal.SIGUSR1, self._old_handler)
        if self.error is not None and exc is not None:
            # the interrupt surfaced as a KeyboardInterrupt (Ray re-raises its own) or an error around it
            raise self.error from None
        return False

    def _message(self, idle: float) -> str:
        state = ""
        if self.describe is not None:
            try:
                state = f"; {self.describe()}"
            except Exception as err:  # noqa: BLE001 - a description must never hide the stall
                state = f"; (cluster state unavailable: {err})"
        return (f"stage {self.stage} made no progress for {idle:.0f} s (job.stall_timeout_s={self.timeout_s:g}): "
                f"it was waiting for {self.waiting_for}{state}. Rerun to resume from the committed parts "
                "(exit 1: a scheduler retries)")

    def _watch(self) -> None:
        period = max(0.05, min(5.0, self.timeout_s / 10))
        while not self._stop.wait(period):
            idle = self.clock() - self.last
            if idle >= self.timeout_s:
                with _lock:
                    if self._stop.is_set():
                        return
                    self.error = StallError(self._message(idle))
                    log.error("%s", self.error)
                    self._interrupt()
                if not self._stop.wait(self.grace_s):
                    # the stage never returned to Python: end the process with the same reason
                    print(f"d2prune: error: StallError: {self.error}", file=sys.stderr, flush=True)
                    os._exit(1)
                return

    def _interrupt(self) -> None:
        if self._old_handler is not None:  # the stage runs in the main thread
            signal.pthread_kill(self._target, signal.SIGUSR1)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(_StallInterrupt))

    def _raise_in_main(self, signum, frame) -> None:
        if self.error is not None:
            raise _StallInterrupt(str(self.error))
