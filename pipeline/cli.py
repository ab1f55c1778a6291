"""``d2prune``: the whole job (or one stage) from one YAML config.

    d2prune run CONFIG [--set key=value ...] [--force-from STAGE] [--address ADDR]
    d2prune embed|graph|select|write CONFIG [--set key=value ...] [--force] [--address ADDR]
    d2prune demo [--out DIR] [--quick]
    d2prune report WORKDIR

Committed stages are skipped (and said so); a stage committed with other settings is refused
(exit 3) unless ``--force-from`` names it or an earlier stage, which recomputes it and everything
after it. Logs go to stderr with timestamps; the summary goes to stdout.

Exit codes, for schedulers: 0 done; 1 the job failed (retrying may help); 2 bad config or
arguments (fix the config); 3 committed output was made with other settings (rerun with
--force-from STAGE or use another workdir); 130 interrupted. Every non-zero exit prints one line
``d2prune: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Any, Callable

from .config import STAGES, ConfigError, JobConfig, load_config
from .storage import Store, join

log = logging.getLogger("d2prune")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STALE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


def _stage_fn(stage: str) -> Callable[[JobConfig, Store], dict[str, Any]]:
    # imported lazily: `d2prune select` should not pay for torch/open_clip imports
    if stage == "embed":
        from .embed import run_embed_stage

        return run_embed_stage
    if stage == "graph":
        from .graph import run_graph_stage

        return run_graph_stage
    if stage == "select":
        from .coordinator import run_select_stage

        return run_select_stage
    if stage == "write":
        from .write import run_write_stage

        return run_write_stage
    raise UsageError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_d2prune", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._d2prune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def prepare(config: str, overrides: list[str] | None, address: str | None) -> tuple[JobConfig, Store]:
    cfg = load_config(config, overrides)
    if address:
        cfg.ray.address = address
    from .coordinator import check_select_settings

    check_select_settings(cfg)
    return cfg, Store(cfg.storage)


def force_from(cfg: JobConfig, store: Store, stage: str) -> None:
    """Remove the output of `stage` and of every later stage (and the written shards)."""
    from . import workdir

    if stage not in STAGES:
        raise UsageError(f"--force-from {stage!r}: stages are {', '.join(STAGES)}")
    for later in STAGES[STAGES.index(stage):]:
        log.info("--force-from %s: removing %s", stage, workdir.stage_dir(cfg, later))
        workdir.clear_stage(store, cfg, later)
    from .write import clear_output

    log.info("--force-from %s: removing the written shards under %s", stage, cfg.output.url)
    clear_output(store, cfg)


def run_stages(cfg: JobConfig, store: Store, stages: list[str]) -> dict[str, Any]:
    """Run `stages` in order, skipping committed ones; stats and seconds per stage."""
    from . import workdir

    # Refuse stale output up front (before hours of embedding), naming the first stale stage.
    last = max(STAGES.index(s) for s in stages)
    for stage in STAGES[: last + 1]:
        workdir.is_committed(store, cfg, stage)
    results: dict[str, Any] = {"stats": {}, "seconds": {}, "skipped": []}
    for stage in stages:
        if workdir.is_committed(store, cfg, stage) and not (stage == "write" and _write_outputs_missing(store, cfg)):
            log.info("stage %s: already committed in %s, skipping", stage, workdir.stage_dir(cfg, stage))
            results["skipped"].append(stage)
            results["stats"][stage] = store.read_json(join(workdir.stage_dir(cfg, stage), "_stats.json"))
            results["seconds"][stage] = 0.0
            continue
        log.info("stage %s: starting", stage)
        t0 = time.perf_counter()
        results["stats"][stage] = _stage_fn(stage)(cfg, store)
        results["seconds"][stage] = round(time.perf_counter() - t0, 3)
        log.info("stage %s: done in %.1f s", stage, results["seconds"][stage])
    return results


def _write_outputs_missing(store: Store, cfg: JobConfig) -> bool:
    # the same test as the write stage's own resume check (metadata and tar of every shard)
    from . import workdir
    from .write import missing_shards

    stats = store.read_json(join(workdir.stage_dir(cfg, "write"), "_stats.json"))
    return bool(missing_shards(store, cfg, int(stats.get("output_shards", 0))))


def summarize(cfg: JobConfig, store: Store, results: dict[str, Any]) -> dict[str, Any]:
    """Samples in, kept, dropped by reason, seconds per stage, where the output is."""
    from . import workdir

    def stats_of(stage: str) -> dict[str, Any] | None:
        if stage in results["stats"]:
            return results["stats"][stage]
        url = join(workdir.stage_dir(cfg, stage), "_stats.json")
        return store.read_json(url) if store.exists(url) else None

    embed, select, write = stats_of("embed"), stats_of("select"), stats_of("write")
    dropped: dict[str, int] = {}
    samples_in = None
    if embed:
        skipped = {f"unreadable: {k}": int(v) for k, v in (embed.get("skipped") or {}).items()}
        dropped.update(skipped)
        if embed.get("samples") is not None:
            samples_in = int(embed["samples"]) + sum(skipped.values())
    if select:
        if select.get("prefiltered"):
            dropped[f"pre-filter (lowest {cfg.select.beta:g} of scores)"] = int(select["prefiltered"])
        dropped[f"pruned by {select.get('method')}"] = int(select.get("pruned", 0))
    summary = {
        "samples_in": samples_in,
        "kept": (write or {}).get("samples_written", (select or {}).get("selected")),
        "dropped": dropped,
        "seconds": results["seconds"],
        "skipped_stages": results["skipped"],
        "output": (write or {}).get("shards_url"),
        "selection": join(workdir.stage_dir(cfg, "select"), "selected.parquet") if select else None,
        "overlap_with_exact": (select or {}).get("overlap_with_exact"),
    }
    return summary


def print_summary(summary: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print("d2prune summary", file=out)
    print(f"  samples in : {summary['samples_in'] if summary['samples_in'] is not None else 'n/a'}", file=out)
    print(f"  kept       : {summary['kept'] if summary['kept'] is not None else 'n/a'}", file=out)
    for reason, count in summary["dropped"].items():
        print(f"  dropped    : {count} ({reason})", file=out)
    for stage, seconds in summary["seconds"].items():
        note = " (already committed, skipped)" if stage in summary["skipped_stages"] else ""
        print(f"  {stage:<11}: {seconds:.1f} s{note}", file=out)
    if summary.get("overlap_with_exact") is not None:
        print(f"  overlap with exact global greedy: {summary['overlap_with_exact']:.4f}", file=out)
    if summary["selection"]:
        print(f"  selection  : {summary['selection']}", file=out)
    if summary["output"]:
        print(f"  output     : {summary['output']}", file=out)


def run_job(config: str, overrides: list[str] | None = None, force: str | None = None,
            address: str | None = None, stages: list[str] | None = None) -> dict[str, Any]:
    """The job as a function (the CLI and jobs/filter_pool.py call it); raises on failure."""
    cfg, store = prepare(config, overrides, address)
    if force:
        force_from(cfg, store, force)
    results = run_stages(cfg, store, stages or list(STAGES))
    return summarize(cfg, store, results)


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def _innermost(err: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError.cause) and explicit chaining."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and cause is not err:
            err = cause
        elif err.__cause__ is not None and type(err).__module__.startswith("ray"):
            err = err.__cause__
        else:
            break
    return err


def _one_line(err: BaseException) -> str:
    """A one-line reason: the original exception's type and first line (config errors: every key)."""
    if isinstance(err, ConfigError):
        return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    inner = _innermost(err)
    lines = [line for line in str(inner).splitlines() if line.strip()]
    if type(inner).__module__.startswith("ray") and len(lines) > 1:
        # a remote traceback as text: its last "SomeError: message" line is the cause
        found = [m for m in map(_EXC_LINE.match, lines) if m and not m.group(1).startswith("ray.")]
        if found:
            return f"{found[-1].group(1)}: {found[-1].group(2).strip()}"
    name = type(inner).__name__
    return f"{name}: {lines[0].strip()}" if lines else name


def exit_code_for(err: BaseException) -> int:
    from .workdir import StaleStageError

    if isinstance(err, (ConfigError, UsageError)):
        return EXIT_CONFIG
    if isinstance(err, StaleStageError):
        return EXIT_STALE
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    inner = _innermost(err)  # e.g. the error inside a Ray task
    if inner is not err:
        return exit_code_for(inner)
    return EXIT_FAILED


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
    run.add_argument("--force-from", choices=STAGES, default=None,
                     help="recompute this stage and every later one")
    for stage in STAGES:
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
            summary = run_job(args.config, args.overrides, args.force_from, args.address)
            print_summary(summary)
        elif args.command in STAGES:
            summary = run_job(args.config, args.overrides, args.command if args.force else None,
                              args.address, stages=[args.command])
            print_summary(summary)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, quick=args.quick)  # prints its table and the report's path
        elif args.command == "report":
            from .report import build_report

            store = Store(load_config(args.config).storage) if args.config else Store()
            print(build_report(args.workdir, store))
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure becomes an exit code
        code = exit_code_for(err)
        if args.verbose:
            log.error("d2prune %s failed", args.command, exc_info=err)
        elif code == EXIT_FAILED:
            log.error("d2prune %s failed (run with -v for the traceback)", args.command)
        print(f"d2prune: error: {_one_line(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
