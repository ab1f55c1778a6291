"""The job summary: one function from the stages' stats to what a user reads (the CLI's closing
lines, the report's summary table, the output folder's ``_stats.json``)."""

from __future__ import annotations

from typing import Any


def summarize(stats: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Samples in, kept, dropped by reason, where the output is, from each stage's ``_stats.json``
    (a stage not run yet is None)."""
    embed, select, write = stats.get("embed"), stats.get("select"), stats.get("write")
    dropped: dict[str, int] = {}
    samples_in = embedded = None
    if embed:
        skipped = {f"unreadable: {k}": int(v) for k, v in (embed.get("skipped") or {}).items()}
        dropped.update(skipped)
        if embed.get("samples") is not None:
            embedded = int(embed["samples"])
            samples_in = embedded + sum(skipped.values())
    if select:
        if select.get("prefiltered"):
            dropped[f"pre-filter (lowest {select.get('prefilter_beta', 0):g} of scores)"] = int(select["prefiltered"])
        dropped[f"pruned by {select.get('method')}"] = int(select.get("pruned", 0))
    return {
        "samples_in": samples_in,
        "embedded": embedded,
        "kept": (write or {}).get("samples_written", (select or {}).get("selected")),
        "dropped": dropped,
        "method": (select or {}).get("method"),
        "budget": (select or {}).get("budget"),
        "output": (write or {}).get("shards_url"),
        "overlap_with_exact": (select or {}).get("overlap_with_exact"),
    }
