"""Per-browser-session state: the slide, its conversation, and a private temp folder.

Each Gradio session (``request.session_hash``) gets one :class:`SlideSession`. Sessions never share
objects; uploaded files are moved into the session's own folder, which is deleted when the tab
closes (``demo.unload``), when the session is idle longer than the TTL, or when the app exits.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from slidechat.errors import SlideChatError

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")


class SessionBusyError(SlideChatError):
    """The session is already encoding a slide or answering a question."""


@dataclass
class SlideSession:
    """Everything one browser tab knows. Guard multi-step updates with ``lock``."""

    session_id: str
    workdir: Path
    slide: Any = None  # EncodedSlide
    tiled: Any = None  # service.TiledSlide: tissue + patch grid of the slide being opened (before encoding)
    case: list = field(default_factory=list)  # service.CaseSlide per slide when several are open as one case
    active: int = 0  # the case's slide in the viewer
    case_heatmaps: list = field(default_factory=list)  # the last answer's heatmap per slide of the case
    region_slide: int | None = None  # the case's slide the last region question was on
    conversation: Any = None  # Conversation
    source_name: str = ""  # the file name the user uploaded / picked
    thumbnail: Any = None  # PIL.Image (plain)
    outlined: Any = None  # PIL.Image with the tissue outline
    level0_size: tuple[int, int] = (0, 0)
    info: dict = field(default_factory=dict)  # slide facts for display
    heatmap: Any = None  # Heatmap of the last answer
    heatmap_error: str | None = None  # why the last answer has no heatmap
    evidence: list[dict] = field(default_factory=list)  # [{rank, box, score, crop: PIL.Image}] of the last answer
    evidence_error: str | None = None  # why the last answer has no evidence
    region: tuple[int, int, int, int] | None = None  # the region the last answer came from
    viewer_version: int = 0  # bumps whenever a viewer layer changes (busts the browser's overlay cache)
    transcript: list[dict] = field(default_factory=list)  # [{"role", "content"}] as shown in the page
    report: Any = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # short critical sections only
    busy: str | None = None  # the long task running for this session ("encoding", "answering", ...)
    closed: bool = False

    @contextlib.contextmanager
    def task(self, name: str) -> Iterator[None]:
        """Mark the session busy for a long task; a second task meanwhile raises SessionBusyError.

        A flag rather than a held lock: Gradio may resume a streaming generator on another thread.
        """
        with self.lock:
            if self.busy is not None:
                raise SessionBusyError(f"still {self.busy}; wait until it is done, then try again")
            self.busy = name
        try:
            yield
        finally:
            self.busy = None
            self.touch()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def clear_slide(self) -> None:
        """Forget the slide and everything derived from it (files in workdir are removed)."""
        self.forget_slide()
        if self.workdir.exists():
            for child in self.workdir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def forget_slide(self) -> None:
        """Forget the slide (or case) and everything derived from it; files in workdir stay."""
        self.slide = self.tiled = self.conversation = self.thumbnail = self.outlined = None
        self.heatmap = self.report = None
        self.heatmap_error = self.evidence_error = self.region = None
        self.evidence = []
        self.case, self.active, self.case_heatmaps, self.region_slide = [], 0, [], None
        self.info = {}
        self.transcript = []
        self.source_name = ""
        self.level0_size = (0, 0)

    def close(self) -> None:
        self.clear_slide()
        self.closed = True
        shutil.rmtree(self.workdir, ignore_errors=True)


class SessionRegistry:
    """Thread-safe map session id -> SlideSession, with idle expiry and a cap on live sessions."""

    def __init__(self, root: Path | None = None, max_sessions: int = 64, ttl_s: float = 3 * 3600.0):
        self.on_close: list[Callable[[str], None]] = []  # called with the id of every session that ends
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="slidechat-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: dict[str, SlideSession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def sessions(self) -> list[SlideSession]:
        """A snapshot of the live sessions."""
        with self._lock:
            return list(self._sessions.values())

    def get(self, session_id: str | None) -> SlideSession:
        """The session for this id, created on first use."""
        sid = _SAFE_ID.sub("_", session_id or "anonymous")[:64] or "anonymous"
        evicted: list[SlideSession] = []
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                evicted = self._expire_locked(reserve=1)
                workdir = self.root / sid
                workdir.mkdir(parents=True, exist_ok=True)
                session = SlideSession(session_id=sid, workdir=workdir)
                self._sessions[sid] = session
            session.touch()
        for old in evicted:
            self._close_quietly(old)
        return session

    def close(self, session_id: str | None) -> bool:
        """End a session and delete its folder; True if it existed."""
        sid = _SAFE_ID.sub("_", session_id or "anonymous")[:64] or "anonymous"
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is None:
            return False
        self._close_quietly(session)
        return True

    def sweep(self) -> int:
        """Close sessions idle longer than the TTL; returns how many were closed."""
        with self._lock:
            expired = self._expire_locked(reserve=0)
        for s in expired:
            self._close_quietly(s)
        return len(expired)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            self._close_quietly(s)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _expire_locked(self, reserve: int) -> list[SlideSession]:
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if now - s.last_used > self.ttl_s]
        for s in expired:
            del self._sessions[s.session_id]
        # over capacity: evict the least recently used
        overflow = len(self._sessions) + reserve - self.max_sessions
        if overflow > 0:
            oldest = sorted(self._sessions.values(), key=lambda s: s.last_used)[:overflow]
            for s in oldest:
                del self._sessions[s.session_id]
            expired.extend(oldest)
        return expired

    def _close_quietly(self, session: SlideSession) -> None:
        try:
            for hook in self.on_close:
                hook(session.session_id)
            with session.lock:
                session.close()
        except Exception:  # cleanup must never take the app down
            log.exception("closing session %s failed", session.session_id)
