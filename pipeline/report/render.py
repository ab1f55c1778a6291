"""HTML building blocks of the report: tables, notes, embedded images (everything is a ``data:``
URI, so the page opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

THUMB_PX = 112
KEPT_COLOUR, DROPPED_COLOUR = "#1b7f3b", "#c0392b"


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(image_bytes: bytes) -> str | None:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    except Exception:  # noqa: BLE001 - an undecodable image is shown as missing, not a failed report
        return None
    img.thumbnail((THUMB_PX * 2, THUMB_PX * 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def fmt(value: Any) -> str:
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


def flatten(stats: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested stats as (dotted.key, value) rows; long lists are summarised, not dumped."""
    if isinstance(stats, dict):
        if not stats:
            return [(prefix.rstrip("."), "{}")] if prefix else []
        rows: list[tuple[str, Any]] = []
        for key, value in stats.items():
            rows.extend(flatten(value, f"{prefix}{key}."))
        return rows
    key = prefix.rstrip(".")
    if isinstance(stats, list):
        if stats and all(isinstance(v, dict) for v in stats):
            return [(key, f"{len(stats)} entries (see _stats.json)")]
        text = ", ".join(str(v) for v in stats[:8]) + (f", ... ({len(stats)} items)" if len(stats) > 8 else "")
        return [(key, text)]
    return [(key, stats)]


def table(rows: list[list[Any]], header: list[str] | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">']
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


CSS = """
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
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.pair{display:grid;grid-template-columns:1fr 62px 1fr;align-items:start;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:6px}
.pair figure{border:none;padding:0}.pair .dist{text-align:center;font-size:11px;color:#555;padding-top:36px}
.role{font-weight:bold;text-transform:uppercase;font-size:10px}.pruned .role{color:#c0392b}.kept .role{color:#1b7f3b}
"""
