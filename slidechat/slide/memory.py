"""Decode-size guard: the bytes a read would hold at once, checked against a memory bound before decoding.

A slide without a pyramid, a level stored as one huge strip, or a ``--target-mpp`` / ``--patch-size`` whose
per-read buffer is enormous would otherwise meet the OOM killer halfway through a run. The estimate counts
what one read holds at its peak: the stored tiles or strips it decodes (a strip spans the whole level width),
the region it assembles and its RGB copy. The bound is half of the memory available when the check runs
(``MemAvailable``, or the container's limit when lower); ``SLIDECHAT_MAX_DECODE_MEMORY`` (e.g. ``16G``,
``512M``, or bytes) sets it instead.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from slidechat.errors import ConfigError

ENV_VAR = "SLIDECHAT_MAX_DECODE_MEMORY"
AVAILABLE_FRACTION = 0.5
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``16G``, ``512MiB``, ``1.5g`` or ``1000000``; ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), flags=re.I)
    value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0.0
    if not m or not math.isfinite(value) or value < 1:
        raise ConfigError(f"{ENV_VAR} must be a size such as 16G, 512M or a number of bytes, got {text!r}")
    return int(value)


def available_memory_bytes() -> int | None:
    """Memory this process can still get: MemAvailable, or what the cgroup limit leaves when lower."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def decode_limit() -> tuple[int | None, str]:
    """(bound in bytes or None when unknown, how it was set)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        return parse_size(raw), f"set by {ENV_VAR}"
    available = available_memory_bytes()
    if available is None:
        return None, "unknown"
    return int(available * AVAILABLE_FRACTION), f"half of the {gib(available)} available"


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def check_decode(what: str, need_bytes: int, advice: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` (one line: what, the estimate, the bound, what to do) when ``need_bytes`` exceeds the bound."""
    limit, how = decode_limit()
    if limit is None or need_bytes <= limit:
        return
    raise error(f"{what} would hold about {gib(need_bytes)} in memory at once, more than the {gib(limit)} bound "
                f"({how}); {advice}, or set {ENV_VAR} (e.g. {ENV_VAR}=32G) if this machine has the memory")


# ---------------------------------------------------------------------------------------- storage layout
@dataclass(frozen=True)
class LevelStorage:
    """How one pyramid level is stored: its size, the decode unit (tile, or strip across the full width)."""

    width: int
    height: int
    chunk_width: int
    chunk_height: int
    bytes_per_pixel: int
    tiled: bool

    def decode_bytes(self, x: int, y: int, w: int, h: int) -> int:
        """Bytes of the largest stored tile or strip a read of (x, y, w, h) level px decodes (they are decoded
        one at a time); 0 when the read lies outside the level."""
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return 0
        return self.chunk_width * self.chunk_height * self.bytes_per_pixel


@functools.lru_cache(maxsize=64)
def _storage(path: str, mtime_ns: int, size: int, series_index: int) -> tuple[LevelStorage, ...]:
    import logging

    import tifffile

    logger = logging.getLogger("tifffile")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tf:
            levels = []
            for level in tf.series[series_index].levels:
                page = level.keyframe
                w, h = int(page.imagewidth), int(page.imagelength)
                bits = page.bitspersample if isinstance(page.bitspersample, int) else max(page.bitspersample)
                bpp = max(1, int(page.samplesperpixel) * max(1, int(bits) // 8))
                if page.is_tiled:
                    cw, ch = int(page.tilewidth), int(page.tilelength)
                else:
                    cw, ch = w, min(h, int(page.rowsperstrip or h))
                levels.append(LevelStorage(w, h, cw, ch, bpp, bool(page.is_tiled)))
            return tuple(levels)
    except Exception:  # not a plain TIFF layout: the estimate falls back to the assembled region alone
        return ()
    finally:
        logger.setLevel(previous)


def level_storage(reader) -> tuple[LevelStorage, ...]:
    """The storage of each of ``reader``'s levels, or () when the file's layout is not known."""
    path = Path(reader.path)
    try:
        st = path.stat()
        series = int(reader.properties.get("tiffslide.series-index") or 0)
    except (OSError, ValueError, TypeError):
        return ()
    levels = _storage(str(path), st.st_mtime_ns, st.st_size, series)
    return levels if len(levels) == reader.level_count else ()


def read_region_bytes(reader, level: int, x: int, y: int, w: int, h: int) -> int:
    """Peak bytes of ``reader.read_region`` of a (w, h) region at (x, y) level px: the region and its RGB copy,
    plus the largest stored tile or strip it decodes."""
    storage = level_storage(reader)
    out = w * h * 3
    if not storage:
        return 2 * out
    s = storage[level]
    return w * h * s.bytes_per_pixel + out + s.decode_bytes(x, y, w, h)


def thumbnail_bytes(reader, max_size: int) -> int:
    """Peak bytes of ``reader.thumbnail(max_size)``, following its plan: the whole best level when it is small
    enough (and its PIL copy), else strips of it reduced one by one."""
    w, h = reader.dimensions
    ds_needed = max(w, h) / max_size
    level = reader.best_level_for_downsample(ds_needed)
    lw, lh = reader.level_dimensions[level]
    factor = max(1, int(ds_needed / reader.level_downsamples[level]))
    if lw * lh <= 64_000_000 or factor == 1:
        return read_region_bytes(reader, level, 0, 0, lw, lh) + lw * lh * 3
    step = factor * max(1, 2048 // factor)
    return max(read_region_bytes(reader, level, 0, y, lw - lw % factor, min(step, lh - y))
               for y in range(0, max(1, lh - lh % factor), step))
