"""Render a SynthSlide layout to an Aperio-SVS-like pyramidal TIFF, tile row by tile row.

Every pyramid level is rendered directly at its own resolution by indexing a (pre-downsampled)
periodic texture bank with the label map, so memory stays at one row of tiles whatever the slide size.
The file has the SVS page order tiffslide/OpenSlide expect: tiled level 0 (with the Aperio description
carrying ``AppMag`` and ``MPP`` and TIFF resolution tags), a stripped thumbnail, then tiled levels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from slidechat.synth.layout import SlideLayout
from slidechat.synth.textures import downsampled_bank

TILE = 256
LEVEL_FACTOR = 4
JPEG_QUALITY = 90
TEXTURE_SIZE = 512


class LevelRenderer:
    """Renders any region of one pyramid level of a slide from its layout (vectorised gathers only)."""

    def __init__(self, layout: SlideLayout, rng: np.random.Generator, texture_seed: int = 0):
        self.layout = layout
        self.offset = (int(rng.integers(0, 2)) * 256, int(rng.integers(0, 2)) * 256)
        # per-slide stain variation: per-channel gain applied to the texture bank once
        gain = rng.uniform(0.94, 1.04, size=3)
        self._gain = gain
        self._texture_seed = texture_seed
        self._banks: dict[int, np.ndarray] = {}

    def _bank(self, downsample: int) -> np.ndarray:
        """Packed uint32 RGBX bank downsampled by ``downsample`` (period TEXTURE_SIZE // downsample)."""
        if downsample not in self._banks:
            bank = downsampled_bank(TEXTURE_SIZE, self._texture_seed, downsample)
            lut = np.clip(np.arange(256)[None, :] * self._gain[:, None], 0, 255).astype(np.uint8)  # [3, 256]
            rgbx = np.empty(bank.shape[:-1] + (4,), dtype=np.uint8)
            rgbx[..., 3] = 255
            rgbx[0, ..., :3] = bank[0]  # glass keeps its colour
            for c in range(3):
                rgbx[1:, ..., c] = lut[c][bank[1:, ..., c]]
            self._banks[downsample] = np.ascontiguousarray(rgbx).view(np.uint32).reshape(-1)
        return self._banks[downsample]

    def render(self, downsample: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] of the level with ``downsample``, top-left (x0, y0) in that level's pixels."""
        lab = self.layout.labels
        ds_lab = self.layout.downsample
        period = TEXTURE_SIZE // downsample
        ys = np.arange(y0, y0 + h, dtype=np.int64)
        xs = np.arange(x0, x0 + w, dtype=np.int64)
        # label cell under each pixel centre (level-0 coords)
        ly = np.minimum(((ys * downsample + downsample // 2) // ds_lab), lab.shape[0] - 1)
        lx = np.minimum(((xs * downsample + downsample // 2) // ds_lab), lab.shape[1] - 1)
        labels = lab[ly][:, lx].astype(np.int64)
        ty = ((ys + self.offset[0] // downsample) % period) * period
        tx = (xs + self.offset[1] // downsample) % period
        flat = labels * (period * period) + ty[:, None] + tx[None, :]
        rgbx = self._bank(downsample)[flat.ravel()]
        return rgbx.view(np.uint8).reshape(h, w, 4)[:, :, :3]


def level_dimensions(width: int, height: int, min_levels: int = 3, max_downsample: int = 256) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per level: factor 4 per level, until the smallest is <= 2048 px."""
    levels = [(1, width, height)]
    ds = 1
    while ds * LEVEL_FACTOR <= max_downsample and (len(levels) < min_levels or max(levels[-1][1:]) > 2048):
        ds *= LEVEL_FACTOR
        levels.append((ds, -(-width // ds), -(-height // ds)))
    return levels


def _tiles(renderer: LevelRenderer, ds: int, w: int, h: int):
    """Yield TILE x TILE tiles of one level in row-major order, rendering one tile row at a time."""
    n_x = -(-w // TILE)
    for ty in range(-(-h // TILE)):
        row = renderer.render(ds, 0, ty * TILE, n_x * TILE, TILE)
        for tx in range(n_x):
            yield row[:, tx * TILE : (tx + 1) * TILE]


def svs_description(slide_id: str, width: int, height: int, mpp: float, magnification: int, level_wh=None) -> str:
    head = f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    if level_wh is not None:
        head += f" -> {level_wh[0]}x{level_wh[1]}"
    return (
        f"{head} JPEG/RGB Q={JPEG_QUALITY}|AppMag = {magnification}|MPP = {mpp:.4f}"
        f"|ScanScope ID = SYNTHSLIDE|Filename = {slide_id}|Generator = slidechat.synth"
    )


def write_slide_tiff(
    path: str | os.PathLike, layout: SlideLayout, renderer: LevelRenderer, slide_id: str, mpp: float,
    magnification: int = 20, workers: int = 1,
) -> Path:
    """Write the pyramidal SVS-like TIFF for ``layout`` to ``path`` (JPEG tiles 256 px, >= 3 levels)."""
    import tifffile

    path = Path(path)
    width, height = layout.width, layout.height
    levels = level_dimensions(width, height)
    bigtiff = width * height * 3 > 2**31
    resolution = (1e4 / mpp, 1e4 / mpp)
    common = dict(
        photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY}, metadata=None,
        maxworkers=workers, dtype=np.uint8,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for i, (ds, w, h) in enumerate(levels):
                desc = svs_description(slide_id, width, height, mpp, magnification, None if i == 0 else (w, h))
                tw.write(
                    _tiles(renderer, ds, w, h), shape=(h, w, 3), tile=(TILE, TILE), description=desc,
                    resolution=(resolution[0] / ds, resolution[1] / ds), resolutionunit="CENTIMETER", **common,
                )
                if i == 0:  # SVS: the thumbnail is page 1, stripped
                    tds, tw_, th_ = levels[-1]
                    thumb = renderer.render(tds, 0, 0, tw_, th_)
                    if max(tw_, th_) > 1024:
                        scale = 1024 / max(tw_, th_)
                        thumb = np.asarray(Image.fromarray(thumb).resize((max(1, int(tw_ * scale)), max(1, int(th_ * scale)))))
                    tw.write(thumb, description=desc, rowsperstrip=16, **common)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
