"""slidechat.viz: heatmap rasterisation, overlays and tissue outlines (pure numpy/PIL, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from slidechat import viz


def _grid_coords(w0: int, h0: int, ps: int, offset=(0, 0)) -> np.ndarray:
    xs = np.arange(offset[0], w0 - ps + 1, ps)
    ys = np.arange(offset[1], h0 - ps + 1, ps)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def test_normalize_modes():
    s = np.array([2.0, 4.0, 3.0, np.nan])
    mm = viz.normalize_scores(s, "minmax")
    assert np.allclose(mm[:3], [0.0, 1.0, 0.5]) and np.isnan(mm[3])
    rk = viz.normalize_scores(np.array([10.0, 0.0, 5.0]), "rank")
    assert np.allclose(rk, [1.0, 0.0, 0.5])
    assert np.allclose(viz.normalize_scores(np.ones(4)), 0.5)
    with pytest.raises(ValueError):
        viz.normalize_scores(s, "bogus")


def test_heatmap_lands_on_the_right_patch():
    w0, h0, ps = 4000, 2000, 250
    coords = _grid_coords(w0, h0, ps, offset=(100, 40))
    scores = np.zeros(len(coords))
    hot = int(np.argmin(np.abs(coords[:, 0] - 3100) + np.abs(coords[:, 1] - 1290)))
    scores[hot] = 1.0
    values = viz.heatmap_to_thumbnail(scores, coords, ps, (w0, h0), (400, 200))
    assert values.shape == (200, 400)
    ys, xs = np.nonzero(values > 0.99)
    x0, y0 = coords[hot] / 10.0  # thumbnail is 1/10 of level 0
    assert xs.min() >= x0 - 1 and xs.max() <= x0 + ps / 10 + 1
    assert ys.min() >= y0 - 1 and ys.max() <= y0 + ps / 10 + 1
    # left strip before the first patch column is not covered
    assert np.isnan(values[:, :9]).all()


def test_overlay_changes_only_covered_pixels_and_respects_alpha():
    thumb = Image.new("RGB", (200, 100), (240, 240, 240))
    coords = np.array([[0, 0], [500, 0]])
    scores = np.array([0.0, 1.0])
    size0 = (2000, 1000)
    out0 = viz.overlay_heatmap(thumb, scores, coords, 500, size0, alpha=0.0)
    assert np.array_equal(np.asarray(out0), np.asarray(thumb))
    out = np.asarray(viz.overlay_heatmap(thumb, scores, coords, 500, size0, alpha=0.8)).astype(int)
    assert out.shape == (100, 200, 3)
    assert (out[60:, :] == 240).all()  # below the patches: untouched
    assert (out[:, 110:] == 240).all()  # right of the patches: untouched
    assert np.abs(out[10, 10] - out[10, 60]).sum() > 60  # low vs high score differ in colour
    flat = np.asarray(viz.overlay_heatmap(thumb, scores, coords, 500, size0, alpha=0.8, alpha_floor=1.0)).astype(int)
    assert np.abs(flat[10, 10] - 240).sum() > np.abs(out[10, 10] - 240).sum()  # floor<1 keeps low scores fainter
    smooth = viz.overlay_heatmap(thumb, scores, coords, 500, size0, alpha=0.8, smooth=1.0)
    assert smooth.size == thumb.size


def test_tissue_outline_and_boxes_and_colorbar():
    thumb = Image.new("RGB", (100, 100), (255, 255, 255))
    square = np.array([[100, 100], [900, 100], [900, 900], [100, 900]])
    out = np.asarray(viz.draw_tissue_outline(thumb, [square], (1000, 1000), color=(0, 0, 255), width=1))
    assert tuple(out[10, 50]) == (0, 0, 255) and tuple(out[50, 50]) == (255, 255, 255)
    boxed = np.asarray(viz.draw_boxes(thumb, [[200, 200, 400, 400]], (1000, 1000), color=(255, 0, 0), width=1))
    assert tuple(boxed[20, 30]) == (255, 0, 0)
    bar = viz.colorbar(64, 8)
    assert bar.size == (64, 8)
    assert np.asarray(thumb).min() == 255  # inputs untouched


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        viz.heatmap_grid(np.zeros(3), np.zeros((2, 2)), 10, (100, 100))
