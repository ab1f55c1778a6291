"""The demo's own report section: its selections against the ground truth it planted, and badges
on the report's thumbnails. The generic report (:mod:`pipeline.report`) knows nothing of the
demo; the demo and ``d2prune report`` hand it these as :class:`~pipeline.report.ReportExtras`."""

from __future__ import annotations

import html
import logging
from typing import Any

import numpy as np

from ..report import ReportExtras
from ..report.render import note, png_data_uri, table
from ..storage import Store, join
from .evaluate import comparison_rows

log = logging.getLogger(__name__)

GROUND_TRUTH_FILE = "demo_ground_truth.json"
SECTION_TITLE = "The demo against its ground truth"
METHOD_COLOURS = {"d2": "#1f5fa8", "d2_no_prefilter": "#8fb4de", "score_topk": "#e08a1e", "random": "#8a8a8a"}


def demo_extras(store: Store, workdir_url: str) -> ReportExtras | None:
    """The demo's section and badges when `workdir_url` holds a demo's ground truth, else None."""
    url = join(workdir_url.rstrip("/"), GROUND_TRUTH_FILE)
    if not store.exists(url):
        return None
    gt = store.read_json(url)
    return ReportExtras(sections=[(SECTION_TITLE, _ground_truth_section(gt))], labels=_ground_truth_labels(gt))


def _ground_truth_section(gt: dict[str, Any]) -> str:
    """The comparison table and plot of every method against the planted ground truth."""
    results = gt.get("results") or {}
    order = [m for m in gt.get("methods") or [] if m in results] + [m for m in results if m not in (gt.get("methods") or [])]
    results = {m: results[m] for m in order}
    titles = gt.get("titles") or {m: m for m in results}
    context = gt.get("context") or {}
    try:
        rows = comparison_rows(results, context)
    except (KeyError, IndexError, ValueError) as err:
        return note(f"demo_ground_truth.json could not be read as a comparison table: {err}")
    header = ["ground truth"] + [titles.get(m, m) for m in results]
    pool = gt.get("pool") or {}
    planted = pool.get("planted") or {}
    intro = (f"<p>The demo pool has {pool.get('samples', '?')} generated pictures; planted on purpose: "
             f"{planted.get('mismatched', '?')} mismatched captions, {planted.get('duplicate_groups', '?')} "
             f"near-duplicate groups ({planted.get('duplicate_members', '?')} pictures), "
             f"{planted.get('rare_shape', '?')} pictures of a rare shape and {planted.get('rare_colour', '?')} "
             f"of a rare colour. Every method keeps the same budget of {gt.get('budget', '?')}; "
             f"baselines: {html.escape(str((gt.get('settings') or {}).get('baselines', '')))}.</p>")
    parts = [intro, table(rows, header, cls="gt")]
    try:
        parts.append(f'<img class="plot" alt="ground-truth comparison" src="{_ground_truth_plot(results, titles)}">')
    except Exception as err:  # noqa: BLE001 - a plot that fails is a note, the table stays
        log.warning("report: ground-truth plot failed: %s", err)
        parts.append(note(f"ground-truth plot not drawn: {err}"))
    settings = (gt.get("settings") or {}).get("select")
    if settings:
        keys = ("prune_rate", "beta", "gamma_forward", "gamma_reverse", "partitions", "score_offset")
        parts.append('<p class="meta">D2 settings: ' + ", ".join(
            f"{k}={html.escape(str(settings.get(k)))}" for k in keys if k in settings) +
            f", graph: {html.escape(str(((gt.get('settings') or {}).get('graph') or {}).get('vector')))} embeddings, "
            f"k={html.escape(str(((gt.get('settings') or {}).get('graph') or {}).get('k')))}</p>")
    return "".join(parts)


def _ratio(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return value[0] / value[1] if value[1] else None
    return float(value)


def _ground_truth_plot(results: dict[str, dict], titles: dict[str, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("mismatches_dropped", "mismatched\ncaptions dropped"),
               ("dup_groups_thinned", "near-dup groups\nthinned to one"),
               ("kinds_covered", "shape x colour\nkinds covered"),
               ("fine_kinds_covered", "shape x colour x texture\nkinds covered"),
               ("rare_shape_kept", "rare shape\npictures kept"),
               ("rare_colour_kept", "rare colour\npictures kept")]
    methods = list(results)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(metrics))
    for i, m in enumerate(methods):
        vals = [_ratio(results[m].get(key)) for key, _ in metrics]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, [v or 0 for v in vals], width,
                      label=titles.get(m, m), color=METHOD_COLOURS.get(m))
        for b, v in zip(bars, vals):
            if v is not None:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{v:.0%}", ha="center",
                        va="bottom", fontsize=7)
    keep = None
    first = results[methods[0]] if methods else {}
    if first.get("pool"):
        keep = first.get("kept", 0) / first["pool"]
        ax.axhline(keep, color="#555", lw=0.8, ls="--", label=f"keep rate ({keep:.0%})")
    ax.set_xticks(x, [label for _, label in metrics], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    ax.legend(fontsize=8, ncol=len(methods) + 1, loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return png_data_uri(fig)


def _ground_truth_labels(gt: dict[str, Any] | None) -> dict[str, str]:
    """uid -> planted role (mismatch, near-duplicate, rare), for badges on the example thumbnails."""
    if not gt:
        return {}
    path = (gt.get("pool") or {}).get("ground_truth")
    if not path:
        return {}
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["uid", "mismatched", "dup_group", "rare"])
    except (FileNotFoundError, OSError, ValueError):
        return {}
    labels = {}
    for uid, mis, grp, rare in zip(*(table.column(c).to_pylist() for c in ("uid", "mismatched", "dup_group", "rare"))):
        tags = (["mismatched caption"] if mis else []) + (["near-duplicate"] if grp >= 0 else []) + \
               ([f"rare {rare}"] if rare else [])
        if tags:
            labels[uid] = ", ".join(tags)
    return labels
