"""SlideReader, tissue detection and tiling on the real CMU-1 SVS region and on SynthSlide."""

import numpy as np
import pytest
import tiffslide
from PIL import Image

from slidechat.errors import MissingMppError
from slidechat.slide.reader import SlideReader
from slidechat.slide.tiling import PatchBlockDataset, choose_block_cells, make_tile_grid
from slidechat.slide.tissue import detect_tissue
from slidechat.utils.io import read_jsonl


def test_reader_facts_on_real_svs(cmu_slide):
    with SlideReader(cmu_slide) as r:
        assert r.dimensions == (2220, 2967)
        assert r.level_count == 1 and r.level_downsamples == (1.0,)
        assert r.mpp == pytest.approx(0.499)
        assert r.vendor == "aperio" and r.magnification == 20.0
        info = r.info()
        assert info == {"vendor": "aperio", "width": 2220, "height": 2967, "mpp": pytest.approx(0.499),
                        "levels": 1, "magnification": 20.0, "path": str(cmu_slide)}
        region = r.read_region((1000, 1200), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        with tiffslide.TiffSlide(cmu_slide) as ts:
            expected = np.asarray(ts.read_region((1000, 1200), 0, (300, 200)).convert("RGB"))
        np.testing.assert_array_equal(region, expected)
        thumb = r.thumbnail(512)
        assert max(thumb.size) == 512 and thumb.mode == "RGB"
    with SlideReader(cmu_slide, mpp=0.25) as r:
        assert r.mpp == 0.25
    with pytest.raises(MissingMppError):
        SlideReader(cmu_slide, mpp=-1)


def test_tissue_on_real_svs(cmu_slide):
    with SlideReader(cmu_slide) as r:
        t = detect_tissue(r)
        assert 0.2 < t.tissue_fraction < 0.6
        assert t.downsample == pytest.approx(2220 / t.mask.shape[1], rel=0.01)
        assert t.contours and all(c.shape[1] == 2 for c in t.contours)
        allc = np.concatenate(t.contours)
        assert allc.min() >= -1 and allc[:, 0].max() <= 2221 and allc[:, 1].max() <= 2968
        strict = detect_tissue(r, threshold=0.45)
        assert strict.tissue_fraction < t.tissue_fraction


def test_tissue_matches_synth_truth(synth_dataset):
    rec = read_jsonl(synth_dataset / "truth.jsonl")[1]
    labels = np.asarray(Image.open(synth_dataset / rec["label_map_path"]))
    with SlideReader(synth_dataset / rec["path"]) as r:
        t = detect_tissue(r)
    truth = np.asarray(Image.fromarray((labels > 0).astype(np.uint8) * 255).resize(t.mask.shape[::-1])) > 127
    iou = (truth & t.mask).sum() / (truth | t.mask).sum()
    assert iou > 0.9


def test_tiling_on_real_svs_matches_per_patch_reads(cmu_slide):
    with SlideReader(cmu_slide) as r:
        grid = make_tile_grid(r, detect_tissue(r), target_mpp=0.5, patch_size=224)
        assert grid.patch_size_level0 == 224 and grid.level == 0 and not grid.needs_resize
        assert len(grid) > 30 and (grid.coords % 224 == 0).all()
        assert (grid.coords[:, 0] + 224 <= 2220).all() and (grid.coords[:, 1] + 224 <= 2967).all()
        assert grid.block_cells == 15  # 15 * 224 = 14 * 240: blocks aligned to the file's 240-px tiles
        ds = PatchBlockDataset(cmu_slide, grid)
        seen = np.zeros(len(grid), bool)
        for i in range(len(ds)):
            idx, patches = ds[i]
            seen[idx] = True
            for j in (0, len(idx) - 1):
                x, y = grid.coords[idx[j]]
                np.testing.assert_array_equal(patches[j], r.read_region((x, y), 0, (224, 224)))
        assert seen.all()


def test_tiling_reads_lower_level_and_resizes(synth_dataset):
    rec = read_jsonl(synth_dataset / "truth.jsonl")[0]
    path = synth_dataset / rec["path"]
    with SlideReader(path) as r:
        tissue = detect_tissue(r)
        g2 = make_tile_grid(r, tissue, target_mpp=2.0, patch_size=224)  # 4x: level 1, no resize
        assert (g2.level, g2.patch_size_level0, g2.patch_size_level, g2.needs_resize) == (1, 896, 224, False)
        idx, patches = PatchBlockDataset(path, g2)[0]
        x, y = g2.coords[idx[0]]
        np.testing.assert_array_equal(patches[0], r.read_region((x, y), 1, (224, 224)))
        g1 = make_tile_grid(r, tissue, target_mpp=1.0, patch_size=224)  # 2x: level 0 read, resized
        assert (g1.level, g1.patch_size_level0, g1.needs_resize) == (0, 448, True)
        idx, patches = PatchBlockDataset(path, g1)[0]
        x, y = g1.coords[idx[0]]
        ref = np.asarray(Image.fromarray(r.read_region((x, y), 0, (448, 448))).resize((224, 224), Image.BILINEAR))
        assert patches.shape[1:] == (224, 224, 3)
        assert np.abs(patches[0].astype(int) - ref.astype(int)).mean() < 4


def test_patches_fall_on_tissue_classes(synth_dataset):
    """Kept patches lie on tissue in the ground-truth label map (coords are true level-0 pixels)."""
    rec = read_jsonl(synth_dataset / "truth.jsonl")[2]
    labels = np.asarray(Image.open(synth_dataset / rec["label_map_path"]))
    with SlideReader(synth_dataset / rec["path"]) as r:
        grid = make_tile_grid(r, detect_tissue(r))
    ds = rec["mask_downsample"]
    cover = np.array([(labels[y // ds:(y + 224) // ds, x // ds:(x + 224) // ds] > 0).mean() for x, y in grid.coords])
    assert cover.min() > 0.1 and cover.mean() > 0.85
    # and almost every tissue cell of the truth is covered by some patch
    tissue_cells = (labels > 0).sum()
    covered = np.zeros_like(labels, bool)
    for x, y in grid.coords:
        covered[y // ds:(y + 224) // ds, x // ds:(x + 224) // ds] = True
    assert (covered & (labels > 0)).sum() / tissue_cells > 0.85


def test_block_cells():
    assert choose_block_cells(224, 256) == 8
    assert choose_block_cells(224, 240) == 15
    assert choose_block_cells(448, 0) == 4
