"""``WORKDIR/report.html``: one self-contained page about a job, built from its committed files only.

Sections (each built from what is there; a missing optional piece becomes a note, not a failure):

* **summary**: samples in, kept, dropped, where the output is;
* **ground truth** (the demo only, from ``demo_ground_truth.json``): D2 against the baselines;
* **stages**: every stage's ``_stats.json`` (samples, skipped by reason, seconds, graph recall,
  partition overlap, ...);
* **CLIP score, kept vs dropped**: histograms from the embedding parts and ``selected.parquet``;
* **embedding map**: a 2-D PCA of the image embeddings (a seeded sample), kept vs dropped;
* **examples**: thumbnails of kept and dropped samples with their captions, read from the input
  shards (the original bytes; the embedding parts say which shard and key) or, for kept samples
  when the input is gone, from the output shards.

Every image and plot is embedded as a base64 ``data:`` URI and the page loads nothing from
anywhere (no CDN, no fonts, no scripts), so it opens offline and can be mailed as one file.
Plots are matplotlib (Agg backend: no display needed), the one plotting library in our pins.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import tarfile
from typing import Any, Callable

import numpy as np

from .storage import Store, basename, fixed_list_to_numpy, join
from .workdir import STAGE_DIRS, SUCCESS

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
GROUND_TRUTH_FILE = "demo_ground_truth.json"
STAGE_ORDER = tuple(STAGE_DIRS)  # embed, graph, select, write
MAP_POINTS = 4000  # points in the PCA map (a seeded sample of larger pools)
EXAMPLES_PER_GRID = 16
THUMB_PX = 112
KEPT_COLOUR, DROPPED_COLOUR = "#1b7f3b", "#c0392b"
METHOD_COLOURS = {"d2": "#1f5fa8", "d2_no_prefilter": "#8fb4de", "score_topk": "#e08a1e", "random": "#8a8a8a"}


# ------------------------------------------------------------------------------------------------
# Reading the work directory
# ------------------------------------------------------------------------------------------------

def _read_json_optional(store: Store, url: str) -> dict[str, Any] | None:
    return store.read_json(url) if store.exists(url) else None


def _embedding_part_urls(store: Store, workdir_url: str) -> list[str]:
    return sorted(store.glob(join(workdir_url, STAGE_DIRS["embed"], "part-*.parquet")), key=basename)


def read_embedding_table(store: Store, workdir_url: str, with_vectors: bool) -> dict[str, np.ndarray] | None:
    """uid, shard, key, clip_score (and image embeddings) of every committed embedding part."""
    urls = _embedding_part_urls(store, workdir_url)
    if not urls:
        return None
    columns = ["uid", "shard", "key", "clip_score"] + (["image_embedding"] if with_vectors else [])
    pieces: dict[str, list] = {c: [] for c in columns}
    for url in urls:
        table = store.read_parquet(url, columns=columns)
        for c in columns:
            if c == "image_embedding":
                pieces[c].append(fixed_list_to_numpy(table.column(c), c, url).astype(np.float32))
            else:
                pieces[c].append(table.column(c).to_numpy(zero_copy_only=False))
    return {c: np.concatenate(v) for c, v in pieces.items()}


def read_image_embeddings(store: Store, workdir_url: str, rows: np.ndarray, n_total: int) -> np.ndarray:
    """float32 image embeddings of the sorted global `rows` of the embedding parts, reading one
    part's column at a time (the map needs a sample; the pool's vectors need not fit in memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    out, offset = [], 0
    for url in _embedding_part_urls(store, workdir_url):
        column = store.read_parquet(url, columns=["image_embedding"]).column("image_embedding")
        local = rows[(rows >= offset) & (rows < offset + len(column))] - offset
        if len(local):
            out.append(fixed_list_to_numpy(column.take(local), "image_embedding", url).astype(np.float32))
        offset += len(column)
    if offset != n_total:
        raise RuntimeError(f"the embedding parts now hold {offset} rows, {n_total} when the report started")
    return np.concatenate(out)


def read_selected(store: Store, workdir_url: str) -> dict[str, np.ndarray] | None:
    url = join(workdir_url, STAGE_DIRS["select"], "selected.parquet")
    if not store.exists(url):
        return None
    table = store.read_parquet(url)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _sample_members(store: Store, shard_url: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members (by extension) of the samples `keys` of one tar shard, read front to back."""
    found: dict[str, dict[str, bytes]] = {}
    with store.open(shard_url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            prefix = member.name[: len(member.name) - len(name)]
            full_key = prefix + key
            if full_key in keys or key in keys:
                data = tar.extractfile(member).read()
                found.setdefault(full_key if full_key in keys else key, {})[ext.lower()] = data
            if len(found) == len(keys) and all(len(v) >= 2 for v in found.values()):
                break
    return found


# ------------------------------------------------------------------------------------------------
# Rendering helpers
# ------------------------------------------------------------------------------------------------

def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnail_uri(image_bytes: bytes) -> str | None:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    except Exception:  # noqa: BLE001 - an undecodable image is shown as missing, not a failed report
        return None
    img.thumbnail((THUMB_PX * 2, THUMB_PX * 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _flatten(stats: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested stats as (dotted.key, value) rows; long lists are summarised, not dumped."""
    if isinstance(stats, dict):
        if not stats:
            return [(prefix.rstrip("."), "{}")] if prefix else []
        rows: list[tuple[str, Any]] = []
        for key, value in stats.items():
            rows.extend(_flatten(value, f"{prefix}{key}."))
        return rows
    key = prefix.rstrip(".")
    if isinstance(stats, list):
        if stats and all(isinstance(v, dict) for v in stats):
            return [(key, f"{len(stats)} entries (see _stats.json)")]
        text = ", ".join(str(v) for v in stats[:8]) + (f", ... ({len(stats)} items)" if len(stats) > 8 else "")
        return [(key, text)]
    return [(key, stats)]


def _table(rows: list[list[Any]], header: list[str] | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">']
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------

def _summary_section(stats: dict[str, dict | None], kept_n: int | None, n_total: int | None) -> str:
    embed, select, write = stats.get("embed"), stats.get("select"), stats.get("write")
    rows: list[list[Any]] = []
    if embed:
        skipped = embed.get("skipped") or {}
        n_skipped = sum(int(v) for v in skipped.values()) if isinstance(skipped, dict) else 0
        rows.append(["samples read", int(embed.get("samples", 0)) + n_skipped])
        rows.append(["skipped as unreadable", n_skipped])
        rows.append(["embedded", embed.get("samples")])
    if select:
        rows.append(["selection method", select.get("method")])
        rows.append(["budget (kept)", select.get("budget")])
        if select.get("prefiltered"):
            rows.append([f"pre-filtered (lowest beta={select.get('prefilter_beta')} of scores)", select.get("prefiltered")])
        rows.append(["pruned by the selection", select.get("pruned")])
    elif kept_n is not None:
        rows.append(["kept", kept_n])
    if write:
        rows.append(["samples written", write.get("samples_written")])
        rows.append(["output shards", write.get("shards_url")])
    if not rows:
        return _note("No committed stage found in this work directory.")
    cards = ""
    if n_total and kept_n is not None:
        cards = (f'<div class="cards"><div class="card"><b>{n_total:,}</b><span>samples in</span></div>'
                 f'<div class="card kept"><b>{kept_n:,}</b><span>kept ({kept_n / n_total:.0%})</span></div>'
                 f'<div class="card dropped"><b>{n_total - kept_n:,}</b><span>dropped</span></div></div>')
    return cards + _table(rows)


# The numbers of each stage shown up front; everything else in the stage's stats is one click away.
KEY_STATS = {
    "embed": ("samples", "skipped", "skipped_total", "model", "device", "samples_per_s", "seconds"),
    "graph": ("n_nodes", "vector", "k", "index", "nlist", "nprobe", "recall_at_k", "recall_sample", "seconds"),
    "select": ("method", "n_nodes", "budget", "selected", "prefiltered", "pruned", "score_offset", "partitions",
               "cross_partition_edge_fraction", "overlap_with_exact", "gamma_forward", "gamma_reverse", "seconds.total"),
    "write": ("samples_written", "output_shards", "integrity", "shards_url", "seconds"),
}


def _stage_section(stage: str, stats: dict | None, success: dict | None) -> str:
    title = f"<h3>{stage}</h3>"
    if stats is None:
        return f'<div class="stage">{title}' + _note(f"Stage {stage} has no _stats.json (not run, or not committed yet).") + "</div>"
    committed = "committed" if success else "not committed"
    when = ""
    if success and success.get("committed_at"):
        when = _dt.datetime.fromtimestamp(float(success["committed_at"]), _dt.timezone.utc).strftime(" %Y-%m-%d %H:%M UTC")
    rows = _flatten(stats)
    wanted = KEY_STATS.get(stage, ())
    key_rows = [[k, v] for want in wanted for k, v in rows if k == want or k.startswith(want + ".")]
    shown = {r[0] for r in key_rows}
    rest = [[k, v] for k, v in rows if k not in shown]
    details = (f"<details><summary>all {len(rows)} numbers</summary>{_table(rest, cls='kv')}</details>"
               if rest else "")
    return (f'<div class="stage">{title}<p class="meta">{committed}{when}</p>'
            f"{_table(key_rows or [[k, v] for k, v in rows], cls='kv')}{details}</div>")


def _ground_truth_section(gt: dict[str, Any]) -> str:
    from .demo.evaluate import comparison_rows

    results = gt.get("results") or {}
    order = [m for m in gt.get("methods") or [] if m in results] + [m for m in results if m not in (gt.get("methods") or [])]
    results = {m: results[m] for m in order}
    titles = gt.get("titles") or {m: m for m in results}
    context = gt.get("context") or {}
    try:
        rows = comparison_rows(results, context)
    except (KeyError, IndexError, ValueError) as err:
        return _note(f"demo_ground_truth.json could not be read as a comparison table: {err}")
    header = ["ground truth"] + [titles.get(m, m) for m in results]
    pool = gt.get("pool") or {}
    planted = pool.get("planted") or {}
    intro = (f"<p>The demo pool has {pool.get('samples', '?')} generated pictures; planted on purpose: "
             f"{planted.get('mismatched', '?')} mismatched captions, {planted.get('duplicate_groups', '?')} "
             f"near-duplicate groups ({planted.get('duplicate_members', '?')} pictures), "
             f"{planted.get('rare_shape', '?')} pictures of a rare shape and {planted.get('rare_colour', '?')} "
             f"of a rare colour. Every method keeps the same budget of {gt.get('budget', '?')}; "
             f"baselines: {html.escape(str((gt.get('settings') or {}).get('baselines', '')))}.</p>")
    parts = [intro, _table(rows, header, cls="gt")]
    try:
        parts.append(f'<img class="plot" alt="ground-truth comparison" src="{_ground_truth_plot(results, titles)}">')
    except Exception as err:  # noqa: BLE001 - a plot that fails is a note, the table stays
        log.warning("report: ground-truth plot failed: %s", err)
        parts.append(_note(f"ground-truth plot not drawn: {err}"))
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
    return _png_data_uri(fig)


def _score_histogram(scores: np.ndarray, kept: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 40)
    ax.hist(scores[~kept], bins=bins, color=DROPPED_COLOUR, alpha=0.6, label=f"dropped ({int((~kept).sum()):,})")
    ax.hist(scores[kept], bins=bins, color=KEPT_COLOUR, alpha=0.6, label=f"kept ({int(kept.sum()):,})")
    ax.set_xlabel("CLIP score (cosine of image and caption embeddings)")
    ax.set_ylabel("samples (log scale)")
    ax.set_yscale("log")
    ax.set_title("CLIP score of kept and dropped samples", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png_data_uri(fig)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of `vectors` (rows), sign-fixed so plots are stable."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    return centred @ (comps * signs[:, None]).T


def map_rows(n: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of the pool drawn in the embedding map: all, or a seeded MAP_POINTS sample."""
    return np.sort(np.random.default_rng(seed).choice(n, MAP_POINTS, replace=False)) if n > MAP_POINTS else np.arange(n)


def _embedding_map(vectors: np.ndarray, kept: np.ndarray, n: int) -> str:
    """PCA scatter of the map sample: `vectors` and `kept` are its rows (:func:`map_rows`) of `n`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    xy = pca_2d(vectors / np.maximum(norms, 1e-12))
    k = np.asarray(kept, dtype=bool)
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    ax.scatter(xy[~k, 0], xy[~k, 1], s=6, c=DROPPED_COLOUR, alpha=0.35, lw=0, label="dropped")
    ax.scatter(xy[k, 0], xy[k, 1], s=9, c=KEPT_COLOUR, alpha=0.85, lw=0, label="kept")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, frameon=False, markerscale=2)
    title = f"{len(vectors):,} of {n:,} samples" if n > len(vectors) else f"all {n:,} samples"
    ax.set_title(f"image embeddings, PCA ({title})", fontsize=9)
    return _png_data_uri(fig)


def _example_grid(store: Store, table: dict[str, np.ndarray], rows: np.ndarray, labels: dict[str, str],
                  output_index: Callable[[], dict[str, tuple[str, str]] | None] | None) -> str:
    """Thumbnails with captions of the samples at `rows` of the embedding table. `output_index`
    (uid -> output shard and key) is called only when some input shard lacks a sample."""
    wanted: dict[str, set[str]] = {}
    for r in rows:
        wanted.setdefault(str(table["shard"][r]), set()).add(str(table["key"][r]))
    members: dict[tuple[str, str], dict[str, bytes]] = {}
    missing_shards = []
    for shard, keys in wanted.items():
        try:
            for key, m in _sample_members(store, shard, keys).items():
                members[(shard, key)] = m
        except (FileNotFoundError, OSError, tarfile.TarError) as err:
            missing_shards.append(f"{shard} ({type(err).__name__})")
    index = None  # kept samples whose input shard is gone: the output shards have them
    if output_index is not None and any((str(table["shard"][r]), str(table["key"][r])) not in members for r in rows):
        index = output_index()
    if index is not None:
        fallback: dict[str, set[str]] = {}
        for r in rows:
            uid = str(table["uid"][r])
            if (str(table["shard"][r]), str(table["key"][r])) not in members and uid in index:
                shard, key = index[uid]
                fallback.setdefault(shard, set()).add(key)
        for shard, keys in fallback.items():
            try:
                got = _sample_members(store, shard, keys)
            except (FileNotFoundError, OSError, tarfile.TarError):
                continue
            for r in rows:
                uid = str(table["uid"][r])
                if uid in index and index[uid][0] == shard and index[uid][1] in got:
                    members[(str(table["shard"][r]), str(table["key"][r]))] = got[index[uid][1]]
    cells = []
    for r in rows:
        m = members.get((str(table["shard"][r]), str(table["key"][r])))
        image = None
        caption = ""
        if m:
            for ext in ("jpg", "jpeg", "png", "webp"):
                if ext in m:
                    image = _thumbnail_uri(m[ext])
                    break
            if "txt" in m:
                caption = m["txt"].decode("utf-8", "replace")
        badge = labels.get(str(table["uid"][r]), "")
        img_html = f'<img src="{image}" alt="">' if image else '<div class="noimg">image not available</div>'
        cells.append(
            f'<figure>{img_html}<figcaption><span class="score">score {float(table["clip_score"][r]):.3f}</span>'
            f'{f" <span class=badge>{html.escape(badge)}</span>" if badge else ""}'
            f'<br>{html.escape(caption[:140])}</figcaption></figure>')
    note = _note("unreadable shards: " + "; ".join(missing_shards)) if missing_shards else ""
    return note + '<div class="grid">' + "".join(cells) + "</div>"


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


def _output_index(store: Store, write_stats: dict | None) -> dict[str, tuple[str, str]] | None:
    """uid -> (output tar URL, key) from the output shards' metadata parquet files."""
    if not write_stats or not write_stats.get("shards_url"):
        return None
    index: dict[str, tuple[str, str]] = {}
    for url in store.glob(join(write_stats["shards_url"], "*.parquet")):
        table = store.read_parquet(url, columns=["uid", "key"])
        tar_url = url[: -len(".parquet")] + ".tar"
        for uid, key in zip(table.column("uid").to_pylist(), table.column("key").to_pylist()):
            index[uid] = (tar_url, key)
    return index


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;border-bottom:2px solid #e3e3e3;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 4px;text-transform:uppercase;letter-spacing:.04em;color:#444}
.meta,.note{color:#666;font-size:13px;margin:4px 0 8px}.note{font-style:italic}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px;background:#fff}
td,th{border:1px solid #ddd;padding:4px 9px;text-align:left;vertical-align:top}th{background:#f0f0f0}
table.gt td:not(:first-child),table.gt th:not(:first-child){text-align:right;min-width:110px}
table.gt{font-size:14px}table.kv td:first-child{color:#444;font-family:monospace;font-size:12px}
.stages{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:6px 28px;align-items:start}
.cards{display:flex;gap:14px;margin:10px 0 14px}.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 18px}
.card b{display:block;font-size:24px}.card span{color:#666;font-size:12px}.card.kept b{color:#1b7f3b}.card.dropped b{color:#c0392b}
.plots{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}img.plot{max-width:100%;background:#fff;border:1px solid #e3e3e3}img.plot.half{max-width:calc(50% - 10px)}
.stage table{width:100%}td{overflow-wrap:anywhere}details{font-size:12px;margin-bottom:8px}summary{cursor:pointer;color:#1f5fa8}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));gap:10px}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:6px;font-size:11px;line-height:1.3}
figure img{width:100%;image-rendering:auto;border-radius:3px}.noimg{height:100px;background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
.score{color:#555;font-family:monospace}.badge{background:#fdecea;color:#a12a1c;border-radius:3px;padding:0 4px;font-size:10px}
.kept-h{color:#1b7f3b}.dropped-h{color:#c0392b}
"""


def build_report(workdir_url: str, store: Store | None = None) -> str:
    """Build ``WORKDIR/report.html`` from the committed files; returns its URL."""
    store = store or Store()
    workdir_url = workdir_url.rstrip("/")
    if not store.exists(workdir_url):
        raise FileNotFoundError(f"work directory {workdir_url} does not exist")
    stats = {s: _read_json_optional(store, join(workdir_url, STAGE_DIRS[s], "_stats.json")) for s in STAGE_ORDER}
    success = {s: _read_json_optional(store, join(workdir_url, STAGE_DIRS[s], SUCCESS)) for s in STAGE_ORDER}
    gt = _read_json_optional(store, join(workdir_url, GROUND_TRUTH_FILE))

    sections: list[str] = []
    table = selected = None
    kept = None
    try:
        table = read_embedding_table(store, workdir_url, with_vectors=False)
        selected = read_selected(store, workdir_url)
    except Exception as err:  # noqa: BLE001 - a damaged part is named on the page; the stage stats still show
        log.warning("report: could not read embeddings/selection: %s", err)
        sections.append(_note(f"embeddings or selection unreadable: {err}"))
    if table is not None and selected is not None:
        kept = np.isin(table["uid"].astype(str), selected["uid"].astype(str))
    n_total = len(table["uid"]) if table is not None else None
    kept_n = int(kept.sum()) if kept is not None else (len(selected["uid"]) if selected is not None else None)

    sections.append("<h2>Summary</h2>" + _summary_section(stats, kept_n, n_total))
    if gt:
        sections.append("<h2>The demo against its ground truth</h2>" + _ground_truth_section(gt))

    sections.append("<h2>What was kept</h2>")
    if table is None:
        sections.append(_note("No committed embedding parts: no score histogram, map or examples."))
    elif kept is None:
        sections.append(_note("No selection committed yet: no kept/dropped split to show."))
    else:
        plots = []
        drawn = map_rows(n_total)
        for name, fn in (("CLIP score histogram", lambda: _score_histogram(table["clip_score"].astype(float), kept)),
                         ("embedding map", lambda: _embedding_map(
                             read_image_embeddings(store, workdir_url, drawn, n_total), kept[drawn], n_total))):
            try:
                plots.append(f'<img class="plot half" alt="{name}" src="{fn()}">')
            except Exception as err:  # noqa: BLE001
                log.warning("report: %s failed: %s", name, err)
                plots.append(_note(f"{name} not drawn: {err}"))
        sections.append('<div class="plots">' + "".join(plots) + "</div>")

        labels = _ground_truth_labels(gt)
        rng = np.random.default_rng(0)
        kept_rows = np.flatnonzero(kept)
        dropped_rows = np.flatnonzero(~kept)
        scores = table["clip_score"].astype(float)
        grids = [  # (css class, title, candidate rows, random sample of them or their first ones)
            ("kept-h", "Kept (a random sample)", kept_rows, True),
            ("dropped-h", "Dropped (a random sample)", dropped_rows, True),
            ("dropped-h", "Dropped with the lowest CLIP scores",
             dropped_rows[np.argsort(scores[dropped_rows], kind="stable")], False),
        ]
        for cls, title, pool_rows, sampled in grids:
            if not len(pool_rows):
                continue
            if sampled:
                rows = np.sort(rng.choice(pool_rows, min(EXAMPLES_PER_GRID, len(pool_rows)), replace=False))
            else:
                rows = pool_rows[:EXAMPLES_PER_GRID]
            # only kept samples are in the output shards, the fallback when an input shard is gone
            out_index = (lambda: _output_index(store, stats.get("write"))) if cls == "kept-h" else None
            try:
                grid = _example_grid(store, table, rows, labels, out_index)
            except Exception as err:  # noqa: BLE001
                log.warning("report: examples failed: %s", err)
                grid = _note(f"examples not shown: {err}")
            sections.append(f'<h3 class="{cls}">{title}</h3>' + grid)

    sections.append("<h2>Stages</h2><div class=\"stages\">" +
                    "".join(_stage_section(s, stats[s], success[s]) for s in STAGE_ORDER) + "</div>")

    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>d2prune report: {html.escape(basename(workdir_url))}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>d2prune report</h1><p class=\"meta\">work directory <code>{html.escape(workdir_url)}</code>"
        f" &middot; built {generated} from the committed files</p>"
        + "".join(sections) + "</main></body></html>"
    )
    url = join(workdir_url, REPORT_NAME)
    store.write_bytes(url, page.encode("utf-8"))
    log.info("report written to %s", url)
    return url
