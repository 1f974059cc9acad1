"""Deep Zoom tiles cut from an open slide, and the per-session capability tokens that guard them.

``DeepZoom`` maps the Deep Zoom pyramid (level ``max_level`` = full resolution, each level below half the size,
square JPEG tiles of ``tile_size`` px with ``overlap`` px borders) onto the slide's own pyramid: a tile is read
from the stored level closest to (not coarser than) its downsample and resized once. ``TileServer`` hands out
one unguessable token per opened slide and session; only a live token reaches a slide, and a token dies with
its session or when the session opens another slide. Encoded tiles sit in one byte-bounded LRU cache shared by
all tokens of the same file (same file, same pixels).
"""

from __future__ import annotations

import io
import math
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
BASE_SIDE = 2048
_TOKEN_OK = re.compile(r"^[A-Za-z0-9_-]{20,64}$")


class TileNotFound(LookupError):
    """No such token, level, column or row (the HTTP layer answers 404)."""


class LRUBytes:
    """A thread-safe LRU map key -> bytes bounded by total size."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


class DeepZoom:
    """The Deep Zoom view of one ``SlideReader`` (reads are serialised by a lock: one file handle)."""

    def __init__(self, reader, tile_size: int = TILE_SIZE, overlap: int = OVERLAP):
        self.reader = reader
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.width, self.height = (int(v) for v in reader.dimensions)
        self.max_level = int(math.ceil(math.log2(max(self.width, self.height, 1))))
        self._lock = threading.Lock()
        # levels at most BASE_SIDE px wide are cut from one low-resolution image read once (a slide with few
        # stored levels would otherwise decode most of itself for every overview tile)
        self.base_level = max(lv for lv in range(self.max_level + 1) if max(self.level_size(lv)) <= BASE_SIDE)
        self._base: dict[int, Image.Image] = {}

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.max_level - level)
        return max(1, -(-self.width // scale)), max(1, -(-self.height // scale))

    def tile_count(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def dzi_xml(self) -> str:
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="{self.overlap}" '
                f'TileSize="{self.tile_size}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n')

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile in its level's pixels; TileNotFound when out of range."""
        if not 0 <= level <= self.max_level:
            raise TileNotFound(f"level {level}")
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile {col},{row} of level {level}")
        w, h = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
        return x0, y0, min(w, (col + 1) * ts + ov), min(h, (row + 1) * ts + ov)

    def _base_image(self, level: int) -> Image.Image:
        if self.base_level not in self._base:
            thumb = self.reader.thumbnail(BASE_SIDE).convert("RGB")
            self._base[self.base_level] = thumb.resize(self.level_size(self.base_level), Image.Resampling.BILINEAR)
        if level not in self._base:
            self._base[level] = self._base[self.base_level].resize(self.level_size(level), Image.Resampling.BILINEAR)
        return self._base[level]

    def tile_image(self, level: int, col: int, row: int) -> Image.Image:
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        if level <= self.base_level:
            with self._lock:
                return self._base_image(level).crop((x0, y0, x1, y1))
        scale = 2.0 ** (self.max_level - level)
        out_size = (x1 - x0, y1 - y0)
        # level-0 rectangle, clipped to the slide
        lx0, ly0 = int(x0 * scale), int(y0 * scale)
        lx1, ly1 = min(self.width, int(math.ceil(x1 * scale))), min(self.height, int(math.ceil(y1 * scale)))
        with self._lock:
            slide_level = self.reader.best_level_for_downsample(scale)
            ds = self.reader.level_downsamples[slide_level]
            lw, lh = self.reader.level_dimensions[slide_level]
            rx, ry = int(lx0 / ds), int(ly0 / ds)
            rw = max(1, min(lw - rx, int(math.ceil((lx1 - lx0) / ds))))
            rh = max(1, min(lh - ry, int(math.ceil((ly1 - ly0) / ds))))
            region = self.reader.read_region((lx0, ly0), slide_level, (rw, rh))
        image = Image.fromarray(region)
        if image.size != out_size:
            image = image.resize(out_size, Image.Resampling.BILINEAR)
        return image

    def tile_jpeg(self, level: int, col: int, row: int, quality: int = JPEG_QUALITY) -> bytes:
        buf = io.BytesIO()
        self.tile_image(level, col, row).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


@dataclass
class ViewerSlide:
    """One slide opened for one session's viewer: its Deep Zoom view and the overlay images drawn for it."""

    token: str
    session_id: str
    path: Path
    zoom: DeepZoom
    mpp: float | None
    cache_key: tuple
    overlays: dict = field(default_factory=dict)  # name -> overlays.Layer (PNG + placement)

    @property
    def base_url(self) -> str:
        return f"/slidechat/v/{self.token}"


class TileServer:
    """Tokens -> open slides; tiles and overlays for a token, or TileNotFound."""

    def __init__(self, cache_bytes: int = 256 * 1024 * 1024):
        self.cache = LRUBytes(cache_bytes)
        self._slides: dict[str, ViewerSlide] = {}
        self._by_session: dict[str, str] = {}
        self._lock = threading.Lock()

    def open(self, session_id: str, path: str | Path, mpp: float | None = None) -> ViewerSlide:
        """Open ``path`` for ``session_id`` (closing that session's previous slide); returns its ViewerSlide."""
        from slidechat.slide.reader import SlideReader

        path = Path(path).resolve()
        reader = SlideReader(path, mpp=mpp)
        try:
            slide_mpp = reader.mpp
        except Exception:  # the viewer works without a scale bar
            slide_mpp = None
        stat = path.stat()
        slide = ViewerSlide(token=secrets.token_urlsafe(24), session_id=session_id, path=path, zoom=DeepZoom(reader),
                            mpp=slide_mpp, cache_key=(str(path), stat.st_size, stat.st_mtime_ns))
        with self._lock:
            old = self._slides.pop(self._by_session.pop(session_id, ""), None)
            self._slides[slide.token] = slide
            self._by_session[session_id] = slide.token
        if old is not None:
            old.zoom.reader.close()
        return slide

    def close_session(self, session_id: str) -> None:
        with self._lock:
            slide = self._slides.pop(self._by_session.pop(session_id, ""), None)
        if slide is not None:
            slide.zoom.reader.close()

    def close_all(self) -> None:
        with self._lock:
            slides = list(self._slides.values())
            self._slides.clear()
            self._by_session.clear()
        for s in slides:
            s.zoom.reader.close()
        self.cache.clear()

    def for_session(self, session_id: str) -> ViewerSlide | None:
        with self._lock:
            return self._slides.get(self._by_session.get(session_id, ""))

    def slide(self, token: str) -> ViewerSlide:
        if not isinstance(token, str) or not _TOKEN_OK.match(token):
            raise TileNotFound("token")
        with self._lock:
            slide = self._slides.get(token)
        if slide is None:
            raise TileNotFound("token")
        return slide

    def tile(self, token: str, level: int, col: int, row: int) -> bytes:
        slide = self.slide(token)
        slide.zoom.tile_box(level, col, row)  # range check before the cache
        key = (slide.cache_key, level, col, row)
        data = self.cache.get(key)
        if data is None:
            data = slide.zoom.tile_jpeg(level, col, row)
            self.cache.put(key, data)
        return data

    def set_overlay(self, session_id: str, name: str, layer) -> None:
        """Set (or with None remove) the overlay ``name`` of this session's slide."""
        slide = self.for_session(session_id)
        if slide is None:
            return
        if layer is None:
            slide.overlays.pop(name, None)
        else:
            slide.overlays[name] = layer

    def overlay(self, token: str, name: str) -> bytes:
        layer = self.slide(token).overlays.get(name)
        if layer is None:
            raise TileNotFound(name)
        return layer.png
