"""The demo measured against its ground truth: what each selection kept of what was planted.

Pure functions over the ground-truth table (``pool/ground_truth.parquet``, one row per uid) and
sets of kept uids; nothing here knows about Ray or the work directory layout.

Figures (each for D2 and for the baselines at the same budget):

* ``mismatches_dropped``: planted mismatched captions not kept / planted mismatches;
* ``mismatch_share_kept``: mismatched captions among the kept samples (the pool has ~10%);
* ``dup_groups_thinned``: near-duplicate groups with exactly one member kept / groups with at
  least one kept (a group dropped entirely is neither thinned nor redundant, so it is left out);
* ``redundant_copies_kept``: kept members beyond the first of each near-duplicate group;
* ``kinds_covered``: shape×colour kinds with at least one kept, correctly captioned picture / kinds
  in the pool (a picture kept with another picture's caption teaches nothing about its kind);
* ``fine_kinds_covered``: the same for shape×colour×texture;
* ``rare_kept``: kept correctly captioned pictures of the rare shape / colour, against the pool's.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

METRIC_LABELS = (
    ("kept", "samples kept"),
    ("mismatches_dropped", "planted mismatched captions dropped"),
    ("mismatch_share_kept", "mismatched captions among kept (pool: {pool_mismatch_share:.1%})"),
    ("dup_groups_thinned", "near-duplicate groups thinned to one"),
    ("redundant_copies_kept", "redundant near-duplicate copies kept"),
    ("kinds_covered", "shape x colour kinds covered"),
    ("fine_kinds_covered", "shape x colour x texture kinds covered"),
    ("rare_shape_kept", "rare shape ({rare_shape}) pictures kept"),
    ("rare_colour_kept", "rare colour ({rare_colour}) pictures kept"),
)


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def evaluate_selection(ground_truth, kept_uids: Iterable[str]) -> dict[str, Any]:
    """Ground-truth figures of one selection. `ground_truth` is a pyarrow table of the pool."""
    uids = _column(ground_truth, "uid").astype(str)
    kept_set = set(map(str, kept_uids))
    unknown = kept_set.difference(uids)
    if unknown:
        raise ValueError(f"{len(unknown)} kept uids are not in the ground truth, e.g. {sorted(unknown)[:3]}")
    kept = np.fromiter((u in kept_set for u in uids), bool, len(uids))
    mismatched = _column(ground_truth, "mismatched").astype(bool)
    well = ~mismatched
    group = _column(ground_truth, "dup_group").astype(np.int64)
    rare = _column(ground_truth, "rare").astype(str)
    kind = _column(ground_truth, "kind").astype(str)
    fine = np.char.add(np.char.add(kind.astype(str), " "), _column(ground_truth, "texture").astype(str))

    in_group = group >= 0
    groups = np.unique(group[in_group])
    kept_per_group = np.bincount(group[in_group & kept], minlength=int(groups.max()) + 1 if groups.size else 0)
    touched = kept_per_group[groups] >= 1
    thinned = kept_per_group[groups] == 1

    def coverage(labels: np.ndarray) -> tuple[int, int]:
        pool_kinds = np.unique(labels[well])
        kept_kinds = np.unique(labels[well & kept])
        return int(kept_kinds.size), int(pool_kinds.size)

    def kept_of(mask: np.ndarray) -> tuple[int, int]:
        return int((mask & kept).sum()), int(mask.sum())

    n_mis = int(mismatched.sum())
    return {
        "kept": int(kept.sum()),
        "pool": int(len(uids)),
        "mismatches_dropped": float((mismatched & ~kept).sum() / n_mis) if n_mis else None,
        "mismatch_share_kept": float((mismatched & kept).sum() / max(kept.sum(), 1)),
        "dup_groups_thinned": float(thinned.sum() / touched.sum()) if touched.any() else None,
        "dup_groups_touched": int(touched.sum()),
        "dup_groups": int(groups.size),
        "redundant_copies_kept": int(np.maximum(kept_per_group[groups] - 1, 0).sum()),
        "kinds_covered": coverage(kind),
        "fine_kinds_covered": coverage(fine),
        "rare_shape_kept": kept_of((rare == "shape") & well),
        "rare_colour_kept": kept_of((rare == "colour") & well),
    }


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}/{value[1]}"
    if key in ("mismatches_dropped", "dup_groups_thinned", "mismatch_share_kept"):
        return f"{value:.1%}"
    return str(value)


def comparison_rows(results: dict[str, dict[str, Any]], context: dict[str, Any]) -> list[list[str]]:
    """Rows [label, value per method...] in METRIC_LABELS order, for the console and the report."""
    rows = []
    for key, label in METRIC_LABELS:
        rows.append([label.format(**context)] + [format_value(key, results[m].get(key)) for m in results])
    return rows


def format_table(results: dict[str, dict[str, Any]], titles: dict[str, str], context: dict[str, Any]) -> str:
    header = ["ground truth"] + [titles.get(m, m) for m in results]
    rows = comparison_rows(results, context)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
