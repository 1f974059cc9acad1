"""The combined tissue detector on known masks: faint H&E, IHC DAB/haematoxylin, pen marks and debris;
unchanged on H&E slides; a faint IHC slide extracts end to end."""

import numpy as np
import pytest
from PIL import Image

from slidechat.slide.config import TissueConfig
from slidechat.slide.reader import SlideReader
from slidechat.slide.tissue import detect_tissue, tissue_mask_from_rgb
from slidechat.synth.pyramid import write_pyramid
from slidechat.synth.stains import PALETTES, render_stain_scene
from slidechat.utils.io import read_jsonl


def _down(mask, f):
    h, w = mask.shape
    return mask[: h // f * f, : w // f * f].reshape(h // f, f, w // f, f).mean((1, 3)) > 0.5


def _scores(scene, method, f=2):
    thumb = np.asarray(Image.fromarray(scene.rgb).reduce(f))
    pred, _ = tissue_mask_from_rgb(thumb, TissueConfig(method=method))
    truth, pen = _down(scene.tissue, f), _down(scene.pen, f)
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    return dice, 1 - (pred & pen).sum() / pen.sum()


@pytest.mark.parametrize("palette", list(PALETTES))
def test_dice_and_pen_exclusion_on_every_palette(palette):
    scene = render_stain_scene(2, palette, width=1536, height=1152)
    dice, pen_excluded = _scores(scene, "combined")
    assert dice >= 0.95 and pen_excluded >= 0.95, (dice, pen_excluded)
    old_dice, old_pen = _scores(scene, "saturation")
    assert old_pen < 0.5  # saturation alone takes ink for tissue
    if palette.startswith("faint"):
        assert old_dice < 0.5  # ... and misses faint stains


def test_unchanged_on_he_slides(synth_dataset, cmu_slide):
    paths = [synth_dataset / r["path"] for r in read_jsonl(synth_dataset / "truth.jsonl")] + [cmu_slide]
    for path in paths:
        with SlideReader(path) as r:
            new = detect_tissue(r).mask
            old = detect_tissue(r, config=TissueConfig(method="saturation")).mask
        np.testing.assert_array_equal(new, old)


def test_faint_ihc_slide_extracts(tmp_path):
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_slide
    from slidechat.slide.config import ExtractionConfig

    scene = render_stain_scene(5, "faint_ihc", width=2048, height=1536)
    path = write_pyramid(tmp_path / "ihc.svs", scene.rgb, mpp=0.5, compression="jpeg")
    result = extract_slide(path, load_encoder("demo-cnn"), tmp_path / "ihc.h5", ExtractionConfig(num_workers=0))
    assert result.num_patches > 20
    truth = scene.tissue
    frac = [truth[y : y + 224, x : x + 224].mean() for x, y in result.coords]
    assert np.mean(frac) > 0.5  # the patches lie on the faint tissue, not on glass or ink
    from slidechat.slide.tiling import make_tile_grid

    with SlideReader(path) as r:  # saturation alone keeps far fewer tissue patches (and ink)
        old = make_tile_grid(r, detect_tissue(r, config=TissueConfig(method="saturation")))
    on_tissue = sum(truth[y : y + 224, x : x + 224].mean() > 0.5 for x, y in old.coords)
    assert on_tissue < 0.5 * sum(f > 0.5 for f in frac)
