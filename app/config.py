"""Settings of the browser app (one dataclass, filled from the CLI or by tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """The library's cache root: ``$SLIDECHAT_CACHE_DIR`` or ``~/.cache/slidechat`` (one variable for all)."""
    env = os.environ.get("SLIDECHAT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slidechat"


@dataclass
class AppConfig:
    """How the app serves: network, limits, caches and what the page shows."""

    host: str = "127.0.0.1"
    port: int | None = 7860
    auth: tuple[str, str] | None = None
    share: bool = False
    max_upload_mb: float = 2048.0
    concurrency: int = 1  # model calls (encode / answer / report) running at once
    queue_size: int = 64  # waiting events before "queue full"
    max_sessions: int = 64  # live browser sessions kept in memory (oldest idle evicted)
    session_ttl_s: float = 3 * 3600.0  # idle sessions are closed after this
    cache_dir: Path = field(default_factory=default_cache_dir)  # features + example slides
    thumbnail_size: int = 1024
    max_new_tokens: int = 256
    report_max_new_tokens: int = 64  # per targeted report question
    report_summary_tokens: int = 160  # the report's free-text summary
    max_question_chars: int = 2000
    n_examples: int = 2  # bundled synthetic example slides generated on first start
    title: str = "SlideChat"
    banner: str | None = None  # e.g. "no trained checkpoint yet" warning
    checkpoint_label: str = ""
    evidence_k: int = 4  # attended regions shown after each answer
    crop_size: int = 384  # longest side of an evidence crop (px)
    tile_cache_mb: float = 256.0  # encoded Deep Zoom tiles kept in memory (all sessions)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def features_dir(self) -> Path:
        return Path(self.cache_dir) / "features"

    @property
    def examples_dir(self) -> Path:
        return Path(self.cache_dir) / "examples"
