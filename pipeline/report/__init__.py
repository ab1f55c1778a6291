"""``WORKDIR/report.html``: one self-contained page about a job, built from its committed files only.

Sections (each built from what is there; a missing optional piece becomes a note, not a failure):

* **summary**: samples in, kept, dropped, where the output is (:func:`pipeline.summary.summarize`);
* sections a client adds (:class:`ReportExtras`: the demo adds its ground-truth comparison);
* **what was kept**: CLIP-score histograms of kept vs dropped, a 2-D PCA map of the image
  embeddings (a seeded sample), thumbnails of kept and dropped samples with their captions, read
  from the input shards (the original bytes) or, for kept samples when the input is gone, from the
  output shards; the pruned samples closest to the selected sample that suppressed them
  ("dropped as near-copy of …", :mod:`.near_copies`), when the selection recorded it; the pool
  samples removed as copies of evaluation images beside those images, with their cosine ("removed
  as a copy of an evaluation image", :mod:`.eval_copies`), with ``select.prefilter.decontaminate``;
* **stages**: every stage's ``_stats.json``.

Every image and plot is embedded as a base64 ``data:`` URI and the page loads nothing from
anywhere (no CDN, no fonts, no scripts), so it opens offline and can be mailed as one file.

Memory is bounded whatever the pool: the pool is read one embedding part at a time (:mod:`.pool`:
histogram counts summed part by part, kept flags from the selection's per-part decisions files,
the seeded sample drawn as counts before its rows are read), and only the rows shown are read in
full, so the report's process holds one part's columns and O(shown) rows.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import InputConfig
from ..formats.embeddings import EmbeddingPart, list_parts, read_vectors_sample
from ..formats.selection import SELECTED
from ..formats.webdataset import find_samples
from ..storage import Store, basename, join
from ..summary import SKIP_LABELS, summarize
from ..workdir import EMBED, GRAPH, SELECT, STAGE_DIRS, read_stats, read_success, stage_dir
from .eval_copies import find_eval_copies
from .near_copies import find_near_copies
from .plots import embedding_map, map_rows, pca_2d, score_bins, score_histogram
from .pool import PoolScan, PoolTally, Sample, count_selected, kept_reader, read_samples, scan_pool, tally_pool
from .render import CSS, flatten, note, table, thumbnail_uri

__all__ = ["REPORT_NAME", "ReportExtras", "build_report", "pca_2d"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
JOIN_LABELS = set(SKIP_LABELS.values())
EXAMPLES_PER_GRID = 16
NEAR_COPY_TITLE = "Dropped as near-copy of a kept sample"
EVAL_COPY_TITLE = "Removed as a copy of an evaluation image"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ReportExtras:
    """What a client adds to the generic report: sections shown after the summary (heading, html)
    and badges on example thumbnails (uid -> text)."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------

def _summary_section(stats: dict[str, dict | None], kept_n: int | None, n_total: int | None) -> str:
    s = summarize(stats)
    rows: list[list[Any]] = []
    if s["samples_in"] is not None:
        unreadable = sum(v for k, v in s["dropped"].items() if k.startswith("unreadable"))
        rows += [["samples read", s["samples_in"]], ["skipped as unreadable", unreadable]]
        # the precomputed encoder's join by uid (pipeline.summary.SKIP_LABELS)
        rows += [[f"skipped: {k}", v] for k, v in s["dropped"].items() if k.split(":")[0] in JOIN_LABELS]
        rows.append(["embedded", s["embedded"]])
        if s.get("not_in_shards"):
            rows.append(["in the metadata, not in the shards (failed downloads; not samples)", s["not_in_shards"]])
    select = stats.get("select")
    if select:
        rows += [["selection method", s["method"]], ["budget (kept)", s["budget"]]]
        basic = select.get("basic_filter") or {}
        rows += [[f"DataComp basic filter: {rule}", count]
                 for rule, count in (basic.get("dropped_by") or {}).items() if count]
        exact = select.get("exact_duplicates") or {}
        if exact:
            rows.append(["exact duplicates (same image bytes as an earlier sample)", exact.get("dropped")])
        decon = select.get("decontaminate") or {}
        rows += [[f"copies of evaluation images ({name}, cosine >= {decon.get('threshold')})", count]
                 for name, count in (decon.get("dropped_by_set") or {}).items()]
        beta = select.get("prefiltered_beta", select.get("prefiltered"))  # older stats: β only
        if beta:
            rows.append([f"pre-filtered (lowest beta={select.get('prefilter_beta')} of scores)", beta])
        rows.append(["pruned by the selection", select.get("pruned")])
    elif kept_n is not None:
        rows.append(["kept", kept_n])
    if stats.get("write"):
        rows += [["samples written", s["kept"]], ["output shards", s["output"]]]
    if not rows:
        return note("No committed stage found in this work directory.")
    cards = ""
    if n_total and kept_n is not None:
        cards = (f'<div class="cards"><div class="card"><b>{n_total:,}</b><span>samples in</span></div>'
                 f'<div class="card kept"><b>{kept_n:,}</b><span>kept ({kept_n / n_total:.0%})</span></div>'
                 f'<div class="card dropped"><b>{n_total - kept_n:,}</b><span>dropped</span></div></div>')
    return cards + table(rows)


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
        return f'<div class="stage">{title}' + note(f"Stage {stage} has no _stats.json (not run, or not committed yet).") + "</div>"
    committed = "committed" if success else "not committed"
    when = ""
    if success and success.get("committed_at"):
        when = _dt.datetime.fromtimestamp(float(success["committed_at"]), _dt.timezone.utc).strftime(" %Y-%m-%d %H:%M UTC")
    rows = flatten(stats)
    wanted = KEY_STATS.get(stage, ())
    key_rows = [[k, v] for want in wanted for k, v in rows if k == want or k.startswith(want + ".")]
    shown = {r[0] for r in key_rows}
    rest = [[k, v] for k, v in rows if k not in shown]
    details = (f"<details><summary>all {len(rows)} numbers</summary>{table(rest, cls='kv')}</details>"
               if rest else "")
    return (f'<div class="stage">{title}<p class="meta">{committed}{when}</p>'
            f"{table(key_rows or [[k, v] for k, v in rows], cls='kv')}{details}</div>")


def _input_members(store: Store, samples: list[tuple[str, str]], input_cfg: InputConfig
                   ) -> tuple[dict[tuple[str, str], dict[str, bytes]], list[str]]:
    """The members of the samples at (shard, key), read from their input shards (each shard once,
    stopping at its last wanted key): {(shard, key): members}, and the shards that could not be
    read."""
    wanted: dict[str, set[str]] = {}
    for shard, key in samples:
        wanted.setdefault(shard, set()).add(key)
    members: dict[tuple[str, str], dict[str, bytes]] = {}
    missing_shards = []
    for shard, keys in wanted.items():
        try:
            for key, sample in find_samples(store, shard, keys, input_cfg).items():
                members[(shard, key)] = sample.members
        except (FileNotFoundError, OSError) as err:
            missing_shards.append(f"{shard} ({type(err).__name__})")
    return members, missing_shards


def _image_and_caption(m: dict[str, bytes] | None, input_cfg: InputConfig) -> tuple[str | None, str]:
    """A sample's thumbnail (data URI, None when it has no decodable image) and caption."""
    if not m:
        return None, ""
    lower = {ext.lower(): ext for ext in m}
    ext = next((lower[e] for e in IMAGE_EXTS if e in lower), None)
    cap = lower.get(input_cfg.caption_ext.lower())
    return (thumbnail_uri(m[ext]) if ext else None), (m[cap].decode("utf-8", "replace") if cap else "")


OutputIndex = Callable[[set[str]], "dict[str, tuple[str, str]] | None"]


def _example_grid(store: Store, samples: list[Sample], labels: dict[str, str], input_cfg: InputConfig,
                  output_index: OutputIndex | None) -> str:
    """Thumbnails with captions of `samples`. `output_index` (their uids -> output shard and key)
    is called only for the samples some input shard lacks."""
    members, missing_shards = _input_members(store, [(s.shard, s.key) for s in samples], input_cfg)
    absent = [s for s in samples if (s.shard, s.key) not in members]
    # kept samples whose input shard is gone: the output shards have them
    index = output_index({s.uid for s in absent}) if output_index is not None and absent else None
    if index is not None:
        fallback: dict[str, set[str]] = {}
        for s in absent:
            if s.uid in index:
                shard, key = index[s.uid]
                fallback.setdefault(shard, set()).add(key)
        for shard, keys in fallback.items():
            try:
                got = find_samples(store, shard, keys, input_cfg)
            except (FileNotFoundError, OSError):
                continue
            for s in absent:
                if s.uid in index and index[s.uid][0] == shard and index[s.uid][1] in got:
                    members[(s.shard, s.key)] = got[index[s.uid][1]].members
    cells = []
    for s in samples:
        image, caption = _image_and_caption(members.get((s.shard, s.key)), input_cfg)
        badge = labels.get(s.uid, "")
        img_html = f'<img src="{image}" alt="">' if image else '<div class="noimg">image not available</div>'
        cells.append(
            f'<figure>{img_html}<figcaption><span class="score">score {s.clip_score:.3f}</span>'
            f'{f" <span class=badge>{html.escape(badge)}</span>" if badge else ""}'
            f'<br>{html.escape(caption[:140])}</figcaption></figure>')
    shown = note("unreadable shards: " + "; ".join(missing_shards)) if missing_shards else ""
    return shown + '<div class="grid">' + "".join(cells) + "</div>"


def _near_copy_gallery(store: Store, workdir_url: str, parts: list[EmbeddingPart], labels: dict[str, str],
                       input_cfg: InputConfig) -> str:
    """The "dropped as near-copy of …" pairs (:mod:`.near_copies`) side by side: the pruned sample,
    the selected sample that suppressed it most, both captions and their graph distance. "" when
    the selection has no per-node blame (older workdirs, a baseline method)."""
    found = find_near_copies(store, stage_dir(workdir_url, SELECT), stage_dir(workdir_url, GRAPH), parts)
    if found is None or not found.pairs:
        return ""
    rows = [r for c in found.pairs for r in (c.pruned, c.kept)]
    shown = read_samples(store, parts, rows)  # the pairs' rows only: node ids are pool rows
    members, missing_shards = _input_members(store, [(shown[r].shard, shown[r].key) for r in rows], input_cfg)
    cells = []
    for c in found.pairs:
        figures = []
        for role, r in (("pruned", c.pruned), ("kept", c.kept)):
            s = shown[r]
            image, caption = _image_and_caption(members.get((s.shard, s.key)), input_cfg)
            img_html = f'<img src="{image}" alt="">' if image else '<div class="noimg">image not available</div>'
            badge = labels.get(s.uid, "")
            figures.append(f'<figure class="{role}">{img_html}<figcaption><span class="role">{role}</span> '
                           f'<span class="score">score {s.clip_score:.3f}</span>'
                           f'{f" <span class=badge>{html.escape(badge)}</span>" if badge else ""}'
                           f'<br>{html.escape(caption[:140])}</figcaption></figure>')
        cells.append(f'<div class="pair" data-pruned="{html.escape(shown[c.pruned].uid)}" '
                     f'data-kept="{html.escape(shown[c.kept].uid)}" data-distance="{c.distance!r}">'
                     f'{figures[0]}<div class="dist">distance<br><b>{c.distance:.4f}</b></div>{figures[1]}</div>')
    notes = [f"The {len(found.pairs)} pruned samples closest in the kNN graph to the selected sample that "
             "suppressed them most (selection/nodes blame_node), with their graph distance (L2 of the graph vectors)."]
    if not found.exact:
        notes.append("Closest pairs among those examined: some candidates were set aside (memory cap).")
    if missing_shards:
        notes.append("unreadable shards: " + "; ".join(missing_shards))
    return "".join(note(t) for t in notes) + '<div class="pairs">' + "".join(cells) + "</div>"


def _eval_copy_gallery(store: Store, workdir_url: str, input_cfg: InputConfig) -> str:
    """The pool samples removed as copies of evaluation images (:mod:`.eval_copies`), most similar
    first: the pool picture beside the evaluation picture and their cosine. "" when none."""
    copies = find_eval_copies(store, stage_dir(workdir_url, SELECT))
    if not copies:
        return ""
    # the decisions rows name each copy's shard and key: no lookup in the pool
    members, missing_shards = _input_members(store, [(c.shard, c.key) for c in copies], input_cfg)
    evals: dict[tuple[str, str], dict[str, bytes]] = {}
    for shard in {c.eval_shard for c in copies if c.eval_shard}:
        keys = {c.eval_id for c in copies if c.eval_shard == shard}
        try:
            evals.update({(shard, k): s.members for k, s in find_samples(store, shard, keys, input_cfg).items()})
        except (FileNotFoundError, OSError) as err:
            missing_shards.append(f"{shard} ({type(err).__name__})")
    cells = []
    for c in copies:
        pool_image, caption = _image_and_caption(members.get((c.shard, c.key)), input_cfg)
        eval_image, _ = _image_and_caption(evals.get((c.eval_shard, c.eval_id)) if c.eval_shard else None, input_cfg)
        figures = []
        for role, image, text in (("removed", pool_image, caption),
                                  (f"{c.eval_set}: {c.eval_id}", eval_image,
                                   "" if c.eval_shard else "(the set was given as vectors: no picture)")):
            img_html = f'<img src="{image}" alt="">' if image else '<div class="noimg">image not available</div>'
            figures.append(f'<figure><span class="role">{html.escape(role)}</span>{img_html}'
                           f'<figcaption>{html.escape(text[:140])}</figcaption></figure>')
        cells.append(f'<div class="pair" data-removed="{html.escape(c.uid)}" data-eval="{html.escape(c.eval_id)}" '
                     f'data-similarity="{c.similarity!r}">{figures[0]}<div class="dist">cosine<br>'
                     f'<b>{c.similarity:.4f}</b></div>{figures[1]}</div>')
    notes = [f"The {len(copies)} pool samples most similar to an evaluation image among those removed "
             "(select.prefilter.decontaminate; decisions.parquet reason eval_duplicate), beside that image."]
    if missing_shards:
        notes.append("unreadable shards: " + "; ".join(missing_shards))
    return "".join(note(t) for t in notes) + '<div class="pairs">' + "".join(cells) + "</div>"


def _output_index(store: Store, write_stats: dict | None, uids: set[str]) -> dict[str, tuple[str, str]] | None:
    """uid -> (output tar URL, key) of `uids`, from the output shards' metadata parquet files, one
    file at a time keeping only those uids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not write_stats or not write_stats.get("shards_url"):
        return None
    wanted = pa.array(sorted(uids), pa.string())
    index: dict[str, tuple[str, str]] = {}
    for url in store.glob(join(write_stats["shards_url"], "*.parquet")):
        meta = store.read_parquet(url, columns=["uid", "key"])
        meta = meta.filter(pc.fill_null(pc.is_in(meta.column("uid").cast(pa.string()), value_set=wanted), False))
        tar_url = url[: -len(".parquet")] + ".tar"
        for uid, key in zip(meta.column("uid").to_pylist(), meta.column("key").to_pylist()):
            index[uid] = (tar_url, key)
    return index


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

def _draw_ordinals(rng: np.random.Generator, count: int) -> np.ndarray:
    """Sorted ordinals (the i-th kept row, ...) of a grid's random sample among `count` rows: the
    draw ``rng.choice(rows, ...)`` makes of the rows themselves, so the sample is the same as one
    drawn from the pool's rows in memory."""
    if not count:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(count, min(EXAMPLES_PER_GRID, count), replace=False))


def _plots(store: Store, workdir_url: str, scan: PoolScan, tally: PoolTally, edges: np.ndarray | None,
           drawn: np.ndarray) -> str:
    """The CLIP-score histograms and the embedding map, side by side."""
    def draw_histogram() -> str:
        if edges is None:
            raise ValueError("no finite CLIP scores")
        return score_histogram(edges, tally.kept_counts, tally.dropped_counts, scan.kept_n, scan.dropped_n)

    def draw_map() -> str:
        parts, _ = list_parts(store, stage_dir(workdir_url, EMBED), "image")
        if parts[-1].offset + parts[-1].rows != scan.n:
            raise RuntimeError(f"the embedding parts now hold another number of rows than {scan.n}")
        return embedding_map(read_vectors_sample(store, parts, "image", drawn), tally.map_kept, scan.n)

    plots = []
    for name, fn in (("CLIP score histogram", draw_histogram), ("embedding map", draw_map)):
        try:
            plots.append(f'<img class="plot half" alt="{name}" src="{fn()}">')
        except Exception as err:  # noqa: BLE001 - a plot that fails is a note, not a failed report
            log.warning("report: %s failed: %s", name, err)
            plots.append(note(f"{name} not drawn: {err}"))
    return '<div class="plots">' + "".join(plots) + "</div>"


def _what_was_kept(store: Store, workdir_url: str, parts: list[EmbeddingPart], kept_of, scan: PoolScan, stats,
                   extras: ReportExtras, input_cfg: InputConfig) -> list[str]:
    drawn = map_rows(scan.n)
    rng = np.random.default_rng(0)  # the grids' samples: drawn from the counts, then found in the second pass
    kept_ordinals, dropped_ordinals = _draw_ordinals(rng, scan.kept_n), _draw_ordinals(rng, scan.dropped_n)
    edges = score_bins(scan.low, scan.high) if np.isfinite(scan.low) else None
    try:
        tally = tally_pool(store, parts, kept_of, edges, drawn, kept_ordinals, dropped_ordinals)
    except Exception as err:  # noqa: BLE001 - a part that changed or broke since the first pass
        log.warning("report: second pass over the pool failed: %s", err)
        return [note(f"embeddings or selection unreadable: {err}")]
    sections = [_plots(store, workdir_url, scan, tally, edges, drawn)]
    if (stats.get("embed") or {}).get("input") == "metadata-only":
        # no images were downloaded: the pool is metadata rows, so there is nothing to show in a gallery
        sections.append(note("Metadata-only job (no input shards): no pictures to show; the kept rows are in "
                             "OUTPUT/metadata/, ready for img2dataset."))
        return sections

    grids = [  # (css class, title, rows: a random sample or the lowest scores, in the order shown)
        ("kept-h", "Kept (a random sample)", tally.kept_rows),
        ("dropped-h", "Dropped (a random sample)", tally.dropped_rows),
        ("dropped-h", "Dropped with the lowest CLIP scores", scan.lowest_dropped),
    ]
    for cls, title, rows in grids:
        if not len(rows):
            continue
        # only kept samples are in the output shards, the fallback when an input shard is gone
        out_index = (lambda uids: _output_index(store, stats.get("write"), uids)) if cls == "kept-h" else None
        try:
            shown = read_samples(store, parts, rows)
            grid = _example_grid(store, [shown[r] for r in rows.tolist()], extras.labels, input_cfg, out_index)
        except Exception as err:  # noqa: BLE001
            log.warning("report: examples failed: %s", err)
            grid = note(f"examples not shown: {err}")
        sections.append(f'<h3 class="{cls}">{title}</h3>' + grid)
    try:
        gallery = _near_copy_gallery(store, workdir_url, parts, extras.labels, input_cfg)
    except Exception as err:  # noqa: BLE001 - a damaged nodes or graph file is a note, not a failed report
        log.warning("report: near-copy gallery failed: %s", err)
        gallery = note(f"near-copy gallery not shown: {err}")
    if gallery:
        sections.append(f'<h3 class="dropped-h">{NEAR_COPY_TITLE}</h3>' + gallery)
    try:
        copies = _eval_copy_gallery(store, workdir_url, input_cfg)
    except Exception as err:  # noqa: BLE001 - as the near-copy gallery: a note, not a failed report
        log.warning("report: evaluation-copy gallery failed: %s", err)
        copies = note(f"evaluation-copy gallery not shown: {err}")
    if copies:
        sections.append(f'<h3 class="dropped-h">{EVAL_COPY_TITLE}</h3>' + copies)
    return sections


def build_report(workdir_url: str, store: Store | None = None, extras: ReportExtras | None = None,
                 input_cfg: InputConfig | None = None) -> str:
    """Build ``WORKDIR/report.html`` from the committed files; returns its URL. `input_cfg` says
    how samples are laid out in the shards (member extensions; defaults as in the config)."""
    store = store or Store()
    extras = extras or ReportExtras()
    input_cfg = input_cfg or InputConfig(shards="unused")
    workdir_url = workdir_url.rstrip("/")
    if not store.exists(workdir_url):
        raise FileNotFoundError(f"work directory {workdir_url} does not exist")
    stats = {s: read_stats(store, stage_dir(workdir_url, s)) for s in STAGE_DIRS}
    success = {s: read_success(store, stage_dir(workdir_url, s)) for s in STAGE_DIRS}

    sections: list[str] = []
    parts = kept_of = scan = None
    kept_n = None
    sel_dir = stage_dir(workdir_url, SELECT)
    try:
        try:
            parts, _ = list_parts(store, stage_dir(workdir_url, EMBED))
        except FileNotFoundError:
            parts = None
        if parts is not None:
            kept_of = kept_reader(store, sel_dir, parts)
            if kept_of is not None:  # the first pass: counts, score range (one part at a time)
                scan = scan_pool(store, parts, kept_of, EXAMPLES_PER_GRID)
                kept_n = scan.kept_n
        elif store.exists(join(sel_dir, SELECTED)):
            kept_n = count_selected(store, sel_dir)
    except Exception as err:  # noqa: BLE001 - a damaged part is named on the page; the stage stats still show
        log.warning("report: could not read embeddings/selection: %s", err)
        sections.append(note(f"embeddings or selection unreadable: {err}"))
    n_total = sum(p.rows for p in parts) if parts is not None else None

    sections.append("<h2>Summary</h2>" + _summary_section(stats, kept_n, n_total))
    for heading, body in extras.sections:
        sections.append(f"<h2>{html.escape(heading)}</h2>" + body)
    sections.append("<h2>What was kept</h2>")
    if parts is None:
        sections.append(note("No committed embedding parts: no score histogram, map or examples."))
    elif scan is None:
        sections.append(note("No selection committed yet: no kept/dropped split to show."))
    else:
        sections += _what_was_kept(store, workdir_url, parts, kept_of, scan, stats, extras, input_cfg)

    sections.append("<h2>Stages</h2><div class=\"stages\">" +
                    "".join(_stage_section(s, stats[s], success[s]) for s in STAGE_DIRS) + "</div>")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>d2prune report: {html.escape(basename(workdir_url))}</title><style>{CSS}</style></head><body><main>"
        f"<h1>d2prune report</h1><p class=\"meta\">work directory <code>{html.escape(workdir_url)}</code>"
        f" &middot; built {generated} from the committed files</p>"
        + "".join(sections) + "</main></body></html>"
    )
    url = join(workdir_url, REPORT_NAME)
    store.write_bytes(url, page.encode("utf-8"))
    log.info("report written to %s", url)
    return url
