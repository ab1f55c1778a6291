"""``d2prune``: the whole job (or one stage) from one YAML config.

    d2prune run CONFIG [--set key=value ...] [--force-from STAGE] [--address ADDR]
    d2prune embed|graph|select|write CONFIG [--set key=value ...] [--force] [--address ADDR]
    d2prune demo [--out DIR] [--quick]
    d2prune report WORKDIR [--config CONFIG]

Committed stages are skipped (and said so); a stage committed with other settings is refused
(exit 3) unless ``--force-from`` names it or an earlier stage, which recomputes it and everything
after it. Logs go to stderr with timestamps; the summary goes to stdout. Exit codes are
:mod:`pipeline.errors`' (0 done, 1 failed: retry resumes, 2 bad config or input, 3 stale output,
4 an earlier stage is missing, 130 interrupted); every non-zero exit prints one line
``d2prune: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .console import print_summary, setup_logging
from .errors import EXIT_FAILED, EXIT_OK, exit_code_for, one_line
from .job import STAGE_NAMES, run_job
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

    run = sub.add_parser("run", help="run embed -> graph -> select -> write, skipping committed stages")
    job_args(run)
    run.add_argument("--force-from", choices=STAGE_NAMES, default=None,
                     help="recompute this stage and every later one")
    for stage in STAGE_NAMES:
        p = sub.add_parser(stage, help=f"run only the {stage} stage")
        job_args(p)
        p.add_argument("--force", action="store_true", help="recompute this stage and every later one")
    demo = sub.add_parser("demo", help="make a small pool locally and run the whole job with a report")
    demo.add_argument("--out", default="d2prune-demo", help="directory for the demo pool, work dir and output")
    demo.add_argument("--quick", action="store_true", help="a smaller pool (about a minute)")
    report = sub.add_parser("report", help="rebuild the HTML report of a work directory")
    report.add_argument("workdir", help="work directory (local path or fsspec URL)")
    report.add_argument("--config", default=None, help="the job's config, for its storage settings (S3 endpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    setup_logging(args.verbose)
    try:
        if args.command == "run":
            print_summary(run_job(args.config, args.overrides, args.force_from, args.address))
        elif args.command in STAGE_NAMES:
            print_summary(run_job(args.config, args.overrides, args.command if args.force else None,
                                  args.address, stages=[args.command]))
        elif args.command == "demo":
            from .demo.run import run_demo

            run_demo(args.out, quick=args.quick)  # prints its table and the report's path
        elif args.command == "report":
            from .demo.report_section import demo_extras
            from .report import build_report

            cfg = load_config(args.config) if args.config else None
            store = Store(cfg.storage) if cfg else Store()
            print(build_report(args.workdir, store, demo_extras(store, args.workdir),
                               input_cfg=cfg.input if cfg else None))
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes an exit code
        code = exit_code_for(err)
        if args.verbose:
            log.error("d2prune %s failed", args.command, exc_info=err)
        elif code == EXIT_FAILED:
            log.error("d2prune %s failed (run with -v for the traceback)", args.command)
        print(f"d2prune: error: {one_line(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
