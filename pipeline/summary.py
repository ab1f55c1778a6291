"""The job summary: one function from the stages' stats to what a user reads (the CLI's closing
lines, the report's summary table, the output folder's ``_stats.json``)."""

from __future__ import annotations

from typing import Any

# skip reasons that are not about unreadable data (the precomputed encoder's join by uid)
SKIP_LABELS = {"no_uid": "no uid to look up", "no_embedding": "not in the metadata",
               "bad_embedding": "unusable metadata vectors"}


def summarize(stats: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Samples in, kept, dropped by reason, where the output is, from each stage's ``_stats.json``
    (a stage not run yet is None)."""
    embed, select, write = stats.get("embed"), stats.get("select"), stats.get("write")
    dropped: dict[str, int] = {}
    samples_in = embedded = None
    if embed:
        skipped = {f"{SKIP_LABELS.get(k, 'unreadable')}: {k}": int(v) for k, v in (embed.get("skipped") or {}).items()}
        dropped.update(skipped)
        if embed.get("samples") is not None:
            embedded = int(embed["samples"])
            samples_in = embedded + sum(skipped.values())
    if select:
        basic = select.get("basic_filter") or {}
        for rule, count in (basic.get("dropped_by") or {}).items():
            if count:
                dropped[f"basic filter: {rule}"] = int(count)
        exact = (select.get("exact_duplicates") or {}).get("dropped")
        if exact:
            dropped["exact duplicates (same image bytes)"] = int(exact)
        for name, count in ((select.get("decontaminate") or {}).get("dropped_by_set") or {}).items():
            if count:
                dropped[f"copies of evaluation images: {name}"] = int(count)
        # prefiltered counts every pre-filter; prefiltered_beta is β's share (absent in older stats)
        beta = select.get("prefiltered_beta", select.get("prefiltered"))
        if beta:
            dropped[f"pre-filter (lowest {select.get('prefilter_beta', 0):g} of scores)"] = int(beta)
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
        "missing_shards": int((embed or {}).get("shards_missing") or 0),
        # metadata rows whose sample is in no input shard (failed downloads): not part of the pool
        "not_in_shards": (embed or {}).get("not_in_shards"),
    }
