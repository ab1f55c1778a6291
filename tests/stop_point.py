"""Run a d2prune command that parks at one point inside one stage until a signal comes (what
``tests/test_signals.py`` stops): the signal then surely lands while that stage runs, however fast
the stage is. Nothing else changes: the command is the real CLI (or the Ray job entrypoint),
with its real signal handling, Ray and storage.

    python tests/stop_point.py STAGE:POINT MARKER d2prune run CONFIG
    python tests/stop_point.py STAGE:POINT MARKER jobs/filter_pool.py CONFIG

POINT: ``part`` (the driver has just committed the stage's first part: its Ray tasks or actors may
still be working), ``step`` (an internal step of the stage was committed), ``claim`` (the stage has
claimed its folder and is about to run). There the driver's main thread writes MARKER and sleeps
(at most ``PARK_S``, then goes on).
"""

from __future__ import annotations

import os
import runpy
import sys
import time

PARK_S = 300.0


def _park(marker: str) -> None:
    with open(marker, "w") as fh:
        fh.write(str(os.getpid()))
    deadline = time.monotonic() + PARK_S
    while time.monotonic() < deadline:
        time.sleep(0.05)


def install(where: str, marker: str) -> None:
    from pipeline import stage as stage_module
    from pipeline import workdir

    target, point = where.split(":")
    parked = []

    def once() -> None:
        if not parked:
            parked.append(True)
            _park(marker)

    if point == "claim":
        claim = workdir.claim

        def claim_then_park(store, directory, fingerprint, stage):
            claim(store, directory, fingerprint, stage)
            if stage == target:
                once()

        workdir.claim = claim_then_park
    else:
        name = {"part": "part_committed", "step": "step_done"}[point]
        original = getattr(stage_module.StageContext, name)

        def then_park(self, stage, *args):
            original(self, stage, *args)
            if stage == target:
                once()

        setattr(stage_module.StageContext, name, then_park)


def main(argv: list[str]) -> int:
    where, marker, program, *args = argv
    install(where, marker)
    if program == "d2prune":
        from pipeline.cli import main as cli_main

        return cli_main(args)
    sys.argv = [program, *args]
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
