"""The Gradio page: components and event wiring over ``app.service.ChatService``.

Layout: left column = slide (upload / examples, progress, thumbnail + tissue outline + heatmap, facts);
right column = chat (streamed answers, suggested questions, report, downloads). Every handler finds the
caller's ``SlideSession`` by ``request.session_hash``; model calls share one concurrency group so the
model is never oversubscribed, and the queue holds the rest.
"""

from __future__ import annotations

import functools
import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from slidechat.errors import SlideChatError

from slidechat.app.config import AppConfig
from slidechat.app.service import STAGE_LABELS, STAGE_UNITS, SUGGESTED_QUESTIONS, ChatService, user_message
from slidechat.app.session import SlideSession

log = logging.getLogger(__name__)

MODEL_GROUP = "model"

CSS = """
#sc-header h1 {margin-bottom: 0.1rem;}
#sc-header p {margin-top: 0; color: var(--body-text-color-subdued);}
.sc-status {padding: 0.55rem 0.8rem; border-radius: 8px; font-size: 0.95rem; line-height: 1.35;}
.sc-info {background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);}
.sc-ok {background: #ecfdf5; border: 1px solid #10b981; color: #065f46;}
.sc-error {background: #fef2f2; border: 1px solid #ef4444; color: #991b1b;}
.sc-banner {background: #fffbeb; border: 1px solid #f59e0b; color: #92400e; padding: 0.55rem 0.8rem;
             border-radius: 8px; margin-bottom: 0.4rem;}
.sc-legend {display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; color: var(--body-text-color-subdued);}
.sc-legend .bar {flex: 1; height: 10px; border-radius: 5px;
  background: linear-gradient(90deg, #30123b, #4686fb, #1ae4b6, #a2fc3c, #faba39, #e4460a, #7a0403);}
#sc-facts table {font-size: 0.88rem;}
.sc-suggest button {font-size: 0.82rem !important;}
"""


def _status(kind: str, text: str) -> str:
    """An HTML status line: kind is info | ok | error. ``text`` is escaped (it may hold user file names)."""
    icon = {"info": "ℹ", "ok": "✓", "error": "⚠"}[kind]  # plain symbols: no emoji font needed
    body = html.escape(text).replace("\n", "<br>")
    return f'<div class="sc-status sc-{kind}" role="{"alert" if kind == "error" else "status"}">{icon} {body}</div>'


def _facts_markdown(facts: dict[str, Any]) -> str:
    if not facts:
        return ""
    def cell(v: Any) -> str:
        return html.escape(str(v)).replace("|", "&#124;")

    rows = "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in facts.items())
    return "| Slide facts | |\n|---|---|\n" + rows


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


def build_demo(service: ChatService, examples: dict[str, Path] | None = None) -> gr.Blocks:
    """The Blocks app for ``service`` (call ``.queue()`` / ``.launch()`` via ``app.server.launch``)."""
    config: AppConfig = service.config
    examples = dict(examples or {})

    # ------------------------------------------------------------------ handlers
    def open_path(session: SlideSession, path: Path, name: str, mpp: float | None, progress: Any):
        summary = service.open_slide(session, path, display_name=name, mpp=mpp or None,
                                     progress=_progress_callback(progress))
        how = "features reused from the cache" if summary.cached else f"encoded in {summary.seconds:.1f} s"
        status = _status("ok", f"Opened {name}: {summary.num_patches} tissue patches ({how}). Ask a question below.")
        return status

    def after_open(session: SlideSession, status: str, show: bool, alpha: float):
        image = service.slide_image(session, show, alpha)
        return (status, image, _facts_markdown(session.info), list(session.transcript), "",
                gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                gr.update(value=None, interactive=False))

    def on_upload(file: str | None, mpp: float | None, show: bool, alpha: float, request: gr.Request,
                  progress=gr.Progress()):
        session = _session(service, request)
        if not file:
            return (gr.skip(),) * 8 + (None,)
        name = Path(str(file)).name
        try:
            path = service.ingest_upload(session, file, name)
            status = open_path(session, path, name, mpp, progress)
        except SlideChatError as exc:
            if session.busy is None:
                session.clear_slide()
            status = _status("error", f"Could not open this slide. {user_message(exc)}")
        except Exception as exc:  # keep serving whatever happens
            log.exception("opening upload %s failed", name)
            status = _status("error", user_message(exc))
        return after_open(session, status, show, alpha) + (None,)

    def on_example(label: str | None, mpp: float | None, show: bool, alpha: float, request: gr.Request,
                   progress=gr.Progress()):
        session = _session(service, request)
        if not label or label not in examples:
            return (_status("error", "Pick an example slide first."),) + (gr.skip(),) * 7
        try:
            status = open_path(session, examples[label], label, mpp, progress)
        except SlideChatError as exc:
            status = _status("error", f"Could not open the example: {user_message(exc)}")
        except Exception as exc:
            log.exception("opening example %s failed", label)
            status = _status("error", user_message(exc))
        return after_open(session, status, show, alpha)

    def on_ask(question: str, show: bool, alpha: float, request: gr.Request):
        session = _session(service, request)
        history = list(session.transcript)
        question = (question or "").strip()
        if not question:
            yield history, gr.skip(), gr.skip(), _status("info", "Type a question about the slide."), gr.skip()
            return
        try:
            stream = service.ask(session, question)
            shown = history + [{"role": "user", "content": question}]
            yield shown + [{"role": "assistant", "content": "…"}], "", gr.skip(), gr.skip(), gr.skip()
            for answer in stream:
                yield shown + [{"role": "assistant", "content": answer}], gr.skip(), gr.skip(), gr.skip(), gr.skip()
            conv_path = service.export_conversation(session)
            yield (list(session.transcript), gr.skip(), service.slide_image(session, show, alpha),
                   _status("ok", "Answered. The heatmap shows where the model looked for this answer."),
                   gr.update(value=str(conv_path), interactive=True))
        except SlideChatError as exc:
            yield list(session.transcript), question, gr.skip(), _status("error", user_message(exc)), gr.skip()
        except Exception as exc:
            log.exception("answering failed")
            yield list(session.transcript), question, gr.skip(), _status("error", user_message(exc)), gr.skip()

    def on_view(show: bool, alpha: float, request: gr.Request):
        return service.slide_image(_session(service, request), show, alpha)

    def on_report(request: gr.Request):
        session = _session(service, request)
        try:
            markdown, json_path, html_path = service.make_report(session, note=config.banner)
        except SlideChatError as exc:
            return gr.update(), gr.update(), _status("error", user_message(exc))
        except Exception as exc:
            log.exception("report failed")
            return gr.update(), gr.update(), _status("error", user_message(exc))
        return (gr.update(value=markdown, visible=True), gr.update(value=[str(json_path), str(html_path)], visible=True),
                _status("ok", "Report ready: download it as JSON or HTML below the report."))

    def on_clear(show: bool, alpha: float, request: gr.Request):
        session = _session(service, request)
        try:
            service.clear_chat(session)
            status = _status("info", "Conversation cleared; the slide stays open.")
        except SlideChatError as exc:
            status = _status("error", user_message(exc))
        return ([], service.slide_image(session, show, alpha), status, gr.update(value=None, visible=False),
                gr.update(value=None, visible=False), gr.update(value=None, interactive=False))

    def on_restart(request: gr.Request):
        session = _session(service, request)
        try:
            service.restart(session)
            status = _status("info", "Start again: upload a slide or pick an example.")
        except SlideChatError as exc:
            status = _status("error", user_message(exc))
        return ([], None, "", status, gr.update(value=None, visible=False), gr.update(value=None, visible=False),
                gr.update(value=None, interactive=False), None)

    def on_unload(request: gr.Request):
        service.registry.close(getattr(request, "session_hash", None))

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title=config.title, delete_cache=(1800, 3600), fill_width=True) as demo:
        with gr.Column(elem_id="sc-header"):
            gr.Markdown(f"# {html.escape(config.title)}\nChat with a pathology whole-slide image. "
                        "Research demo — not for diagnosis."
                        + (f" Model: `{config.checkpoint_label}`." if config.checkpoint_label else ""))
            if config.banner:
                gr.HTML(f'<div class="sc-banner" id="sc-banner">⚠ {html.escape(config.banner)}</div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                with gr.Tab("Upload a slide"):
                    upload = gr.File(label="Slide file (SVS, TIFF, NDPI, SCN, BIF, …)", file_count="single",
                                     type="filepath", elem_id="sc-upload", height=120)
                with gr.Tab("Example slides"):
                    example_pick = gr.Dropdown(choices=list(examples), value=next(iter(examples), None),
                                               label="Synthetic example slides (ground truth in the name)",
                                               elem_id="sc-example-pick")
                    example_btn = gr.Button("Open example", variant="primary", elem_id="sc-open-example")
                with gr.Accordion("Advanced", open=False):
                    mpp = gr.Number(label="Microns per pixel (only for slides without it in the file)",
                                    value=None, minimum=0.01, maximum=100, elem_id="sc-mpp")
                status = gr.HTML(_status("info", "Upload a slide or open an example to start."), elem_id="sc-status")
                image = gr.Image(label="Slide: tissue outline (green) and attention heatmap", type="pil",
                                 interactive=False, elem_id="sc-image", height=420, buttons=["download", "fullscreen"])
                with gr.Row():
                    show_heatmap = gr.Checkbox(value=True, label="Show attention heatmap", elem_id="sc-show-heatmap",
                                               scale=1, min_width=160)
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity", elem_id="sc-alpha",
                                      scale=2, min_width=200)
                gr.HTML('<div class="sc-legend"><span>low attention</span><span class="bar"></span>'
                        '<span>high attention</span></div>')
                facts = gr.Markdown("", elem_id="sc-facts", label="Slide facts")
            with gr.Column(scale=6, min_width=420):
                chatbot = gr.Chatbot(label="Conversation", elem_id="sc-chat", height=470, layout="bubble",
                                     buttons=["copy"], feedback_options=None,
                                     placeholder="Open a slide, then ask about tissue types, lesions, tumour fraction…")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask a question about the slide and press Enter",
                                          show_label=False, scale=6, elem_id="sc-question", max_lines=4,
                                          max_length=config.max_question_chars)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="sc-send")
                with gr.Row(elem_classes="sc-suggest"):
                    suggestion_btns = [gr.Button(q, size="sm", variant="secondary") for q in SUGGESTED_QUESTIONS]
                with gr.Row():
                    report_btn = gr.Button("Generate report", elem_id="sc-report")
                    clear_btn = gr.Button("Clear chat", elem_id="sc-clear")
                    restart_btn = gr.Button("↺ New slide", elem_id="sc-restart")
                    download_conv = gr.DownloadButton("⬇ Download conversation", interactive=False,
                                                      elem_id="sc-download-conv")
                report_md = gr.Markdown(visible=False, elem_id="sc-report-md")
                report_files = gr.File(label="Report downloads (JSON, HTML)", file_count="multiple",
                                       visible=False, interactive=False, elem_id="sc-report-files")

        # ------------------------------------------------------------------ events
        model = dict(concurrency_limit=config.concurrency, concurrency_id=MODEL_GROUP)
        open_outputs = [status, image, facts, chatbot, question, report_md, report_files, download_conv]
        upload.upload(lambda f: _status("info", f"Opening {Path(str(f)).name if f else 'the slide'}: detecting tissue, "
                                              "tiling and encoding…"),
                      upload, status, queue=False, show_progress="hidden", api_name=False)
        example_btn.click(lambda label: _status("info", f"Opening {label}…"), example_pick, status, queue=False,
                          show_progress="hidden", api_name=False)
        upload.upload(on_upload, [upload, mpp, show_heatmap, alpha], open_outputs + [upload],
                      show_progress="full", show_progress_on=[image], api_name="upload_slide", **model)
        example_btn.click(on_example, [example_pick, mpp, show_heatmap, alpha], open_outputs,
                          show_progress="full", show_progress_on=[image], api_name="open_example", **model)
        ask_outputs = [chatbot, question, image, status, download_conv]
        ask_args = dict(fn=on_ask, inputs=[question, show_heatmap, alpha], outputs=ask_outputs,
                        show_progress="minimal", show_progress_on=[chatbot], **model)
        question.submit(api_name="ask", **ask_args)
        send.click(api_name=False, **ask_args)
        for btn, q in zip(suggestion_btns, SUGGESTED_QUESTIONS):
            btn.click(functools.partial(lambda q: q, q), None, question, queue=False, api_name=False).then(
                api_name=False, **ask_args)
        show_heatmap.change(on_view, [show_heatmap, alpha], image, api_name=False, show_progress="hidden",
                            concurrency_limit=None)
        alpha.release(on_view, [show_heatmap, alpha], image, api_name="view", show_progress="hidden",
                      concurrency_limit=None)
        report_btn.click(on_report, None, [report_md, report_files, status], api_name="report",
                         show_progress_on=[status], **model)
        clear_btn.click(on_clear, [show_heatmap, alpha], [chatbot, image, status, report_md, report_files,
                                                          download_conv], api_name="clear", concurrency_limit=None)
        chatbot.clear(on_clear, [show_heatmap, alpha], [chatbot, image, status, report_md, report_files,
                                                     download_conv], api_name=False, concurrency_limit=None)
        restart_btn.click(on_restart, None, [chatbot, image, facts, status, report_md, report_files, download_conv,
                                             upload], api_name="restart", concurrency_limit=None)
        demo.unload(on_unload)
    return demo
