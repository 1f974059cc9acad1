"""Stain scenes (faint H&E, IHC, pen, debris) have consistent known masks; pyramids round-trip in every
layout and compression."""

import numpy as np
import pytest
import tiffslide

from slidechat.synth.pyramid import COMPRESSIONS, write_pyramid
from slidechat.synth.stains import PALETTES, render_stain_scene
from slidechat.slide.tissue import saturation


def test_scene_masks_are_consistent_and_deterministic():
    a = render_stain_scene(3, "ihc_dab", width=1024, height=768)
    b = render_stain_scene(3, "ihc_dab", width=1024, height=768)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert 0.1 < a.tissue.mean() < 0.8 and a.pen.mean() > 0.003 and a.debris.any()
    assert not (a.tissue & a.pen).any() and not (a.tissue & a.debris).any()
    glass = ~(a.tissue | a.pen | a.debris)
    assert a.rgb[glass].mean() > 230 and a.rgb[a.pen].mean() < a.rgb[a.tissue].mean()


def test_faint_palettes_are_faint():
    for palette in PALETTES:
        s = render_stain_scene(0, palette, width=768, height=512, pen=False, debris=False)
        med = float(np.median(saturation(s.rgb[s.tissue])))
        assert (med < 0.07) == palette.startswith("faint"), (palette, med)  # below the old saturation floor


@pytest.mark.parametrize("layout", ["aperio", "generic"])
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_pyramid_round_trip(tmp_path, layout, compression):
    rgb = render_stain_scene(1, "he", width=1024, height=768, pen=False).rgb
    path = write_pyramid(tmp_path / f"s.{'svs' if layout == 'aperio' else 'tif'}", rgb, 0.25, compression, layout, min_side=128)
    with tiffslide.TiffSlide(path) as ts:
        assert ts.level_count == 2 and float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert (ts.properties["tiffslide.vendor"] == "aperio") == (layout == "aperio")
        back = np.asarray(ts.read_region((0, 0), 0, (1024, 768)).convert("RGB")).astype(int)
    err = np.abs(back - rgb)
    assert err.max() == 0 if compression in ("lzw", "none") else err.mean() < 4
