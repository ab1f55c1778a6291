"""What a user sees in a terminal: logs on stderr with timestamps, the job summary on stdout (and
nothing else there, so a script can read it)."""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_d2prune", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._d2prune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def print_summary(summary: dict[str, Any], out=None) -> None:
    """The summary of :func:`pipeline.job.run_job`, as the closing lines of a run."""
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
