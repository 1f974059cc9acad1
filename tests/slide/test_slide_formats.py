"""Slides in the wild: generic pyramidal TIFFs (SubIFDs) with JPEG, JPEG 2000, LZW or no compression,
with or without mpp. Our direct tile path must give exactly tiffslide's pixels."""

import numpy as np
import pytest
import tifffile
import tiffslide

from slidechat.errors import MissingMppError
from slidechat.slide.reader import SlideReader
from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid
from slidechat.slide.tissue import detect_tissue
from slidechat.utils.io import read_jsonl


@pytest.fixture(scope="module")
def crop(synth_dataset):
    """A 1536 x 1024 window of a SynthSlide slide with the most tissue (found on the label map)."""
    from PIL import Image

    rec = read_jsonl(synth_dataset / "truth.jsonl")[1]
    ds = rec["mask_downsample"]
    tissue = np.asarray(Image.open(synth_dataset / rec["label_map_path"])) > 0
    h, w = 1024 // ds, 1536 // ds
    cands = [(tissue[y : y + h, x : x + w].mean(), x, y)
             for y in range(0, tissue.shape[0] - h, 16) for x in range(0, tissue.shape[1] - w, 16)]
    _, x, y = max(cands)
    with SlideReader(synth_dataset / rec["path"]) as r:
        return r.read_region((x * ds, y * ds), 0, (1536, 1024))


def _pyramid(path, img, compression, mpp):
    kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression=compression, photometric="rgb", subifds=1, metadata=None, **kw)
        tw.write(img[::4, ::4], tile=(256, 256), compression=compression, photometric="rgb", subfiletype=1,
                 metadata=None)
    return path


@pytest.mark.parametrize("compression", [None, "lzw", "jpeg", "jpeg2000"])
def test_generic_pyramid_formats(tmp_path, crop, compression):
    path = _pyramid(tmp_path / f"s_{compression}.tif", crop, compression, mpp=0.5)
    with SlideReader(path) as r, tiffslide.TiffSlide(path) as ts:
        assert r.level_count == 2 and r.mpp == pytest.approx(0.5) and r.vendor == "generic-tiff"
        for level, (x, y, w, h) in [(0, (100, 37, 700, 450)), (1, (40, 80, 300, 200))]:
            ours = r.read_region((x, y), level, (w, h))
            ref = np.asarray(ts.read_region((x, y), level, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(ours, ref)
        grid = make_tile_grid(r, detect_tissue(r))
        assert len(grid) > 15
    idx, patches = PatchBlockDataset(path, grid)[0]
    assert patches.shape[1:] == (224, 224, 3)
    if compression in (None, "lzw"):  # lossless: patches are exactly the source pixels
        x, y = grid.coords[int(idx[0])]
        np.testing.assert_array_equal(np.asarray(patches[0]), crop[y : y + 224, x : x + 224])


def test_pyramid_without_mpp_needs_override(tmp_path, crop):
    path = _pyramid(tmp_path / "nompp.tif", crop, "jpeg", mpp=None)
    with SlideReader(path) as r, pytest.raises(MissingMppError, match="--mpp"):
        _ = r.mpp
    with SlideReader(path, mpp=0.25) as r:
        grid = make_tile_grid(r, detect_tissue(r), target_mpp=0.5)
        assert grid.patch_size_level0 == 448 and grid.level == 0 and grid.needs_resize
