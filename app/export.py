"""Files a user downloads from the app: the conversation (JSON) and the report (JSON + HTML)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Any

from slidechat.utils.io import write_json_atomic, write_text_atomic


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and paths -> plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def conversation_record(transcript: list[dict], slide_info: dict, model_label: str = "") -> dict:
    """The downloadable conversation: slide facts + messages, ready for json.dumps."""
    return {
        "exported_at": _now(),
        "model": model_label,
        "slide": _jsonable(slide_info),
        "messages": [{"role": m["role"], "content": str(m["content"])} for m in transcript],
    }


def write_conversation(path: Path, transcript: list[dict], slide_info: dict, model_label: str = "") -> Path:
    write_json_atomic(path, conversation_record(transcript, slide_info, model_label))
    return Path(path)


def report_record(report: Any, slide_info: dict, model_label: str = "", evidence: list[dict] | None = None) -> dict:
    return {
        "generated_at": _now(),
        "model": model_label,
        "slide": _jsonable(slide_info),
        "fields": _jsonable(dict(getattr(report, "fields", {}) or {})),
        "text": str(getattr(report, "text", "")),
        "evidence": [{"rank": e["rank"], "box": _jsonable(e["box"]), "score": e["score"],
                      **({"slide": int(e["slide"]), "slide_name": e.get("slide_name")} if "slide" in e else {})}
                     for e in evidence or []],
    }


def evidence_caption(entry: dict, mpp: float | None = None) -> str:
    x, y, w, h = entry["box"]
    size = f"{w * mpp:.0f} × {h * mpp:.0f} µm" if mpp else f"{w} × {h} px"
    where = f"{entry['slide_name']} · " if entry.get("slide_name") else ""
    return f"#{entry['rank']} · {where}score {entry['score']:.2f} · at ({x:,}, {y:,}) · {size}"


def evidence_html(evidence: list[dict], mpp: float | None = None) -> str:
    """Numbered evidence crops as figures (embedded JPEG); ``data-box`` lets the page fly its viewer there."""
    figs = []
    for e in evidence:
        box = html.escape(json.dumps([int(v) for v in e["box"]]))
        img = _img_tag(e.get("crop"), evidence_caption(e, mpp), max_side=384, figure=False)
        slide = f' data-slide="{int(e["slide"])}"' if "slide" in e else ""
        figs.append(f'<figure class="sc-crop" data-box="{box}" data-rank="{int(e["rank"])}"{slide} '
                    'title="show on the slide">'
                    f'{img}<figcaption>{html.escape(evidence_caption(e, mpp))}</figcaption></figure>')
    return "".join(figs)


def report_markdown(report: Any) -> str:
    """The report's own Markdown when it has one, else fields as a list plus the text."""
    to_md = getattr(report, "to_markdown", None)
    if callable(to_md):
        return str(to_md())
    lines = [f"- **{k}**: {v}" for k, v in (getattr(report, "fields", {}) or {}).items()]
    return "\n".join(lines + ["", str(getattr(report, "text", ""))])


def markdown_to_html(markdown: str) -> str:
    try:
        from markdown_it import MarkdownIt

        return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    except ImportError:  # pragma: no cover - markdown-it ships with gradio's dependencies
        return f"<pre>{html.escape(markdown)}</pre>"


def _img_tag(image: Any, alt: str, max_side: int = 800, figure: bool = True) -> str:
    if image is None:
        return "" if figure else '<div class="sc-crop-missing">no image</div>'
    img = image.convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    tag = f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{data}">'
    return f"<figure>{tag}<figcaption>{html.escape(alt)}</figcaption></figure>" if figure else tag


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:960px;margin:2rem auto;padding:0 1rem;color:#1f2937}
h1{font-size:1.6rem;margin-bottom:.2rem} .meta{color:#6b7280;font-size:.9rem}
table{border-collapse:collapse;margin:1rem 0} td,th{border:1px solid #d1d5db;padding:.3rem .6rem;text-align:left}
figure{display:inline-block;margin:.5rem} img{max-width:440px;border:1px solid #e5e7eb;border-radius:6px}
.evidence figure{width:200px;vertical-align:top} .evidence img{max-width:196px}
figcaption{font-size:.8rem;color:#4b5563} .note{background:#fef3c7;border:1px solid #f59e0b;padding:.5rem .8rem;border-radius:6px}
"""


def report_html(report: Any, slide_info: dict, images: dict[str, Any] | None = None, model_label: str = "",
                note: str | None = None, evidence: list[dict] | None = None) -> str:
    """A self-contained HTML page: slide facts, images (embedded PNG), the report and its fields."""
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in slide_info.items()
    )
    figs = "".join(_img_tag(img, name) for name, img in (images or {}).items())
    fields = getattr(report, "fields", {}) or {}
    field_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(_jsonable(v)) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in fields.items()
    )
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    title = html.escape(str(slide_info.get("slide", slide_info.get("file", "slide"))))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SlideChat report: {title}</title><style>{_CSS}</style></head>
<body>
<h1>SlideChat report: {title}</h1>
<p class="meta">Generated {html.escape(_now())}{' with ' + html.escape(model_label) if model_label else ''}.
Machine-generated; not a diagnosis.</p>
{note_html}
<h2>Slide</h2><table>{facts}</table>
{figs}
{'<h2>Evidence: the most attended regions</h2><div class="evidence">' + evidence_html(evidence) + '</div>' if evidence else ''}
<h2>Report</h2>
{markdown_to_html(report_markdown(report))}
<h2>Structured fields</h2><table>{field_rows}</table>
</body></html>
"""


def write_report_files(out_dir: Path, stem: str, report: Any, slide_info: dict, images: dict[str, Any] | None = None,
                       model_label: str = "", note: str | None = None,
                       evidence: list[dict] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.report.json`` and ``<stem>.report.html`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path = out_dir / f"{stem}.report.json"
    html_path = out_dir / f"{stem}.report.html"
    write_json_atomic(json_path, report_record(report, slide_info, model_label, evidence))
    write_text_atomic(html_path, report_html(report, slide_info, images, model_label, note, evidence))
    return json_path, html_path
