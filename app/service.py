"""What the app does, without Gradio: open a slide, chat, render the heatmap, report, export.

``ChatService`` wraps one ``SlideAssistant`` (the model API of ``slidechat.inference``) and works on a
``SlideSession``; ``app.ui`` only wires these calls to components, so tests call them directly.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from slidechat.errors import MissingMppError, NoTissueError, SlideChatError, SlideReadError
from slidechat import viz

from slidechat.app.config import AppConfig
from slidechat.app.session import SessionRegistry, SlideSession
from slidechat.app import export

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

STAGE_LABELS = {"tissue": "Detecting tissue", "tiling": "Tiling", "encoding": "Encoding patches"}
STAGE_UNITS = {"tissue": "steps", "tiling": "tiles", "encoding": "patches"}

SUGGESTED_QUESTIONS = (
    "Which tissue types are present in this slide?",
    "Is there a focal lesion? Where is it?",
    "What percentage of the tissue is tumour?",
    "Write a short pathology report describing this slide.",
)

_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


class UploadTooLargeError(SlideReadError):
    """The uploaded file is over the app's size limit."""


@dataclass
class SlideSummary:
    """What the page shows after a slide is opened."""

    facts: dict[str, Any]
    num_patches: int
    cached: bool  # features came from the on-disk cache (no encoding)
    seconds: float


def safe_filename(name: str, default: str = "slide") -> str:
    """A file name without folders or odd characters (keeps the extension)."""
    base = Path(str(name or "")).name
    base = _NAME_OK.sub("_", base).strip("._") or default
    return base[:120]


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def user_message(exc: BaseException, hide: dict[str, str] | None = None) -> str:
    """The message to show for an error: SlideChatError text with server paths replaced by display names."""
    text = str(exc) if isinstance(exc, SlideChatError) else (
        f"Something went wrong while processing your request ({type(exc).__name__}). "
        "The app is still running; try again or try another slide.")
    for real, shown in (hide or {}).items():
        if real:
            text = text.replace(real, shown)
    return text


class ChatService:
    """One model shared by all sessions; every method takes the caller's ``SlideSession``."""

    def __init__(self, assistant: Any, config: AppConfig, registry: SessionRegistry | None = None):
        self.assistant = assistant
        self.config = config
        self.registry = registry or SessionRegistry(max_sessions=config.max_sessions, ttl_s=config.session_ttl_s)
        self._heatmap_lock = threading.Lock()  # the LLM-weighted heatmap switches the attention implementation
        Path(config.features_dir).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ slides
    def ingest_upload(self, session: SlideSession, uploaded: str | Path, original_name: str | None = None) -> Path:
        """Check the upload's size and move it into the session's private folder. Returns the new path."""
        src = Path(uploaded)
        name = safe_filename(original_name or src.name)
        if not src.is_file():
            raise SlideReadError(f"{name}: the upload did not arrive; try again")
        size = src.stat().st_size
        if size > self.config.max_upload_bytes:
            src.unlink(missing_ok=True)
            raise UploadTooLargeError(
                f"{name} is {_human_bytes(size)}, over this app's upload limit of {self.config.max_upload_mb:g} MB; "
                "start the app with a larger --max-upload-mb, or run `slidechat extract` on the file instead")
        if size == 0:
            raise SlideReadError(f"{name}: the file is empty; re-export or re-copy the slide")
        with session.task("receiving an upload"):
            session.clear_slide()
            dest_dir = session.workdir / "upload"
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / name
            try:
                shutil.move(str(src), dest)
            except OSError:
                shutil.copyfile(src, dest)
        return dest

    def open_slide(self, session: SlideSession, path: str | Path, *, display_name: str | None = None,
                   mpp: float | None = None, progress: ProgressFn | None = None) -> SlideSummary:
        """Read the slide, find tissue (thumbnail + outline), encode it (cached by sha256), start a conversation.

        Raises SlideChatError subclasses (not a slide, truncated, bomb, no tissue, no mpp) with messages that
        name the file as the user knows it.
        """
        from slidechat.slide.reader import SlideReader
        from slidechat.slide.tissue import detect_tissue

        path = Path(path)
        name = display_name or path.name
        t0 = time.perf_counter()
        stages_seen: set[str] = set()

        def on_progress(stage: str, done: int, total: int) -> None:
            stages_seen.add(stage)
            if progress is not None:
                progress(stage, int(done), int(total))

        with session.task("encoding a slide"):
            if session.slide is not None and session.slide.source_path is not None \
                    and Path(session.slide.source_path) != path:
                session.clear_slide()
            try:
                on_progress("tissue", 0, 1)
                with SlideReader(path, mpp=mpp) as reader:
                    info = reader.info()
                    if mpp is None:
                        _ = reader.mpp  # raises MissingMppError with what to do
                    tissue = detect_tissue(reader, thumbnail_size=self.config.thumbnail_size)
                    level0 = tuple(int(v) for v in reader.dimensions)
                on_progress("tissue", 1, 1)
                encoded = self.assistant.encode_slide(path, mpp=mpp, progress=on_progress,
                                                      cache_dir=self.config.features_dir)
                conversation = self.assistant.chat(encoded, max_new_tokens=self.config.max_new_tokens)
            except SlideChatError as exc:
                text = user_message(exc, {str(path): name, str(path.parent) + "/": ""})
                if isinstance(exc, NoTissueError):  # the app has no threshold option: say what to check instead
                    text = re.sub(r";\s*if the slide is faint.*$", "; check that the file shows stained tissue "
                                  "(a faint slide can be extracted with `slidechat extract --tissue-threshold`)", text)
                if isinstance(exc, MissingMppError):
                    text = text.replace("pass it with --mpp", "enter it under Advanced → Microns per pixel") \
                               .replace("--mpp ", "").replace("--mpp", "microns per pixel")
                raise type(exc)(text) from exc
            from PIL import Image

            thumb = Image.fromarray(tissue.thumbnail) if tissue.thumbnail is not None else None
            session.thumbnail = thumb
            session.outlined = viz.draw_tissue_outline(thumb, tissue.contours, level0) if thumb is not None else None
            session.level0_size = level0
            session.slide = encoded
            session.conversation = conversation
            session.source_name = name
            session.heatmap = None
            session.transcript = []
            n = int(encoded.features.features.shape[0])
            facts = {
                "slide": name,
                "vendor": info.get("vendor") or "unknown",
                "size (px)": f"{level0[0]:,} × {level0[1]:,}",
                "mpp (µm/px)": f"{float(info['mpp']):.3f}" if info.get("mpp") else (f"{mpp:.3f} (given)" if mpp else "unknown"),
                "magnification": f"{info['magnification']:g}×" if info.get("magnification") else "unknown",
                "levels": info.get("levels"),
                "tissue": f"{100 * tissue.tissue_fraction:.1f}% of the thumbnail",
                "patches": n,
                "sha256": str(encoded.sha256)[:16] + "…",
            }
            session.info = facts
            cached = "encoding" not in stages_seen
            session.touch()
            return SlideSummary(facts=facts, num_patches=n, cached=cached, seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ chat
    def ask(self, session: SlideSession, question: str, max_new_tokens: int | None = None) -> Iterator[str]:
        """Stream the answer to ``question`` as growing text; appends both turns to the transcript and
        computes the heatmap of this answer when the stream ends."""
        question = (question or "").strip()
        if session.conversation is None:
            raise SlideChatError("open a slide first: upload one or pick an example")
        if not question:
            raise SlideChatError("the question is empty; type a question about the slide")
        if len(question) > self.config.max_question_chars:
            raise SlideChatError(f"the question is {len(question)} characters long; keep it under "
                                 f"{self.config.max_question_chars}")
        with session.task("answering a question"):
            conv = session.conversation
            session.transcript.append({"role": "user", "content": question})
            answer = ""
            try:
                for piece in conv.ask(question, stream=True, max_new_tokens=max_new_tokens or self.config.max_new_tokens):
                    answer += piece
                    yield answer
            finally:
                session.transcript.append({"role": "assistant", "content": answer.strip() or "…"})
            session.heatmap = self._heatmap(conv)

    def _heatmap(self, conv: Any) -> Any:
        try:
            with self._heatmap_lock:
                return conv.heatmap(weighting="llm")
        except TypeError:  # a model whose heatmap takes no weighting
            return conv.heatmap()
        except SlideChatError:
            return conv.heatmap()

    def clear_chat(self, session: SlideSession) -> None:
        """Start the conversation over (the slide stays open and encoded)."""
        with session.task("clearing the chat"):
            if session.conversation is not None:
                session.conversation.reset()
            session.transcript = []
            session.heatmap = None
            session.report = None

    def restart(self, session: SlideSession) -> None:
        """Forget the slide, the conversation and the session's files."""
        with session.task("restarting"):
            session.clear_slide()

    # ------------------------------------------------------------------ images
    def slide_image(self, session: SlideSession, show_heatmap: bool = True, alpha: float = 0.45) -> Any:
        """The thumbnail with the tissue outline, plus the last answer's heatmap when asked (None: no slide)."""
        if session.outlined is None:
            return None
        hm = session.heatmap
        if not show_heatmap or hm is None or alpha <= 0:
            return session.outlined
        return viz.overlay_heatmap(session.outlined, hm.scores, hm.coords, hm.patch_size_level0,
                                   session.level0_size, alpha=float(alpha))

    # ------------------------------------------------------------------ report + export
    def make_report(self, session: SlideSession, note: str | None = None) -> tuple[str, Path, Path]:
        """Generate the structured report; returns (markdown, json_path, html_path)."""
        if session.slide is None:
            raise SlideChatError("open a slide first: upload one or pick an example")
        with session.task("writing the report"):
            report = self.assistant.report(session.slide, max_new_tokens=self.config.report_max_new_tokens,
                                           summary_max_new_tokens=self.config.report_summary_tokens)
            session.report = report
            images = {"thumbnail with tissue outline": session.outlined}
            if session.heatmap is not None:
                images["attention heatmap (last answer)"] = self.slide_image(session, True, 0.5)
            stem = safe_filename(Path(session.source_name).stem or "slide")
            out = session.workdir / "downloads"
            json_path, html_path = export.write_report_files(out, stem, report, session.info, images,
                                                             self.config.checkpoint_label, note)
            return export.report_markdown(report), json_path, html_path

    def export_conversation(self, session: SlideSession) -> Path:
        """Write the conversation (slide facts + messages) as JSON into the session folder."""
        if not session.transcript:
            raise SlideChatError("nothing to download yet: ask a question first")
        stem = safe_filename(Path(session.source_name).stem or "slide")
        path = session.workdir / "downloads" / f"{stem}.conversation.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return export.write_conversation(path, session.transcript, session.info, self.config.checkpoint_label)
