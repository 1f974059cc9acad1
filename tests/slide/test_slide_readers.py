"""Every reader path (threads, worker processes, main thread) on JPEG 2000 (Aperio 33003/33005), LZW and
uncompressed pyramids and on the real CMU-1 SVS gives tiffslide's pixels; a corrupt JPEG tile is a clear
error naming the tile, not a crashed worker pool."""

import multiprocessing as mp

import numpy as np
import pytest
import tifffile
import tiffslide

from slidechat.encoders import load_encoder
from slidechat.errors import SlideReadError
from slidechat.features.extract import extract_slide
from slidechat.slide.config import ExtractionConfig
from slidechat.slide.reader import SlideReader
from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid, patch_loader
from slidechat.slide.tissue import detect_tissue
from slidechat.synth.pyramid import write_pyramid
from slidechat.synth.stains import render_stain_scene

FORMATS = [("j2k", "aperio"), ("j2k-rgb", "aperio"), ("lzw", "generic"), ("none", "generic"), ("jpeg", "aperio")]


@pytest.fixture(scope="module")
def scene_rgb():
    return render_stain_scene(4, "he", width=2048, height=1536, pen=False).rgb


@pytest.fixture(scope="module")
def slides(scene_rgb, tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("formats")
    made = {f"{c}-{layout}": write_pyramid(out / f"{c}-{layout}.svs", scene_rgb, 0.5, c, layout) for c, layout in FORMATS}
    made["cmu"] = cmu_slide
    return made


@pytest.mark.parametrize("name", [f"{c}-{layout}" for c, layout in FORMATS] + ["cmu"])
def test_every_reader_path_gives_tiffslide_pixels(slides, name):
    path = slides[name]
    with SlideReader(path) as r:
        grid = make_tile_grid(r, detect_tissue(r))
        assert r.tile_layout(grid.level) is not None  # the direct tile path is used, not the fallback
    dataset = PatchBlockDataset(path, grid)
    got = {}
    for mode, workers in [("threads", 2), ("processes", 2), ("threads", 0)]:
        patches = np.zeros((len(grid), grid.patch_size, grid.patch_size, 3), np.uint8)
        for idx, block in patch_loader(dataset, num_workers=workers, mode=mode):
            patches[idx.numpy()] = block.numpy()
        got[(mode, workers)] = patches
    first = next(iter(got.values()))
    for other in got.values():
        np.testing.assert_array_equal(other, first)
    with tiffslide.TiffSlide(path) as ts:
        for i in np.linspace(0, len(grid) - 1, 6).astype(int):
            x, y = grid.coords[i]
            ref = np.asarray(ts.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
            np.testing.assert_array_equal(first[i], ref)


def _corrupt_one_tile(path, tmp_path):
    """A copy of ``path`` whose level-0 tile under the first tissue patch starts with garbage; its (tx, ty)."""
    bad = tmp_path / "corrupt.svs"
    data = bytearray(path.read_bytes())
    with SlideReader(path) as r:
        x, y = make_tile_grid(r, detect_tissue(r)).coords[0]
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        tx, ty = int(x) // page.tilewidth, int(y) // page.tilelength
        j = ty * (-(-page.imagewidth // page.tilewidth)) + tx
        off, n = page.dataoffsets[j], page.databytecounts[j]
    data[off : off + n] = b"\x00" * n
    bad.write_bytes(bytes(data))
    return bad, tx, ty


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_corrupt_jpeg_tile_names_the_tile(slides, tmp_path, mode):
    bad, tx, ty = _corrupt_one_tile(slides["jpeg-aperio"], tmp_path)
    encoder = load_encoder("demo-cnn")
    with pytest.raises(SlideReadError) as err:
        extract_slide(bad, encoder, tmp_path / "bad.h5", ExtractionConfig(num_workers=2, reader_mode=mode))
    msg = str(err.value)
    assert f"tile {tx},{ty} of level 0" in msg and "corrupt" in msg and "Traceback" not in msg
    assert len(msg.splitlines()) == 1 and not (tmp_path / "bad.h5").exists()
    assert mp.active_children() == []  # no worker left behind
    ok = extract_slide(slides["jpeg-aperio"], encoder, tmp_path / "ok.h5", ExtractionConfig(num_workers=2, reader_mode=mode))
    assert ok.num_patches > 10  # the same process extracts the next slide normally
