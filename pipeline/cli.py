"""``d2prune``: the whole job (or one stage) from one YAML config.

    d2prune run CONFIG [--set key=value ...] [--force-from STAGE] [--keep RATES] [--address ADDR]
    d2prune embed|graph|select|write CONFIG [--set key=value ...] [--force] [--address ADDR]
    d2prune select CONFIG --keep 0.1,0.2,0.3,0.5   # one subset_keep{rate}.npy per rate, one greedy run
    d2prune demo [--out DIR] [--quick]
    d2prune report WORKDIR [--config CONFIG]
    d2prune lease CONFIG                  # who holds the workdir: exit 0 free, 5 held
    d2prune verify CONFIG                 # every committed file intact? exit 0 yes, 3 (one line per damaged file) no

Committed stages are skipped (and said so); a stage committed with other settings is refused
(exit 3) unless ``--force-from`` names it or an earlier stage, which recomputes it and everything
after it. Logs go to stderr with timestamps; the summary goes to stdout. Exit codes are
:mod:`pipeline.errors`' (0 done, 1 failed: retry resumes, 2 bad config or input, 3 stale output,
4 an earlier stage is missing, 5 another job holds the workdir, 143/130 stopped by SIGTERM/SIGINT);
every non-zero exit prints one line ``d2prune: error: ...`` on stderr, a stop by a signal
``d2prune: stopped by SIGTERM during the embed stage; rerun the same command to resume``.

SIGTERM (a preempted pod, a Slurm time limit, ``ray job stop``) and SIGINT (^C) are handled alike
(:func:`pipeline.runtime.stop_signals`): the running stage stops at once (nothing half-written is
committed: every commit is an atomic rename or a single PUT), the workdir's lease is released, an
embedded Ray is shut down (a cluster joined with ``--address``/``RAY_ADDRESS`` is only disconnected
from), and a rerun of the same command resumes from what was committed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .console import print_summary, setup_logging, stdout_for_summary_only
from .errors import EXIT_BUSY, EXIT_FAILED, EXIT_OK, UsageError, exit_code_for, one_line
from .job import STAGE_NAMES, run_job
from .lease import acquire, describe, holder
from .runtime import finish_stop, stop_signals, stopped
from .storage import Store

log = logging.getLogger("d2prune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2prune", description="Distributed D2 Pruning for image-text pools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def job_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config (local path or fsspec URL)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set select.prune_rate=0.5 (repeatable)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")

    def keep_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keep", default=None, metavar="RATES",
                       help="keep fractions served by one selection, e.g. 0.1,0.2,0.3,0.5: sets select.keep_rates "
                       "(one subset_keep{rate}.npy each; D2's order is a prefix order)")

    run = sub.add_parser("run", help="run embed -> graph -> select -> write, skipping committed stages")
    job_args(run)
    keep_arg(run)
    run.add_argument("--force-from", choices=STAGE_NAMES, default=None,
                     help="recompute this stage and every later one")
    for stage in STAGE_NAMES:
        p = sub.add_parser(stage, help=f"run only the {stage} stage")
        job_args(p)
        if stage == "select":
            keep_arg(p)
        p.add_argument("--force", action="store_true", help="recompute this stage and every later one")
    demo = sub.add_parser("demo", help="make a small pool locally and run the whole job with a report")
    demo.add_argument("--out", default="d2prune-demo", help="directory for the demo pool, work dir and output")
    demo.add_argument("--quick", action="store_true", help="a smaller pool (about a minute)")
    report = sub.add_parser("report", help="rebuild the HTML report of a work directory")
    report.add_argument("workdir", help="work directory (local path or fsspec URL)")
    report.add_argument("--config", default=None, help="the job's config, for its storage settings (S3 endpoint)")
    lease = sub.add_parser("lease", help="who holds the job's workdir (exit 0 when free, 5 when held)")
    lease.add_argument("config", help="YAML config (local path or fsspec URL)")
    lease.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    verify = sub.add_parser("verify", help="check every committed file of the workdir and output against its "
                            "commit, changing nothing (exit 0 intact, 3 damaged: one line per file)")
    verify.add_argument("config", help="YAML config (local path or fsspec URL)")
    verify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def keep_override(text: str) -> str:
    """``--keep 0.1,0.2`` as the ``select.keep_rates`` override, checked as the config field is
    (fractions in (0, 1], no repeats) so that a typo is one clear line (exit 2)."""
    rates = []
    for item in text.split(","):
        try:
            rates.append(float(item))
        except ValueError:
            raise UsageError(f"--keep {text}: {item.strip()!r} is not a number (give fractions, e.g. 0.1,0.2,0.5)") \
                from None
    bad = [r for r in rates if not 0.0 < r <= 1.0]
    if bad:
        raise UsageError(f"--keep {text}: keep rates must lie in (0, 1], got {bad}")
    if len(set(rates)) != len(rates):
        raise UsageError(f"--keep {text}: keep rates repeat")
    return "select.keep_rates=[" + ",".join(repr(r) for r in rates) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    setup_logging(args.verbose)
    command = "d2prune " + " ".join(sys.argv[1:] if argv is None else argv)
    with stop_signals():
        try:
            return _run_command(args, command)
        except KeyboardInterrupt as err:  # a stop signal while the command reported its own error
            if stopped(err) is None:
                raise
            return _stop(args, err)


def _stop(args: argparse.Namespace, err: BaseException) -> int:
    """After SIGTERM / SIGINT: clean up (lease, Ray), one line, end the process with 128 + the
    signal (:func:`pipeline.runtime.finish_stop`; it does not return)."""
    stop = stopped(err)
    if args.verbose:
        log.info("d2prune %s stopped", args.command, exc_info=err)
    finish_stop(stop.code)


def _run_command(args: argparse.Namespace, command: str) -> int:
    try:
        if getattr(args, "keep", None) is not None:  # after the --set overrides: the flag wins
            args.overrides = args.overrides + [keep_override(args.keep)]
        if args.command == "run":
            with stdout_for_summary_only() as out:
                print_summary(run_job(args.config, args.overrides, args.force_from, args.address,
                                      command=command), out=out)
        elif args.command in STAGE_NAMES:
            with stdout_for_summary_only() as out:
                print_summary(run_job(args.config, args.overrides, args.command if args.force else None,
                                      args.address, stages=[args.command], command=command), out=out)
        elif args.command == "lease":
            cfg = load_config(args.config, args.overrides)
            record = holder(Store(cfg.storage), cfg.workdir)
            if record is None:
                print(f"{cfg.workdir}: free")
                return EXIT_OK
            print(f"{cfg.workdir}: held by {describe(record)}")
            return EXIT_BUSY
        elif args.command == "verify":
            from .verify import verify_command

            return verify_command(args.config, args.overrides)
        elif args.command == "demo":
            from .demo.run import run_demo

            run_demo(args.out, quick=args.quick)  # prints its table and the report's path
        elif args.command == "report":
            from .demo.report_section import demo_extras
            from .report import build_report

            cfg = load_config(args.config) if args.config else None
            store = Store(cfg.storage) if cfg else Store()
            with acquire(store, args.workdir, {"command": command}):  # it writes WORKDIR/report.html
                print(build_report(args.workdir, store, demo_extras(store, args.workdir),
                                   input_cfg=cfg.input if cfg else None))
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes an exit code
        if stopped(err) is not None:  # SIGTERM / SIGINT
            return _stop(args, err)
        code = exit_code_for(err)
        if args.verbose:
            log.error("d2prune %s failed", args.command, exc_info=err)
        elif code == EXIT_FAILED:
            log.error("d2prune %s failed (run with -v for the traceback)", args.command)
        print(f"d2prune: error: {one_line(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
