"""SlideReader: one interface over whole-slide image files (tiffslide; openslide optional).

Everything a user can get wrong (missing file, a text or PNG file renamed .svs, a truncated TIFF, a
huge non-pyramidal TIFF, a slide without microns-per-pixel) is checked from the file header and TIFF
tags before any pixel is decoded, and raised as SlideReadError / MissingMppError with what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidechat.errors import MissingMppError, SlideReadError

# A single-level slide is decoded in full for a thumbnail; refuse sizes that would exhaust memory.
MAX_UNTILED_PIXELS = 20_000 * 20_000
MAX_SINGLE_LEVEL_PIXELS = 60_000 * 60_000
MPP_RANGE = (0.01, 100.0)

_MAGIC = {
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"II+\x00": "bigtiff",
    b"MM\x00+": "bigtiff",
}
_OTHER_FORMATS = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"\x89HDF": "an HDF5 file",
}


def _sniff(path: Path) -> None:
    """Raise SlideReadError unless ``path`` is a readable file that starts like a TIFF."""
    if not path.exists():
        raise SlideReadError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise SlideReadError(f"{path}: is a folder, not a slide file")
    if not os.access(path, os.R_OK):
        raise SlideReadError(f"{path}: permission denied; make the file readable")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SlideReadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(head) < 8:
        raise SlideReadError(f"{path}: file is empty or truncated ({path.stat().st_size} bytes); re-copy the slide")
    if head[:4] in _MAGIC:
        return
    for magic, what in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise SlideReadError(
                f"{path}: is {what}, not a whole-slide image; convert it to a pyramidal TIFF "
                "(e.g. `vips tiffsave in out.tiff --tile --pyramid --compression jpeg`)"
            )
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        raise SlideReadError(f"{path}: is a text file, not a whole-slide image")
    raise SlideReadError(f"{path}: not a TIFF-based whole-slide image (unknown file signature)")


@contextlib.contextmanager
def _quiet_tifffile():
    """Keep tifffile's log lines (e.g. "invalid page offset") from the user: what they describe reaches
    the user as our own one-line error instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_tiff_structure(path: Path) -> None:
    """Check level sizes and that every tile/strip lies inside the file, using TIFF tags only."""
    import tifffile

    size = path.stat().st_size
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise SlideReadError(f"{path}: TIFF has no image data; the file may be truncated, re-copy the slide")
            series = tf.series[0]
            levels = list(series.levels)
            page0 = levels[0].keyframe
            h, w = int(page0.imagelength), int(page0.imagewidth)
            if len(levels) == 1:
                limit = MAX_SINGLE_LEVEL_PIXELS if page0.is_tiled else MAX_UNTILED_PIXELS
                if w * h > limit:
                    raise SlideReadError(
                        f"{path}: {'tiled' if page0.is_tiled else 'non-tiled'} single-level image of {w} x {h} px "
                        f"is too large to decode safely (decompression bomb guard); convert it to a tiled pyramid "
                        "(e.g. `vips tiffsave in out.tiff --tile --pyramid`)"
                    )
            for level in levels:
                for page in level.pages:
                    if page is None:
                        continue
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    if offsets.size and int((offsets + counts).max()) > size:
                        raise SlideReadError(
                            f"{path}: file is truncated (image data ends past the {size}-byte file); re-copy the slide"
                        )
    except SlideReadError:
        raise
    except Exception as exc:  # tifffile raises many types on corrupt headers
        raise SlideReadError(f"{path}: corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from exc


class SlideReader:
    """A whole-slide image opened for reading (context manager).

    ``mpp`` overrides the file's microns-per-pixel (needed for slides that have none).
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        import tiffslide

        self.path = Path(path)
        _sniff(self.path)
        _check_tiff_structure(self.path)
        if mpp is not None and not (MPP_RANGE[0] <= float(mpp) <= MPP_RANGE[1]):
            raise MissingMppError(f"--mpp {mpp} is not a plausible microns-per-pixel value (expected e.g. 0.25 or 0.5)")
        self._mpp_override = float(mpp) if mpp is not None else None
        try:
            with _quiet_tifffile():
                self._slide = tiffslide.TiffSlide(self.path)
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
                (int(w), int(h)) for w, h in self._slide.level_dimensions
            )
            self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._slide.level_downsamples)
            self.properties: dict[str, Any] = dict(self._slide.properties)
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot open as a slide ({type(exc).__name__}: {exc})") from exc

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        return str(self.properties.get("tiffslide.vendor") or "generic-tiff")

    @property
    def file_mpp(self) -> float | None:
        """Microns per pixel stored in the file, or None when absent or implausible."""
        raw = self.properties.get("tiffslide.mpp-x")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None
        return value if MPP_RANGE[0] <= value <= MPP_RANGE[1] else None

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel (the ``mpp=`` override wins). Raises MissingMppError when unknown."""
        if self._mpp_override is not None:
            return self._mpp_override
        value = self.file_mpp
        if value is None:
            raise MissingMppError(
                f"{self.path}: the slide has no microns-per-pixel in its metadata; pass it with --mpp "
                "(e.g. --mpp 0.5 for 20x, 0.25 for 40x)"
            )
        return value

    @property
    def magnification(self) -> float | None:
        raw = self.properties.get("tiffslide.objective-power")
        try:
            return float(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def tile_size(self) -> tuple[int, int]:
        """(width, height) of the stored tiles at level 0 (0 when the level is stripped)."""
        w = self.properties.get("tiffslide.level[0].tile-width") or 0
        h = self.properties.get("tiffslide.level[0].tile-height") or 0
        return int(w), int(h)

    def level_tile_size(self, level: int) -> tuple[int, int]:
        w = self.properties.get(f"tiffslide.level[{level}].tile-width") or 0
        h = self.properties.get(f"tiffslide.level[{level}].tile-height") or 0
        return int(w), int(h)

    def info(self) -> dict[str, Any]:
        """Display facts: vendor, width, height, mpp (None if unknown), levels, magnification, path."""
        try:
            mpp = self.mpp
        except MissingMppError:
            mpp = None
        w, h = self.dimensions
        return {
            "vendor": self.vendor,
            "width": w,
            "height": h,
            "mpp": mpp,
            "levels": self.level_count,
            "magnification": self.magnification,
            "path": str(self.path),
        }

    # -- pixels ------------------------------------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        """Highest-resolution-loss level whose downsample does not exceed ``downsample`` (+1% tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array [h, w, 3] of ``size`` (w, h) at ``level``; ``location`` is level-0 (x, y).

        In-bounds regions of tiled levels are assembled from directly decoded tiles (each needed tile
        read with one pread and decoded once); anything else goes through tiffslide (same pixels).
        """
        fast = self._read_tiles(location, level, size)
        if fast is not None:
            return fast
        try:
            arr = self._slide.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])), as_array=True
            )
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode image data at {location} level {level} "
                f"({type(exc).__name__}: {exc}); the file may be corrupt or truncated"
            ) from exc
        return _to_rgb(np.asarray(arr))

    def _tile_index(self, level: int):
        """Cached (keyframe page, tile w, tile h, tiles per row, offsets, counts) for a tiled level, else None."""
        cache = self.__dict__.setdefault("_tile_cache", {})
        if level not in cache:
            entry = None
            try:
                tf = self._slide.ts_tifffile
                series = tf.series[int(self.properties.get("tiffslide.series-index") or 0)]
                lvl = series.levels[level]
                page = lvl.keyframe
                if (
                    len(lvl.pages) == 1 and page.is_tiled and page.tiledepth == 1 and page.dtype == np.uint8
                    and page.samplesperpixel in (3, 4) and page.planarconfig == 1
                ):
                    n_x = -(-page.imagewidth // page.tilewidth)
                    entry = (page, page.tilewidth, page.tilelength, n_x,
                             np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64))
            except Exception:
                entry = None
            cache[level] = entry
        return cache[level]

    def _read_tiles(self, location, level: int, size) -> np.ndarray | None:
        if not 0 <= level < self.level_count:
            return None
        index = self._tile_index(level)
        if index is None:
            return None
        page, tw, th, n_x, offsets, counts = index
        ds = self.level_downsamples[level]
        x0, y0 = int(int(location[0]) / ds), int(int(location[1]) / ds)  # as tiffslide
        w, h = int(size[0]), int(size[1])
        lw, lh = self.level_dimensions[level]
        if w <= 0 or h <= 0 or x0 < 0 or y0 < 0 or x0 + w > lw or y0 + h > lh:
            return None
        out = np.empty((h, w, 3), dtype=np.uint8)
        tx0, tx1 = x0 // tw, (x0 + w - 1) // tw
        ty0, ty1 = y0 // th, (y0 + h - 1) // th
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile = self.decode_tile(level, tx, ty)
                # overlap of this tile with the requested region
                sx0, sy0 = max(x0, tx * tw), max(y0, ty * th)
                sx1, sy1 = min(x0 + w, (tx + 1) * tw), min(y0 + h, (ty + 1) * th)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw, :3
                ]
        return out

    def tile_layout(self, level: int) -> tuple[int, int] | None:
        """(tile width, tile height) when ``level`` can be read tile by tile with decode_tile, else None."""
        index = self._tile_index(level) if 0 <= level < self.level_count else None
        return None if index is None else (index[1], index[2])

    def decode_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """Decoded stored tile (tx, ty) of a tiled level: uint8 [tile_h, tile_w, samples] (edge tiles padded)."""
        page, tw, th, n_x, offsets, counts = self._tile_index(level)
        fd = self.__dict__.get("_fd")
        if fd is None:
            fd = self._fd = os.open(self.path, os.O_RDONLY)
        j = ty * n_x + tx
        try:
            data = os.pread(fd, int(counts[j]), int(offsets[j]))
            tile = page.decode(data, j, jpegtables=page.jpegtables)[0]
            return tile.reshape(th, tw, -1)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode tile {tx},{ty} of level {level} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the file may be corrupt or truncated"
            ) from exc

    def thumbnail(self, max_size: int = 1024) -> Image.Image:
        """An RGB PIL thumbnail whose longer side is at most ``max_size`` px."""
        w, h = self.dimensions
        ds_needed = max(w, h) / max_size
        level = self.best_level_for_downsample(ds_needed)
        lw, lh = self.level_dimensions[level]
        factor = max(1, int(ds_needed / self.level_downsamples[level]))
        if lw * lh <= 64_000_000 or factor == 1:
            img = Image.fromarray(self.read_region((0, 0), level, (lw, lh)))
        else:  # a big single level: read strips and reduce each, never the whole level at once
            step = factor * max(1, 2048 // factor)
            ds_level = self.level_downsamples[level]
            strips = []
            for y in range(0, lh - lh % factor, step):
                hh = min(step, lh - lh % factor - y)
                strip = self.read_region((0, int(y * ds_level)), level, (lw - lw % factor, hh))
                strips.append(np.asarray(Image.fromarray(strip).reduce(factor)))
            img = Image.fromarray(np.concatenate(strips, axis=0))
        img.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
        return img

    def close(self) -> None:
        fd = self.__dict__.pop("_fd", None)
        if fd is not None:
            os.close(fd)
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"SlideReader({str(self.path)!r}, {w}x{h}, levels={self.level_count}, vendor={self.vendor})"


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)
