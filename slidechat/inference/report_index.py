"""A browsable ``index.html`` for a batch-report folder: one card per slide with thumbnail, heatmap,
structured fields and the report text (static HTML, relative links, no JavaScript needed)."""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

from slidechat.inference.report import format_field
from slidechat.utils.io import write_text_atomic

CSS = """
.warning{color:#8a4b00;background:#fff4e0;padding:4px 8px;border-radius:4px}
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}
h1{margin:0 0 .3rem 0} .meta{color:#666;margin-bottom:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1rem;margin:0 0 1rem 0;display:flex;gap:1rem}
.card.error{border-color:#d33;background:#fff5f5}
.imgs{display:flex;gap:.5rem;flex:0 0 auto} .imgs img{max-width:260px;max-height:260px;border:1px solid #ccc}
.body{flex:1 1 auto;min-width:0} pre{white-space:pre-wrap;background:#f4f4f4;padding:.5rem;border-radius:4px}
table.fields{border-collapse:collapse;font-size:.9rem} table.fields td{border-bottom:1px solid #eee;padding:2px 8px}
.status-ok{color:#080;font-weight:600} .status-error{color:#c00;font-weight:600} .small{color:#777;font-size:.85rem}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _card(rec: dict) -> str:
    status = rec.get("status", "?")
    imgs = []
    slides = rec.get("slides") or [rec]  # a case record lists its slides
    for n, entry in enumerate(slides, 1):
        for key, label in (("thumbnail_path", "thumbnail"), ("heatmap_path", "heatmap")):
            if entry.get(key):
                src = _e(Path(entry[key]).as_posix())
                what = f"{label} of {rec.get('id')}" + (f" slide {n}" if len(slides) > 1 else "")
                imgs.append(f'<a href="{src}"><img src="{src}" alt="{_e(what)}" loading="lazy"></a>')
    body = [f'<h2 id="{_e(rec.get("id"))}">{_e(rec.get("id"))} '
            f'<span class="status-{_e(status)}">{_e(status)}</span></h2>']
    if rec.get("slides"):
        body += [f'<div class="small">Slide {n}{" (" + _e(e.get("label")) + ")" if e.get("label") else ""}: '
                 f'{_e(e.get("slide_path"))}</div>' for n, e in enumerate(rec["slides"], 1)]
        body.append(f'<div class="small">model {_e(rec.get("model"))}</div>')
    else:
        body.append(f'<div class="small">{_e(rec.get("slide_path"))} · sha256 '
                    f'{_e((rec.get("slide_sha256") or "")[:16])} · model {_e(rec.get("model"))}</div>')
    if rec.get("case_id"):
        body.append(f'<div class="small">case {_e(rec["case_id"])}</div>')
    for n, entry in enumerate(slides, 1):
        ood = entry.get("ood") or {}
        if ood.get("flagged"):
            where = f"Slide {n}: " if len(slides) > 1 else ""
            body.append(f'<p class="warning">{_e(where + str(ood.get("message", "")))}</p>')
    if rec.get("prompt"):
        body.append(f"<p><b>Clinical prompt:</b> {_e(rec['prompt'])}</p>")
    if status != "ok":
        body.append(f"<pre>{_e(rec.get('error'))}</pre>")
    else:
        fields = rec.get("fields") or {}
        rows = "".join(f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{_e(format_field(v, missing='—'))}</td></tr>"
                       for k, v in fields.items() if k != "summary")
        body.append(f'<table class="fields">{rows}</table>')
        body.append(f"<pre>{_e(rec.get('report_text'))}</pre>")
    timing = rec.get("timing") or {}
    if timing:
        body.append('<div class="small">' + " · ".join(f"{_e(k)} {float(v):.2f}" for k, v in timing.items()) + "</div>")
    cls = "card" + (" error" if status != "ok" else "")
    return f'<div class="{cls}"><div class="imgs">{"".join(imgs)}</div><div class="body">{"".join(body)}</div></div>'


def render_index(records: list[dict], model: str) -> str:
    """The HTML page for ``records`` (in order)."""
    n_ok = sum(r.get("status") == "ok" for r in records)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    errors = [r for r in records if r.get("status") != "ok"]
    toc = ""
    if errors:
        toc = "<p>Errors: " + ", ".join(f'<a href="#{_e(r.get("id"))}">{_e(r.get("id"))}</a>' for r in errors) + "</p>"
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Slide reports ({len(records)})</title><style>{CSS}</style></head><body>"
        f"<h1>Slide reports</h1><div class=\"meta\">{len(records)} slide(s): {n_ok} ok, {len(records) - n_ok} error"
        f" · model {_e(model)} · generated {_e(created)} · data: <a href=\"reports.jsonl\">reports.jsonl</a></div>"
        f"{toc}{''.join(_card(r) for r in records)}</body></html>\n"
    )


def write_index(out_dir: str | Path, records: list[dict], model: str) -> Path:
    """Write ``index.html`` atomically into ``out_dir``."""
    path = Path(out_dir) / "index.html"
    write_text_atomic(path, render_index(records, model))
    return path
