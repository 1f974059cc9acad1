"""The Gradio page: components and event wiring over ``app.service.ChatService``.

Layout: left column = slide (upload / examples, progress, thumbnail + tissue outline + heatmap, facts);
right column = chat (streamed answers, suggested questions, report, downloads). Every handler finds the
caller's ``SlideSession`` by ``request.session_hash``; model calls share one concurrency group so the
model is never oversubscribed, and the queue holds the rest.
"""

from __future__ import annotations

import functools
import html
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from slidechat.errors import SlideChatError
from slidechat.inference.region import parse_region

from slidechat.app.config import AppConfig
from slidechat.app.service import (STAGE_LABELS, STAGE_UNITS, SUGGESTED_QUESTIONS, ChatService, shown_question,
                                   slide_flagged, user_message)
from slidechat.app.session import SlideSession
from slidechat.app import export

log = logging.getLogger(__name__)

MODEL_GROUP = "model"

CSS = """
#sc-header h1 {margin-bottom: 0.1rem;}
#sc-header p {margin-top: 0; color: var(--body-text-color-subdued);}
.sc-status {padding: 0.55rem 0.8rem; border-radius: 8px; font-size: 0.95rem; line-height: 1.35;}
.sc-info {background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);}
.sc-ok {background: #ecfdf5; border: 1px solid #10b981; color: #065f46;}
.sc-error {background: #fef2f2; border: 1px solid #ef4444; color: #991b1b;}
.sc-warn {background: #fffbeb; border: 1px solid #f59e0b; color: #92400e; margin-top: 0.3rem;}
.sc-banner {background: #fffbeb; border: 1px solid #f59e0b; color: #92400e; padding: 0.55rem 0.8rem;
             border-radius: 8px; margin-bottom: 0.4rem;}
.sc-legend {display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; color: var(--body-text-color-subdued);}
.sc-legend .bar {flex: 1; height: 10px; border-radius: 5px;
  background: linear-gradient(90deg, #30123b, #4686fb, #1ae4b6, #a2fc3c, #faba39, #e4460a, #7a0403);}
#sc-facts table {font-size: 0.88rem;}
.sc-suggest button {font-size: 0.82rem !important;}
#sc-viewer-wrap {position: relative;}
#sc-osd {width: 100%; height: 520px; background: #f3f4f6; border: 1px solid var(--border-color-primary);
         border-radius: 8px;}
#sc-osd-empty {position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
               color: var(--body-text-color-subdued); pointer-events: none;}
#sc-viewer-state {display: none;}
.sc-toolbar {display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: center; font-size: 0.85rem; margin: 0.3rem 0;}
.sc-toolbar button {border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 0.15rem 0.55rem;
                    background: var(--background-fill-secondary); cursor: pointer;}
.sc-toolbar button.sc-active {background: #4f46e5; color: white;}
#sc-scalebar {position: absolute; left: 12px; bottom: 12px; background: rgba(255,255,255,0.85); padding: 2px 6px;
              border-radius: 4px; font-size: 0.75rem; color: #111; pointer-events: none; display: none;}
.sc-scalebar-line {height: 4px; background: #111; margin-top: 2px;}
.sc-evidence-box {border: 3px solid #f59e0b; box-sizing: border-box; pointer-events: none;}
.sc-evidence-box span {position: absolute; top: -1.4em; left: -3px; background: #f59e0b; color: #111;
                       font: bold 0.8rem/1.3 system-ui; padding: 0 5px; border-radius: 3px;}
.sc-region-box {border: 2px dashed #4f46e5; background: rgba(79,70,229,0.12); box-sizing: border-box;
                pointer-events: none;}
.sc-pixel-layer {image-rendering: pixelated; pointer-events: none; user-select: none;
                 max-width: none !important; max-height: none !important; display: block;}
#sc-evidence .sc-evidence-row {display: flex; flex-wrap: wrap; gap: 0.5rem;}
.sc-evidence-title {font-size: 0.85rem; margin-bottom: 0.3rem;}
#sc-evidence .sc-crop {margin: 0; width: 130px; cursor: pointer; border: 1px solid var(--border-color-primary);
                       border-radius: 6px; padding: 3px; background: var(--background-fill-secondary);}
#sc-evidence .sc-crop img {width: 100%; border-radius: 4px; display: block;}
#sc-evidence figcaption {font-size: 0.72rem; color: var(--body-text-color-subdued);}
.sc-evidence-note {font-size: 0.8rem; color: #92400e;}
"""

HEAD = ('<script src="/slidechat/static/openseadragon/openseadragon.min.js"></script>'
        '<script src="/slidechat/static/viewer.js"></script>')

VIEWER_HTML = """<div id="sc-viewer-wrap"><div class="sc-toolbar">
<label><input type="checkbox" id="sc-layer-tissue" checked> tissue outline</label>
<label><input type="checkbox" id="sc-layer-heatmap" checked> attention heatmap</label>
<label>opacity <input type="range" id="sc-layer-opacity" min="0" max="1" step="0.05" value="0.45"></label>
<label><input type="checkbox" id="sc-layer-grid"> patch grid</label>
<button type="button" id="sc-draw-region" title="drag a rectangle on the slide">▭ draw region</button>
<button type="button" id="sc-view-region" title="the part of the slide in view">ask about this view</button>
<span id="sc-layer-note" class="sc-evidence-note"></span></div>
<div style="position:relative"><div id="sc-osd"></div><div id="sc-osd-empty">Open a slide to view it here.</div>
<div id="sc-scalebar"><div class="sc-scalebar-label"></div><div class="sc-scalebar-line"></div></div></div></div>"""


# The ask event's first step, in the page: the region the handler receives is the one the viewer holds (drawn,
# "this view", typed, or emptied by "Whole slide"), read at the moment of asking rather than whatever copy of the
# region field Gradio last synced.
ASK_JS = """(question, show, alpha, region) => {
  const viewer = window.SlideChatViewer;
  return [question, show, alpha, viewer && viewer.regionForAsk ? viewer.regionForAsk(region) : region];
}"""


def _status(kind: str, text: str) -> str:
    """An HTML status line: kind is info | ok | warn | error. ``text`` is escaped (it may hold user file names)."""
    icon = {"info": "ℹ", "ok": "✓", "warn": "⚠", "error": "⚠"}[kind]  # plain symbols: no emoji font needed
    body = html.escape(text).replace("\n", "<br>")
    return f'<div class="sc-status sc-{kind}" role="{"alert" if kind == "error" else "status"}">{icon} {body}</div>'


def _facts_markdown(facts: dict[str, Any]) -> str:
    if not facts:
        return ""
    def cell(v: Any) -> str:
        return html.escape(str(v)).replace("|", "&#124;")

    rows = "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in facts.items())
    return "| Slide facts | |\n|---|---|\n" + rows


def _viewer_state_html(state: dict) -> str:
    return f'<div data-state="{html.escape(json.dumps(state), quote=True)}"></div>'


def _evidence_panel(session: SlideSession, mpp: float | None) -> str:
    """The last answer's evidence crops (clicking one flies the viewer there), or why there are none."""
    if session.evidence:
        return ('<div class="sc-evidence-title">Where the model looked (click a region to show it on the slide):'
                '</div><div class="sc-evidence-row">' + export.evidence_html(session.evidence, mpp) + "</div>")
    if session.evidence_error and session.transcript:
        return f'<div class="sc-evidence-note">⚠ Evidence unavailable: {html.escape(session.evidence_error)}</div>'
    return ""


def _session(service: ChatService, request: gr.Request | None) -> SlideSession:
    return service.registry.get(getattr(request, "session_hash", None) or "anonymous")


def _progress_callback(progress: Any):
    def report(stage: str, done: int, total: int) -> None:
        label = STAGE_LABELS.get(stage, stage)
        try:
            progress((done, max(total, 1)), desc=f"{label} ({done}/{total})", unit=STAGE_UNITS.get(stage, "steps"))
        except Exception:  # progress is cosmetic; never let it break encoding
            log.debug("progress update failed", exc_info=True)

    return report


class Handlers:
    """The page's event handlers over one ``ChatService`` (each finds the caller's session by its hash)."""

    def __init__(self, service: ChatService, examples: dict[str, Path]):
        self.service = service
        self.config: AppConfig = service.config
        self.examples = examples

    def session(self, request: gr.Request | None) -> SlideSession:
        return _session(self.service, request)

    def viewer(self, session: SlideSession) -> str:
        return _viewer_state_html(self.service.viewer_state(session))

    def evidence(self, session: SlideSession) -> str:
        slide = self.service.tiles.for_session(session.session_id)
        return _evidence_panel(session, slide.mpp if slide else None)

    # ---- opening a slide: the viewer shows it at once, encoding follows as its own queued step
    def start_upload(self, file: str | None, request: gr.Request):
        session = self.session(request)
        if not file:
            return gr.skip(), gr.skip(), ""
        name = Path(str(file)).name
        try:
            path = self.service.ingest_upload(session, file, name)
            self.service.open_viewer(session, path)
        except SlideChatError as exc:
            if session.busy is None:
                session.clear_slide()
                self.service.tiles.close_session(session.session_id)
            return _status("error", f"Could not open this slide. {user_message(exc)}"), self.viewer(session), ""
        session.info = {"pending": str(path)}
        return (_status("info", f"Opening {name}: the slide is shown; detecting tissue, tiling and encoding…"),
                self.viewer(session), str(path))

    def encode_upload(self, pending: str, mpp: float | None, show: bool, alpha: float, request: gr.Request,
                      progress=gr.Progress()):
        session = self.session(request)
        if not pending:
            if session.slide is None:  # the upload failed and the old slide is closed: so are its panels
                yield (gr.skip(), None, "", [], gr.skip(), gr.update(value=None, visible=False),
                       gr.update(value=None, visible=False), gr.update(value=None, interactive=False), gr.skip(),
                       "", "", None)
            else:
                yield (gr.skip(),) * 11 + (None,)
            return
        for outputs, done in self._open(session, Path(pending), Path(pending).name, mpp, show, alpha, progress):
            yield outputs + ((None,) if done else (gr.skip(),))

    def open_example(self, label: str | None, mpp: float | None, show: bool, alpha: float, request: gr.Request,
                     progress=gr.Progress()):
        session = self.session(request)
        if not label or label not in self.examples:
            yield (_status("error", "Pick an example slide first."),) + (gr.skip(),) * 10
            return
        for outputs, _ in self._open(session, self.examples[label], label, mpp, show, alpha, progress):
            yield outputs

    def _open(self, session: SlideSession, path: Path, name: str, mpp: float | None, show: bool, alpha: float,
              progress: Any):
        """Yields (outputs, done): once the slide is tiled (outline and patch grid in the viewer, encoding
        still to come), then once it is open or has failed."""
        report = _progress_callback(progress)
        try:
            n = self.service.tile_slide(session, path, display_name=name, mpp=mpp or None, progress=report)
            if n is not None:
                status = _status("info", f"{name}: {n} tissue patches on the patch grid (tick “patch grid” to see "
                                         "them); encoding them…")
                yield ((status, self.service.slide_image(session, show, alpha)) + (gr.skip(),) * 6
                       + (self.viewer(session), gr.skip(), gr.skip())), False
            summary = self.service.open_slide(session, path, display_name=name, mpp=mpp or None, progress=report)
            how = "features reused from the cache" if summary.cached else f"encoded in {summary.seconds:.1f} s"
            status = _status("ok", f"Opened {name}: {summary.num_patches} tissue patches ({how}). "
                                   "Ask a question below.")
            if summary.notice:
                status += _status("warn", summary.notice)
        except SlideChatError as exc:
            if session.busy is None:
                session.clear_slide()
                self.service.tiles.close_session(session.session_id)
            status = _status("error", f"Could not open this slide. {user_message(exc)}")
        except Exception as exc:  # keep serving whatever happens
            log.exception("opening %s failed", name)
            status = _status("error", user_message(exc))
        image = self.service.slide_image(session, show, alpha)
        yield (status, image, _facts_markdown(session.info), list(session.transcript), "",
               gr.update(value=None, visible=False), gr.update(value=None, visible=False),
               gr.update(value=None, interactive=False), self.viewer(session), "", ""), True

    # ---- a case: several slides, one conversation; the strip of thumbnails picks the slide in the viewer
    def open_case(self, files: list | None, mpp: float | None, show: bool, alpha: float, request: gr.Request,
                  progress=gr.Progress()):
        session = self.session(request)
        files = [f for f in (files or []) if f]
        names = [Path(str(f)).name for f in files]
        try:
            paths = self.service.ingest_uploads(session, files, names)
            summary = self.service.open_case(session, paths, names=[Path(n).stem for n in names], mpp=mpp or None,
                                             progress=_progress_callback(progress))
            how = "features reused from the cache" if summary.cached else f"encoded in {summary.seconds:.1f} s"
            status = _status("ok", f"Opened a case of {len(session.case)} slides: {summary.num_patches} tissue "
                                   f"patches ({how}). Answers name the slide they are about; pick a slide in the "
                                   "strip to view it.")
            if summary.notice:
                status += _status("warn", summary.notice)
        except SlideChatError as exc:
            if session.busy is None:
                session.clear_slide()
                self.service.tiles.close_session(session.session_id)
            status = _status("error", f"Could not open this case. {user_message(exc)}")
        except Exception as exc:
            log.exception("opening a case failed")
            status = _status("error", user_message(exc))
        return (status, self.service.slide_image(session, show, alpha), _facts_markdown(session.info),
                list(session.transcript), "", gr.update(value=None, visible=False),
                gr.update(value=None, visible=False), gr.update(value=None, interactive=False), self.viewer(session),
                "", "", self.strip(session), None)  # the box is emptied: its files are the session's now (or gone)

    def strip(self, session: SlideSession):
        if not session.case:
            return gr.update(value=None, visible=False)
        return gr.update(value=[(m.outlined or m.thumbnail, m.name) for m in session.case], visible=True,
                         selected_index=session.active)

    def select_slide(self, show: bool, alpha: float, evt: gr.SelectData, request: gr.Request):
        session = self.session(request)
        try:
            self.service.select_slide(session, int(evt.index))
            status = _status("info", f"Viewing {session.case[session.active].name}; questions cover the whole "
                                     "case, a drawn region is on this slide.")
        except SlideChatError as exc:
            status = _status("error", user_message(exc))
        return status, self.service.slide_image(session, show, alpha), self.viewer(session), ""

    # ---- chat
    def ask(self, question: str, show: bool, alpha: float, region: str, request: gr.Request):
        session = self.service.registry.get(getattr(request, "session_hash", None) or "anonymous")
        history = list(session.transcript)
        question = (question or "").strip()
        keep = (gr.skip(),) * 2
        if not question:
            yield (history, gr.skip(), gr.skip(), _status("info", "Type a question about the slide."),
                   gr.skip()) + keep
            return
        try:
            box = parse_region(region) if (region or "").strip() else None
            stream = self.service.ask(session, question, region=box)
            shown = history + [{"role": "user", "content": shown_question(question, box)}]
            yield (shown + [{"role": "assistant", "content": "…"}], "", gr.skip(), gr.skip(), gr.skip()) + keep
            for answer in stream:
                yield (shown + [{"role": "assistant", "content": answer}], gr.skip(), gr.skip(), gr.skip(),
                       gr.skip()) + keep
        except SlideChatError as exc:
            yield (list(session.transcript), question, gr.skip(), _status("error", user_message(exc)),
                   gr.skip()) + keep
            return
        except Exception as exc:
            log.exception("answering failed")
            yield (list(session.transcript), question, gr.skip(), _status("error", user_message(exc)),
                   gr.skip()) + keep
            return
        yield self._answered(session, show, alpha)

    def _answered(self, session: SlideSession, show: bool, alpha: float):
        """The final update after an answer: the answer stays; a failed later step says so in its own place."""
        box = session.region
        where = f"the region {box[0]},{box[1]} {box[2]}×{box[3]} px" if box else "the whole slide"
        if session.case:
            where = (f"{where} on {session.case[session.region_slide or 0].name}" if box
                     else f"the whole case ({len(session.case)} slides)")
        text = f"Answered from {where}. The heatmap and numbered boxes show where the model looked."
        if session.heatmap_error:
            text = f"Answered from {where}. ({session.heatmap_error}.)"
        try:
            image = self.service.slide_image(session, show, alpha)
        except Exception:
            log.exception("overview image failed")
            image = gr.skip()
        try:
            conv_path = gr.update(value=str(self.service.export_conversation(session)), interactive=True)
        except Exception:
            log.exception("conversation export failed")
            conv_path = gr.skip()
        status = _status("ok", text)
        unlike = [m.name for m in session.case if slide_flagged(m.encoded)] if session.case else (
            ["This slide"] if slide_flagged(session.slide) else [])
        if unlike:  # the answer is read next to the reminder, not only after opening the slide
            status += _status("warn", f"{' and '.join(unlike)} {'is' if len(unlike) == 1 else 'are'} unlike the "
                                      "slides this model was trained on: read this answer with care.")
        return (list(session.transcript), gr.skip(), image, status, conv_path, self.viewer(session),
                self.evidence(session))

    def view(self, show: bool, alpha: float, request: gr.Request):
        return self.service.slide_image(self.session(request), show, alpha)

    def report(self, request: gr.Request):
        session = self.session(request)
        try:
            markdown, json_path, html_path = self.service.make_report(session, note=self.config.banner)
        except SlideChatError as exc:
            return gr.update(), gr.update(), _status("error", user_message(exc))
        except Exception as exc:
            log.exception("report failed")
            return gr.update(), gr.update(), _status("error", user_message(exc))
        return (gr.update(value=markdown, visible=True),
                gr.update(value=[str(json_path), str(html_path)], visible=True),
                _status("ok", "Report ready: download it as JSON or HTML (with the evidence crops) below."))

    def clear(self, show: bool, alpha: float, request: gr.Request):
        session = self.session(request)
        try:
            self.service.clear_chat(session)
            status = _status("info", "Conversation cleared; the slide stays open.")
        except SlideChatError as exc:
            status = _status("error", user_message(exc))
        return ([], self.service.slide_image(session, show, alpha), status, gr.update(value=None, visible=False),
                gr.update(value=None, visible=False), gr.update(value=None, interactive=False),
                self.viewer(session), "")

    def restart(self, request: gr.Request):
        session = self.session(request)
        try:
            self.service.restart(session)
            status = _status("info", "Start again: upload a slide or pick an example.")
        except SlideChatError as exc:
            status = _status("error", user_message(exc))
        return ([], None, "", status, gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                gr.update(value=None, interactive=False), None, self.viewer(session), "", "")

    def unload(self, request: gr.Request):
        self.service.registry.close(getattr(request, "session_hash", None))


def _slide_column(config: AppConfig, examples: dict[str, Path]) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Tab("Upload a slide"):
        c["upload"] = gr.File(label="Slide file (SVS, TIFF, NDPI, SCN, BIF, …)", file_count="single",
                              type="filepath", elem_id="sc-upload", height=110)
    with gr.Tab("Example slides"):
        c["example_pick"] = gr.Dropdown(choices=list(examples), value=next(iter(examples), None),
                                        label="Synthetic example slides (ground truth in the name)",
                                        elem_id="sc-example-pick")
        c["example_btn"] = gr.Button("Open example", variant="primary", elem_id="sc-open-example")
    with gr.Tab("Open a case"):
        c["case_upload"] = gr.File(label="Two or more slides of one case (blocks, levels, stains)",
                                   file_count="multiple", type="filepath", elem_id="sc-case-upload", height=110)
        c["case_btn"] = gr.Button("Open as one case", variant="primary", elem_id="sc-open-case")
    with gr.Accordion("Advanced", open=False):
        c["mpp"] = gr.Number(label="Microns per pixel (only for slides without it in the file)",
                             value=None, minimum=0.01, maximum=100, elem_id="sc-mpp")
    c["status"] = gr.HTML(_status("info", "Upload a slide or open an example to start."), elem_id="sc-status")
    c["strip"] = gr.Gallery(label="Slides of the case (pick one to view it)", visible=False, columns=8, rows=1,
                            height=150, allow_preview=False, object_fit="contain", elem_id="sc-case-strip")
    gr.HTML(VIEWER_HTML)
    c["viewer_state"] = gr.HTML(_viewer_state_html({}), elem_id="sc-viewer-state")
    c["pending"] = gr.Textbox(visible=False)
    with gr.Accordion("Overview image (thumbnail + heatmap)", open=False):
        c["image"] = gr.Image(label="Slide: tissue outline (green) and attention heatmap", type="pil",
                              interactive=False, elem_id="sc-image", height=320, buttons=["download", "fullscreen"])
        with gr.Row():
            c["show_heatmap"] = gr.Checkbox(value=True, label="Show attention heatmap", elem_id="sc-show-heatmap",
                                            scale=1, min_width=160)
            c["alpha"] = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity", elem_id="sc-alpha",
                                   scale=2, min_width=200)
    gr.HTML('<div class="sc-legend"><span>low attention</span><span class="bar"></span>'
            '<span>high attention</span></div>')
    c["facts"] = gr.Markdown("", elem_id="sc-facts", label="Slide facts")
    return c


def _chat_column(config: AppConfig) -> dict[str, Any]:
    c: dict[str, Any] = {}
    # plain text: the model writes no markdown, and "~40%" must not turn into strikethrough
    c["chatbot"] = gr.Chatbot(label="Conversation", elem_id="sc-chat", height=430, layout="bubble",
                              render_markdown=False, buttons=["copy"], feedback_options=None,
                              placeholder="Open a slide, then ask about tissue types, lesions, tumour fraction…")
    c["evidence"] = gr.HTML("", elem_id="sc-evidence")
    with gr.Row():
        c["region"] = gr.Textbox(label="Region (level-0 x, y, w, h): draw it on the viewer; empty = whole slide",
                                 elem_id="sc-region", scale=5, max_lines=1)
        c["whole"] = gr.Button("Whole slide", size="sm", scale=1, min_width=80, elem_id="sc-whole-slide")
    with gr.Row():
        c["question"] = gr.Textbox(placeholder="Ask a question about the slide and press Enter", show_label=False,
                                   scale=6, elem_id="sc-question", max_lines=4, max_length=config.max_question_chars)
        c["send"] = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="sc-send")
    with gr.Row(elem_classes="sc-suggest"):
        c["suggestions"] = [gr.Button(q, size="sm", variant="secondary") for q in SUGGESTED_QUESTIONS]
    with gr.Row():
        c["report_btn"] = gr.Button("Generate report", elem_id="sc-report")
        c["clear_btn"] = gr.Button("Clear chat", elem_id="sc-clear")
        c["restart_btn"] = gr.Button("↺ New slide", elem_id="sc-restart")
        c["download_conv"] = gr.DownloadButton("⬇ Download conversation", interactive=False,
                                               elem_id="sc-download-conv")
    c["report_md"] = gr.Markdown(visible=False, elem_id="sc-report-md")
    c["report_files"] = gr.File(label="Report downloads (JSON, HTML)", file_count="multiple", visible=False,
                                interactive=False, elem_id="sc-report-files")
    return c


def _wire_open(c: dict[str, Any], h: Handlers, model: dict) -> None:
    open_outputs = [c[k] for k in ("status", "image", "facts", "chatbot", "question", "report_md", "report_files",
                                   "download_conv", "viewer_state", "evidence", "region")]
    settings = [c["mpp"], c["show_heatmap"], c["alpha"]]
    c["upload"].upload(h.start_upload, c["upload"], [c["status"], c["viewer_state"], c["pending"]],
                       show_progress="hidden", api_name=False, concurrency_limit=None).then(
        h.encode_upload, [c["pending"]] + settings, open_outputs + [c["upload"]], show_progress="full",
        show_progress_on=[c["status"]], api_name="upload_slide", **model).then(
        lambda: gr.update(value=None, visible=False), None, c["strip"], queue=False, api_name=False)
    c["example_btn"].click(lambda label: _status("info", f"Opening {label}…"), c["example_pick"], c["status"],
                           queue=False, show_progress="hidden", api_name=False)
    c["example_btn"].click(h.open_example, [c["example_pick"]] + settings, open_outputs, show_progress="full",
                           show_progress_on=[c["status"]], api_name="open_example", **model).then(
        lambda: gr.update(value=None, visible=False), None, c["strip"], queue=False, api_name=False)
    c["case_btn"].click(h.open_case, [c["case_upload"]] + settings, open_outputs + [c["strip"], c["case_upload"]],
                        show_progress="full", show_progress_on=[c["status"]], api_name="open_case", **model)
    c["strip"].select(h.select_slide, [c["show_heatmap"], c["alpha"]],
                      [c["status"], c["image"], c["viewer_state"], c["region"]], api_name=False, **model)


def _wire_chat(c: dict[str, Any], h: Handlers, model: dict) -> None:
    ask_outputs = [c[k] for k in ("chatbot", "question", "image", "status", "download_conv", "viewer_state",
                                  "evidence")]
    ask_args = dict(fn=h.ask, inputs=[c["question"], c["show_heatmap"], c["alpha"], c["region"]],
                    outputs=ask_outputs, show_progress="minimal", show_progress_on=[c["chatbot"]], js=ASK_JS,
                    **model)
    c["question"].submit(api_name="ask", **ask_args)
    c["send"].click(api_name=False, **ask_args)
    for btn, q in zip(c["suggestions"], SUGGESTED_QUESTIONS):
        btn.click(functools.partial(lambda q: q, q), None, c["question"], queue=False, api_name=False).then(
            api_name=False, **ask_args)
    c["whole"].click(lambda: "", None, c["region"], queue=False, api_name=False)
    view = [c["show_heatmap"], c["alpha"]]
    c["show_heatmap"].change(h.view, view, c["image"], api_name=False, show_progress="hidden",
                             concurrency_limit=None)
    c["alpha"].release(h.view, view, c["image"], api_name="view", show_progress="hidden", concurrency_limit=None)
    c["report_btn"].click(h.report, None, [c["report_md"], c["report_files"], c["status"]], api_name="report",
                          show_progress_on=[c["status"]], **model)
    cleared = [c[k] for k in ("chatbot", "image", "status", "report_md", "report_files", "download_conv",
                              "viewer_state", "evidence")]
    c["clear_btn"].click(h.clear, view, cleared, api_name="clear", concurrency_limit=None)
    c["chatbot"].clear(h.clear, view, cleared, api_name=False, concurrency_limit=None)
    c["restart_btn"].click(h.restart, None, [c[k] for k in ("chatbot", "image", "facts", "status", "report_md",
                                                            "report_files", "download_conv", "upload",
                                                            "viewer_state", "evidence", "region")],
                           api_name="restart", concurrency_limit=None).then(
        lambda: gr.update(value=None, visible=False), None, c["strip"], queue=False, api_name=False)


def build_demo(service: ChatService, examples: dict[str, Path] | None = None) -> gr.Blocks:
    """The Blocks app for ``service`` (call ``.queue()`` / ``.launch()`` via ``app.server.launch``)."""
    config: AppConfig = service.config
    h = Handlers(service, dict(examples or {}))
    with gr.Blocks(title=config.title, delete_cache=(1800, 3600), fill_width=True) as demo:
        with gr.Column(elem_id="sc-header"):
            gr.Markdown(f"# {html.escape(config.title)}\nChat with a pathology whole-slide image. "
                        "Research demo — not for diagnosis."
                        + (f" Model: `{config.checkpoint_label}`." if config.checkpoint_label else ""))
            if config.banner:
                gr.HTML(f'<div class="sc-banner" id="sc-banner">⚠ {html.escape(config.banner)}</div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=6, min_width=420):
                c = _slide_column(config, h.examples)
            with gr.Column(scale=5, min_width=380):
                c.update(_chat_column(config))
        model = dict(concurrency_limit=config.concurrency, concurrency_id=MODEL_GROUP)
        _wire_open(c, h, model)
        _wire_chat(c, h, model)
        demo.unload(h.unload)
    return demo
