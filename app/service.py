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
from slidechat.inference.region import parse_region

from slidechat.app.config import AppConfig
from slidechat.app.session import SessionRegistry, SlideSession
from slidechat.app import export, overlays
from slidechat.app.tiles import TileServer

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

STAGE_LABELS = {"tissue": "Detecting tissue", "tiling": "Tiling", "encoding": "Encoding patches"}
STAGE_UNITS = {"tissue": "steps", "tiling": "tiles", "encoding": "patches"}

SUGGESTED_QUESTIONS = (
    "Describe this slide.",
    "Which tissue types are present in this slide?",
    "Is there a focal lesion, and where is it?",
    "Is there tumour in this slide?",
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
    notice: str | None = None  # the out-of-distribution warning when the slide is unlike the training slides


@dataclass
class TiledSlide:
    """A slide's tissue and patch grid, found before its patches are encoded."""

    path: Path  # resolved
    mpp: float | None  # as given by the user
    info: dict
    tissue: Any  # TissueMask
    level0: tuple[int, int]
    coords: Any  # [N, 2] level-0 top-left of each patch the encoder will read (None: no patch encoder)
    patch_size_level0: float | None


@dataclass
class CaseSlide:
    """One slide of a case opened in the app: what the viewer and the evidence need to show it again."""

    name: str  # as answers name it: "Slide 2 (label)"
    path: Path
    mpp: float | None
    tiled: TiledSlide
    encoded: Any  # EncodedSlide
    thumbnail: Any
    outlined: Any
    layers: dict  # viewer overlays (tissue outline, patch grid)


def _recording_progress(progress: "ProgressFn | None", seen: set[str]):
    """A progress callback that records each stage it sees in ``seen`` and passes it on to ``progress``."""
    def on_progress(stage: str, done: int, total: int) -> None:
        seen.add(stage)
        if progress is not None:
            progress(stage, int(done), int(total))

    return on_progress


def slide_ood(encoded: Any):
    """An encoded slide's out-of-distribution result; None when the checkpoint has no training feature statistics."""
    return getattr(encoded, "ood", None)


def slide_flagged(encoded: Any) -> bool:
    """Whether an encoded slide was found unlike the checkpoint's training slides."""
    ood = slide_ood(encoded)
    return bool(ood is not None and ood.flagged)


def likeness_text(ood: Any) -> str:
    """The facts-table text of an out-of-distribution result: "no (score 3.7, threshold 1.9)"."""
    return f"{'no' if ood.flagged else 'yes'} (score {ood.score:.1f}, threshold {ood.threshold:.1f})"


def shown_question(question: str, box: tuple[int, int, int, int] | None, slide_name: str | None = None) -> str:
    """The question as the conversation shows it: a region question starts with its level-0 box (and, in a case,
    the slide it is on)."""
    if box is None:
        return question
    where = f"{slide_name} " if slide_name else ""
    return f"[{where}region {box[0]},{box[1]} {box[2]}×{box[3]} px] {question}"


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


def _open_error_text(exc: SlideChatError, path: Path, name: str) -> str:
    """The error as the app's user should read it (their file name, the app's own controls)."""
    text = user_message(exc, {str(path): name, str(path.parent) + "/": ""})
    if isinstance(exc, NoTissueError):  # the app has no threshold option: say what to check instead
        text = re.sub(r";\s*if the slide is faint.*$", "; check that the file shows stained tissue "
                      "(a faint slide can be extracted with `slidechat extract --tissue-threshold`)", text)
    if isinstance(exc, MissingMppError):
        text = text.replace("pass it with --mpp", "enter it under Advanced → Microns per pixel") \
                   .replace("--mpp ", "").replace("--mpp", "microns per pixel")
    return text


def _slide_facts(name: str, info: dict, level0: tuple[int, int], mpp: float | None, tissue: Any, n: int,
                 sha256: str) -> dict[str, Any]:
    return {
        "slide": name,
        "vendor": info.get("vendor") or "unknown",
        "size (px)": f"{level0[0]:,} × {level0[1]:,}",
        "mpp (µm/px)": f"{float(info['mpp']):.3f}" if info.get("mpp") else (f"{mpp:.3f} (given)" if mpp else "unknown"),
        "magnification": f"{info['magnification']:g}×" if info.get("magnification") else "unknown",
        "levels": info.get("levels"),
        "tissue": f"{100 * tissue.tissue_fraction:.1f}% of the thumbnail",
        "patches": n,
        "sha256": str(sha256)[:16] + "…",
    }


class ChatService:
    """One model shared by all sessions; every method takes the caller's ``SlideSession``."""

    def __init__(self, assistant: Any, config: AppConfig, registry: SessionRegistry | None = None):
        self.assistant = assistant
        self.config = config
        self.registry = registry or SessionRegistry(max_sessions=config.max_sessions, ttl_s=config.session_ttl_s)
        self._heatmap_lock = threading.Lock()  # the LLM-weighted heatmap switches the attention implementation
        self.tiles = TileServer(cache_bytes=int(config.tile_cache_mb * 1024 * 1024))
        self.registry.on_close.append(self.tiles.close_session)
        Path(config.features_dir).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ slides
    def ingest_upload(self, session: SlideSession, uploaded: str | Path, original_name: str | None = None,
                      keep: bool = False) -> Path:
        """Check the upload's size and move it into the session's private folder (``keep``: keep the files already
        there, as for the next slide of a case). Returns the new path."""
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
            src.unlink(missing_ok=True)
            raise SlideReadError(f"{name}: the file is empty; re-export or re-copy the slide")
        with session.task("receiving an upload"):
            if not keep:
                session.clear_slide()
            dest_dir = session.workdir / "upload"
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / name
            try:
                shutil.move(str(src), dest)
            except OSError:
                shutil.copyfile(src, dest)
        return dest

    def ingest_uploads(self, session: SlideSession, uploaded: list[str | Path],
                       original_names: list[str] | None = None) -> list[Path]:
        """``ingest_upload`` for the files of one case: the session's previous files go once, then each moves in."""
        names = list(original_names or [Path(u).name for u in uploaded])
        paths: list[Path] = []
        for i, (src, name) in enumerate(zip(uploaded, names)):
            paths.append(self.ingest_upload(session, src, name, keep=i > 0))
        return paths

    def open_viewer(self, session: SlideSession, path: str | Path, mpp: float | None = None) -> Any:
        """Register ``path`` with the tile server for this session (the viewer can show it at once); returns the
        ``ViewerSlide``. Opening another slide or ending the session revokes the previous token."""
        slide = self.tiles.open(session.session_id, path, mpp=mpp)
        session.level0_size = (slide.zoom.width, slide.zoom.height)
        session.viewer_version += 1
        return slide

    def tile_slide(self, session: SlideSession, path: str | Path, *, display_name: str | None = None,
                   mpp: float | None = None, progress: ProgressFn | None = None) -> int | None:
        """Find tissue (thumbnail + outline layer) and lay the patch grid the encoder will read, before any patch
        is encoded: the viewer can show the grid while a large slide is still encoding. ``open_slide`` after
        it reuses this work. Returns the number of grid patches (None: this checkpoint reads feature files only,
        so the grid comes with the features).

        Raises SlideChatError subclasses as ``open_slide`` does.
        """
        path = Path(path)
        name = display_name or path.name
        with session.task("tiling a slide"):
            try:
                self._switch_slide(session, path, mpp)
                tiled = self._tile(session, path, mpp, lambda stage, done, total: progress and progress(
                    stage, int(done), int(total)))
            except SlideChatError as exc:
                raise type(exc)(_open_error_text(exc, path, name)) from exc
        return None if tiled.coords is None else int(len(tiled.coords))

    def open_slide(self, session: SlideSession, path: str | Path, *, display_name: str | None = None,
                   mpp: float | None = None, progress: ProgressFn | None = None) -> SlideSummary:
        """Read the slide, find tissue (thumbnail + outline) and its patch grid unless ``tile_slide`` just did,
        encode it (cached by sha256), start a conversation.

        Raises SlideChatError subclasses (not a slide, truncated, bomb, no tissue, no mpp) with messages that
        name the file as the user knows it.
        """
        path = Path(path)
        name = display_name or path.name
        t0 = time.perf_counter()
        stages_seen: set[str] = set()
        on_progress = _recording_progress(progress, stages_seen)

        with session.task("encoding a slide"):
            try:
                self._switch_slide(session, path, mpp)
                tiled = session.tiled
                if tiled is None or tiled.path != path.resolve() or tiled.mpp != mpp:
                    tiled = self._tile(session, path, mpp, on_progress)
                encoded = self.assistant.encode_slide(path, mpp=mpp, progress=on_progress,
                                                      cache_dir=self.config.features_dir)
                conversation = self.assistant.chat(encoded, max_new_tokens=self.config.max_new_tokens)
            except SlideChatError as exc:
                raise type(exc)(_open_error_text(exc, path, name)) from exc
            self._set_grid_layer(session, encoded, tiled)
            session.slide, session.conversation, session.source_name = encoded, conversation, name
            session.heatmap, session.transcript = None, []
            n = int(encoded.features.features.shape[0])
            session.info = _slide_facts(name, tiled.info, tiled.level0, mpp, tiled.tissue, n, encoded.sha256)
            ood = slide_ood(encoded)
            if ood is not None:
                session.info["like training slides"] = likeness_text(ood)
            session.touch()
            return SlideSummary(facts=session.info, num_patches=n, cached="encoding" not in stages_seen,
                                seconds=time.perf_counter() - t0,
                                notice=ood.message if slide_flagged(encoded) else None)

    def open_case(self, session: SlideSession, paths: list[str | Path], *, names: list[str] | None = None,
                  mpp: float | None = None, progress: ProgressFn | None = None) -> SlideSummary:
        """Open several slides as one case: each is tiled and encoded as ``open_slide`` does, one conversation
        covers them all (answers name the slide they are about), and the viewer shows slide 1
        (``select_slide`` switches)."""
        from slidechat.inference.case import Case, MAX_CASE_SLIDES

        paths = [Path(p) for p in paths]
        names = list(names or [p.name for p in paths])
        if not 2 <= len(paths) <= MAX_CASE_SLIDES:
            raise SlideChatError(f"a case is 2 to {MAX_CASE_SLIDES} slides, got {len(paths)}; open a single slide "
                                 "on its own instead")
        t0 = time.perf_counter()
        stages_seen: set[str] = set()
        on_progress = _recording_progress(progress, stages_seen)

        with session.task("opening a case"):
            session.forget_slide()  # the case's own uploads may lie in the session folder
            members: list[CaseSlide] = []
            for path, name in zip(paths, names):
                try:
                    viewer = self.open_viewer(session, path, mpp)
                    tiled = self._tile(session, path, mpp, on_progress)
                    encoded = self.assistant.encode_slide(path, mpp=mpp, progress=on_progress,
                                                          cache_dir=self.config.features_dir)
                except SlideChatError as exc:
                    session.clear_slide()
                    raise type(exc)(_open_error_text(exc, path, name)) from exc
                self._set_grid_layer(session, encoded, tiled)
                members.append(CaseSlide(name=name, path=path, mpp=viewer.mpp, tiled=tiled, encoded=encoded,
                                         thumbnail=session.thumbnail, outlined=session.outlined,
                                         layers=dict(viewer.overlays)))
            case = Case("", [m.encoded for m in members], names)
            conversation = self.assistant.chat(case, max_new_tokens=self.config.max_new_tokens)
            for i, m in enumerate(members):
                m.name = case.name(i)
            session.case, session.conversation = members, conversation
            session.source_name = names[0]
            session.transcript = []
            self._show_case_slide(session, 0)
            n = sum(m.encoded.num_patches for m in members)
            session.info = {"case": f"{len(members)} slides, {n} tissue patches"}
            notices = []
            for m in members:
                ood = slide_ood(m.encoded)
                like = "" if ood is None else f"; like training slides: {likeness_text(ood)}"
                session.info[m.name] = f"{m.encoded.num_patches} patches{like}"
                if slide_flagged(m.encoded):
                    notices.append(f"{m.name}: {ood.message}")
            session.touch()
            return SlideSummary(facts=session.info, num_patches=n, cached="encoding" not in stages_seen,
                                seconds=time.perf_counter() - t0, notice=" ".join(notices) or None)

    def select_slide(self, session: SlideSession, index: int) -> None:
        """Show slide ``index`` of the open case in the viewer (its layers and its heatmap of the last answer)."""
        if not session.case:
            raise SlideChatError("no case is open: open two or more slides together first")
        if not 0 <= int(index) < len(session.case):
            raise SlideChatError(f"this case has slides 1 to {len(session.case)}, not {int(index) + 1}")
        with session.task("switching slides"):
            self._show_case_slide(session, int(index))

    def _show_case_slide(self, session: SlideSession, index: int) -> None:
        m = session.case[index]
        viewer = self.open_viewer(session, m.path, m.tiled.mpp)
        viewer.overlays.update(m.layers)
        session.active = index
        session.slide, session.tiled = m.encoded, m.tiled
        session.thumbnail, session.outlined, session.level0_size = m.thumbnail, m.outlined, m.tiled.level0
        heatmaps = session.case_heatmaps or []
        session.heatmap = heatmaps[index] if index < len(heatmaps) else None
        self._set_heatmap_layer(session)
        session.viewer_version += 1

    def _switch_slide(self, session: SlideSession, path: Path, mpp: float | None) -> None:
        """Forget another slide (or a case) this session had open, and open ``path`` in the viewer unless it is
        there."""
        if session.case:
            session.forget_slide()
        if session.slide is not None and session.slide.source_path is not None \
                and Path(session.slide.source_path) != path:
            session.clear_slide()
        viewer = self.tiles.for_session(session.session_id)
        if viewer is None or viewer.path != path.resolve():
            self.open_viewer(session, path, mpp)

    def _tile(self, session: SlideSession, path: Path, mpp: float | None, on_progress: ProgressFn) -> TiledSlide:
        """Tissue (thumbnail, outline, outline layer) and the encoder's patch grid (grid layer) of ``path``."""
        from PIL import Image

        from slidechat.slide.reader import SlideReader
        from slidechat.slide.tissue import detect_tissue

        session.tiled = None
        on_progress("tissue", 0, 1)
        with SlideReader(path, mpp=mpp) as reader:
            info = reader.info()
            if mpp is None:
                _ = reader.mpp  # raises MissingMppError with what to do
            tissue = detect_tissue(reader, thumbnail_size=self.config.thumbnail_size)
            level0 = tuple(int(v) for v in reader.dimensions)
            on_progress("tissue", 1, 1)
            coords, patch0 = self._encoder_grid(reader, tissue)
        if coords is not None:
            on_progress("tiling", 1, 1)
        thumb = Image.fromarray(tissue.thumbnail) if tissue.thumbnail is not None else None
        session.thumbnail = thumb
        session.outlined = viz.draw_tissue_outline(thumb, tissue.contours, level0) if thumb is not None else None
        session.level0_size = level0
        self.tiles.set_overlay(session.session_id, "tissue", overlays.tissue_outline_layer(tissue.contours, level0))
        tiled = TiledSlide(path.resolve(), mpp, info, tissue, level0, coords, patch0)
        if coords is not None:
            self._set_grid_layer(session, None, tiled)
        session.viewer_version += 1
        session.tiled = tiled
        return tiled

    def _encoder_grid(self, reader: Any, tissue: Any) -> tuple[Any, float | None]:
        """(coords, level-0 patch size) of the grid the checkpoint's patch encoder reads (the same settings as
        ``encode_slide``), or (None, None) when the checkpoint has no patch encoder."""
        ref = getattr(getattr(self.assistant, "config", None), "patch_encoder", None)
        if ref is None:
            return None, None
        from slidechat.slide.config import TissueConfig
        from slidechat.slide.tiling import make_tile_grid

        defaults = TissueConfig()
        grid = make_tile_grid(reader, tissue, ref.target_mpp, ref.patch_size, min_tissue=defaults.min_tissue,
                              keep_best=defaults.keep_best)
        return grid.coords, float(grid.patch_size_level0)

    def _set_grid_layer(self, session: SlideSession, encoded: Any, tiled: TiledSlide | None) -> None:
        """The grid layer from the encoded features' coords (or from the tiling alone when ``encoded`` is None);
        left as it is when the features lie on the grid already shown."""
        import numpy as np

        if encoded is not None:
            coords, patch0 = getattr(encoded.features, "coords", None), encoded.patch_size_level0
            if tiled is not None and tiled.coords is not None and coords is not None \
                    and tiled.patch_size_level0 == patch0 and np.array_equal(tiled.coords, coords):
                return
        else:
            coords, patch0 = tiled.coords, tiled.patch_size_level0
        if coords is None or not len(coords) or not patch0:
            return
        try:
            layer = overlays.patch_grid_layer(coords, float(patch0), session.level0_size[0])
            self.tiles.set_overlay(session.session_id, "grid", layer)
            session.viewer_version += 1
        except Exception:  # a missing layer is shown as missing; the slide stays usable
            log.exception("patch grid layer failed")

    # ------------------------------------------------------------------ chat
    def ask(self, session: SlideSession, question: str, max_new_tokens: int | None = None,
            region: Any = None) -> Iterator[str]:
        """Stream the answer to ``question`` as growing text; appends both turns to the transcript, then
        computes this answer's heatmap, viewer layer and evidence (each failure is kept apart from the answer).

        ``region`` ((x, y, w, h) or "x,y,w,h", level-0 px) answers from the patches inside that rectangle."""
        question = (question or "").strip()
        if session.conversation is None:
            raise SlideChatError("open a slide first: upload one or pick an example")
        if not question:
            raise SlideChatError("the question is empty; type a question about the slide")
        if len(question) > self.config.max_question_chars:
            raise SlideChatError(f"the question is {len(question)} characters long; keep it under "
                                 f"{self.config.max_question_chars}")
        box = parse_region(region) if region not in (None, "") else None
        with session.task("answering a question"):
            conv = session.conversation
            if box is not None:
                conv = conv.region_conversation(box, session.active) if session.case else conv.region_conversation(box)
            session.transcript.append({"role": "user", "content": shown_question(
                question, box, session.case[session.active].name if session.case and box is not None else None)})
            answer = ""
            try:
                for piece in conv.ask(question, stream=True, max_new_tokens=max_new_tokens or self.config.max_new_tokens):
                    answer += piece
                    yield answer
            finally:
                session.transcript.append({"role": "assistant", "content": answer.strip() or "…"})
            session.region = box
            session.region_slide = session.active if box is not None else None
            self._after_answer(session, conv)

    def _after_answer(self, session: SlideSession, conv: Any) -> None:
        """Heatmap -> heatmap layer -> evidence crops; a failing step records why and leaves the others."""
        session.heatmap = session.heatmap_error = session.evidence_error = None
        session.evidence = []
        whole_case = bool(session.case) and session.region is None
        try:
            if whole_case:  # one heatmap per slide of the case; the viewer shows the slide in view's
                session.case_heatmaps = [self._heatmap(conv, i) for i in range(len(session.case))]
                session.heatmap = session.case_heatmaps[session.active]
            else:
                session.heatmap = self._heatmap(conv)
                if session.case:
                    session.case_heatmaps = [None] * len(session.case)
                    session.case_heatmaps[session.active] = session.heatmap
        except Exception as exc:
            log.exception("heatmap failed")
            session.heatmap_error = f"heatmap unavailable ({user_message(exc)})"
        session.viewer_version += 1
        self._set_heatmap_layer(session)
        hm = session.heatmap
        if hm is None:
            session.evidence_error = session.heatmap_error or "no heatmap for this answer"
            return
        try:
            if whole_case:
                regions = conv.evidence(self.config.evidence_k)
            else:
                from slidechat.inference.evidence import top_regions

                regions = [r.on_slide(session.active) for r in top_regions(hm, self.config.evidence_k)]
            session.evidence = self._evidence(session, regions, hm.has_coords)
        except Exception as exc:
            log.exception("evidence failed")
            session.evidence_error = user_message(exc)

    def _set_heatmap_layer(self, session: SlideSession) -> None:
        hm = session.heatmap
        try:
            layer = None
            if hm is not None and hm.has_coords:
                layer = overlays.heatmap_layer(hm.scores, hm.coords, hm.patch_size_level0, session.level0_size[0])
            self.tiles.set_overlay(session.session_id, "heatmap", layer)
        except Exception as exc:
            log.exception("heatmap layer failed")
            session.heatmap_error = f"heatmap layer unavailable ({user_message(exc)})"

    def _evidence(self, session: SlideSession, regions: list, has_coords: bool) -> list[dict]:
        """Evidence entries (rank, box, score, slide, crop) of ``regions``, each cut from its own slide."""
        from slidechat.inference.evidence import crop_region

        out = []
        for r in regions:
            i = int(getattr(r, "slide", 0) or 0)
            member = session.case[i] if session.case else None
            path = member.path if member is not None else session.slide.source_path
            crop = None
            if path is not None and has_coords:
                viewer = self.tiles.for_session(session.session_id)
                mpp = member.mpp if member is not None else (viewer.mpp if viewer else None)
                crop = crop_region(path, r.box, max_size=self.config.crop_size, mpp=mpp)
            entry = {"rank": r.rank, "box": [int(v) for v in r.box], "score": float(r.score), "crop": crop}
            if member is not None:
                entry.update(slide=i, slide_name=member.name)
            out.append(entry)
        return out

    def _heatmap(self, conv: Any, slide: int | None = None) -> Any:
        kw = {} if slide is None else {"slide": slide}
        with self._heatmap_lock:
            try:
                return conv.heatmap(weighting="llm", **kw)
            except TypeError:  # a model whose heatmap takes no weighting
                return conv.heatmap(**kw)
            except SlideChatError:
                return conv.heatmap(**kw)

    def viewer_state(self, session: SlideSession) -> dict[str, Any]:
        """What the page's viewer needs: the Deep Zoom URL, layer URLs and widths, mpp, evidence boxes."""
        slide = self.tiles.for_session(session.session_id)
        if slide is None:
            return {}
        v = session.viewer_version
        width = max(1, slide.zoom.width)
        layers = {}
        for name, layer in slide.overlays.items():
            layers[name] = {"url": f"{slide.base_url}/overlay/{name}.png?v={v}", "x": layer.x_fraction,
                            "y": layer.y_fraction, "width": layer.width_fraction, "height": layer.height_fraction}
        return {
            "dzi": f"{slide.base_url}/slide.dzi", "width": width, "height": slide.zoom.height, "mpp": slide.mpp,
            "overlays": layers, "version": v,
            "evidence": [{k: e[k] for k in ("rank", "box", "score")} for e in session.evidence
                         if e.get("slide", session.active) == session.active],
            "region": list(session.region) if session.region and session.region_slide == session.active else None,
            "heatmap_note": session.heatmap_error or "",
            "slide": session.active, "slides": [m.name for m in session.case],
        }

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
            self.tiles.close_session(session.session_id)

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
            # a case is reported on as a whole: one conversation over all its slides
            subject = session.conversation.case if session.case and session.conversation is not None else session.slide
            report = self.assistant.report(subject, max_new_tokens=self.config.report_max_new_tokens,
                                           summary_max_new_tokens=self.config.report_summary_tokens)
            session.report = report
            images = {"thumbnail with tissue outline": session.outlined}
            if session.heatmap is not None:
                images["attention heatmap (last answer)"] = self.slide_image(session, True, 0.5)
            stem = safe_filename(Path(session.source_name).stem or "slide")
            out = session.workdir / "downloads"
            json_path, html_path = export.write_report_files(out, stem, report, session.info, images,
                                                             self.config.checkpoint_label, note,
                                                             evidence=self._report_evidence(session, report))
            return export.report_markdown(report), json_path, html_path

    def _report_evidence(self, session: SlideSession, report: Any) -> list[dict]:
        """The report's own evidence regions with crops cut from the slide (else the last answer's evidence)."""
        from slidechat.inference.evidence import crop_region

        regions = list(getattr(report, "evidence", None) or [])
        if not regions:
            return [dict(e) for e in session.evidence]
        viewer = self.tiles.for_session(session.session_id)
        out = []
        for r in regions:
            entry = {"rank": int(r.get("rank", len(out) + 1)), "box": [int(v) for v in r["box"]],
                     "score": float(r.get("score", 0.0)), "crop": None, "slide": int(r.get("slide", 0))}
            member = session.case[entry["slide"]] if session.case and entry["slide"] < len(session.case) else None
            if member is not None:
                entry["slide_name"] = member.name
            try:
                source = member.path if member is not None else session.slide.source_path
                mpp = member.mpp if member is not None else (viewer.mpp if viewer else None)
                entry["crop"] = crop_region(source, entry["box"], max_size=self.config.crop_size, mpp=mpp)
            except Exception:  # the region stays listed with its box even without its picture
                log.exception("report evidence crop failed")
            out.append(entry)
        return out

    def export_conversation(self, session: SlideSession) -> Path:
        """Write the conversation (slide facts + messages) as JSON into the session folder."""
        if not session.transcript:
            raise SlideChatError("nothing to download yet: ask a question first")
        stem = safe_filename(Path(session.source_name).stem or "slide")
        path = session.workdir / "downloads" / f"{stem}.conversation.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return export.write_conversation(path, session.transcript, session.info, self.config.checkpoint_label)
