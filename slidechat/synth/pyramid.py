"""Write an RGB image as a pyramidal slide file in the layouts and compressions found in the wild.

``layout="aperio"``: the SVS page order (tiled level 0 with an Aperio description carrying MPP and
AppMag, a stripped thumbnail, then tiled levels), as tiffslide and OpenSlide read Aperio files.
``layout="generic"``: a generic tiled TIFF whose lower levels are SubIFDs.
Compressions: "jpeg", "j2k" (Aperio JPEG 2000 YCbCr, TIFF compression 33003), "j2k-rgb" (Aperio JPEG 2000
RGB, 33005), "lzw", "none".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

COMPRESSIONS: dict[str, object] = {"jpeg": "jpeg", "j2k": 33003, "j2k-rgb": 33005, "lzw": "lzw", "none": None}
LAYOUTS = ("aperio", "generic")


def _levels(rgb: np.ndarray, factor: int, min_side: int) -> list[np.ndarray]:
    levels = [rgb]
    while min(levels[-1].shape[:2]) // factor >= min_side:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(factor)))
    return levels


def _compression_args(compression: str, quality: int) -> dict:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
    args: dict = {"compression": COMPRESSIONS[compression]}
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    elif compression.startswith("j2k"):
        args["compressionargs"] = {"level": 80}  # lossy J2K, as scanners write it
    return args


def write_pyramid(
    path: str | os.PathLike, rgb: np.ndarray, mpp: float | None = 0.5, compression: str = "jpeg",
    layout: str = "aperio", tile: int = 256, factor: int = 4, min_side: int = 256, quality: int = 90,
) -> Path:
    """Write ``rgb`` (uint8 [H, W, 3]) with levels reduced by ``factor`` down to ``min_side`` px; atomic."""
    import tifffile

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    path = Path(path)
    levels = _levels(np.ascontiguousarray(rgb), factor, min_side)
    h, w = rgb.shape[:2]
    common = dict(photometric="rgb", metadata=None, **_compression_args(compression, quality))
    res = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    desc = f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) {compression}|AppMag = 20"
    if mpp is not None:
        desc += f"|MPP = {mpp:.4f}"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            if layout == "generic":
                tw.write(levels[0], tile=(tile, tile), subifds=len(levels) - 1, **res, **common)
                for lvl in levels[1:]:
                    tw.write(lvl, tile=(tile, tile), subfiletype=1, **common)
            else:
                tw.write(levels[0], tile=(tile, tile), description=desc, **res, **common)
                thumb = np.asarray(Image.fromarray(levels[-1]).resize((max(1, levels[-1].shape[1] // 2),
                                                                        max(1, levels[-1].shape[0] // 2))))
                tw.write(thumb, description=desc, rowsperstrip=16, photometric="rgb", metadata=None,
                         compression="jpeg")
                for lvl in levels[1:]:
                    tw.write(lvl, tile=(tile, tile), description=desc, **common)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
