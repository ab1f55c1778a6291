"""What a user sees in a terminal: logs on stderr with timestamps, the job summary on stdout (and
nothing else there, so a script can read it)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Any, Iterator


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_d2prune", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._d2prune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def stdout_for_summary_only() -> Iterator[Any]:
    """While the job runs, send everything written to file descriptor 1 to stderr and yield a
    stream on the real stdout for the summary alone.

    Why at the descriptor: C++ libraries (FAISS) print with printf, and Ray prints its workers'
    stdout lines on the driver's ``sys.stdout``; neither goes through Python logging. When stdout is
    not a real descriptor (pytest's capsys, a StringIO), there is nothing to protect: yield it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        yield sys.stdout
        return
    if fd != 1:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    summary = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        os.dup2(2, 1)
        yield summary
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        summary.close()


def print_summary(summary: dict[str, Any], out=None) -> None:
    """The summary of :func:`pipeline.job.run_job`, as the closing lines of a run."""
    out = out or sys.stdout
    print("d2prune summary", file=out)
    print(f"  samples in : {summary['samples_in'] if summary['samples_in'] is not None else 'n/a'}", file=out)
    print(f"  kept       : {summary['kept'] if summary['kept'] is not None else 'n/a'}", file=out)
    for reason, count in summary["dropped"].items():
        print(f"  dropped    : {count} ({reason})", file=out)
    if summary.get("missing_shards"):
        print(f"  missing    : {summary['missing_shards']} input shard(s) skipped (input.allow_missing_shards; "
              "named in the embed stage's _stats.json)", file=out)
    if summary.get("not_in_shards"):
        print(f"  not in the shards (failed downloads, not counted above): {summary['not_in_shards']}", file=out)
    for stage, seconds in summary["seconds"].items():
        note = " (already committed, skipped)" if stage in summary["skipped_stages"] else ""
        print(f"  {stage:<11}: {seconds:.1f} s{note}", file=out)
    if summary.get("overlap_with_exact") is not None:
        print(f"  overlap with exact global greedy: {summary['overlap_with_exact']:.4f}", file=out)
    if summary["selection"]:
        print(f"  selection  : {summary['selection']}", file=out)
    if summary["output"]:
        print(f"  output     : {summary['output']}", file=out)
    if summary.get("report"):
        print(f"  report     : {summary['report']}", file=out)
