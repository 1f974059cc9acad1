"""The viewer's patch layers: the heatmap as one pixel per patch placed on the patch grid, and the patch grid shown
as soon as the slide is tiled (before its patches are encoded), on the tiny random model with a real encoder."""

from __future__ import annotations

import html
import io
import json
import re
import numpy as np
import pytest
from PIL import Image

from slidechat.app import overlays
from slidechat.app.config import AppConfig
from slidechat.app.service import ChatService
from slidechat.app.session import SessionRegistry
from slidechat.utils.io import read_jsonl


def _rgba(layer: overlays.Layer) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(layer.png)).convert("RGBA"))


@pytest.mark.parametrize("offset", [(0, 0), (100, 40)])
def test_heatmap_layer_is_one_pixel_per_patch_on_the_patch_grid(offset):
    w0, ps = 4000, 250
    xs, ys = np.meshgrid(np.arange(offset[0], 3000, ps), np.arange(offset[1], 2000, ps))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    keep = (coords[:, 0] + coords[:, 1]) % (3 * ps) != 0  # holes where there is no tissue
    coords = coords[keep]
    scores = np.linspace(0.0, 1.0, len(coords))
    layer = overlays.heatmap_layer(scores, coords, ps, w0)
    rgba = _rgba(layer)
    cols, rows = xs.shape[1], xs.shape[0]
    assert rgba.shape == (rows, cols, 4)
    # placed where the grid starts, one cell per patch: cell (c, r) covers level-0 origin + (c, r) * ps
    assert layer.x_fraction * w0 == pytest.approx(offset[0]) and layer.y_fraction * w0 == pytest.approx(offset[1])
    assert layer.width_fraction * w0 == pytest.approx(cols * ps)
    assert layer.height_fraction * w0 == pytest.approx(rows * ps)
    cells = (coords - np.asarray(offset)) // ps
    assert (rgba[cells[:, 1], cells[:, 0], 3] == 255).all()
    assert (rgba[..., 3] > 0).sum() == len(coords)  # the holes stay transparent
    hot, cold = cells[np.argmax(scores)], cells[np.argmin(scores)]
    assert rgba[hot[1], hot[0], 0] > rgba[hot[1], hot[0], 2]  # turbo: high scores red, low scores blue
    assert rgba[cold[1], cold[0], 2] > rgba[cold[1], cold[0], 0]

    grid = overlays.patch_grid_layer(coords, ps, w0)
    assert (grid.x_fraction, grid.y_fraction, grid.width_fraction, grid.height_fraction) == (
        layer.x_fraction, layer.y_fraction, layer.width_fraction, layer.height_fraction)


class _WatchedAssistant:
    """The real tiny assistant; records what the viewer offered when encoding started."""

    def __init__(self, assistant, service_ref: list):
        self._assistant, self._service = assistant, service_ref
        self.grid_at_encode: list = []

    def encode_slide(self, path, **kw):
        service = self._service[0]
        session = service.registry.get("tiled-first")
        self.grid_at_encode.append((service.tiles.for_session(session.session_id).overlays.get("grid"),
                                    None if session.tiled is None else session.tiled.coords.copy()))
        return self._assistant.encode_slide(path, **kw)

    def __getattr__(self, name):
        return getattr(self._assistant, name)


def test_patch_grid_is_in_the_viewer_before_encoding_and_is_the_encoders_grid(tiny_slide_assistant, synth_dataset,
                                                                               tmp_path):
    from slidechat.app.ui import Handlers

    slide = synth_dataset / read_jsonl(synth_dataset / "truth.jsonl")[2]["path"]
    ref: list = []
    assistant = _WatchedAssistant(tiny_slide_assistant, ref)
    service = ChatService(assistant, AppConfig(cache_dir=tmp_path / "cache", n_examples=0, max_new_tokens=4),
                          SessionRegistry(tmp_path / "sessions"))
    ref.append(service)
    try:
        handlers = Handlers(service, {"case": slide})
        steps = list(handlers._open(service.registry.get("tiled-first"), slide, "case", None, False, 0.5,
                                    lambda *a, **k: None))
        (first, first_done), (last, last_done) = steps
        assert not first_done and last_done
        assert "patch grid" in first[0] and "encoding" in first[0]
        state = json.loads(html.unescape(re.search(r'data-state="([^"]*)"', first[8]).group(1)))
        assert "grid" in state["overlays"]  # the viewer state of the first step already offers the grid layer
        assert "Opened case" in last[0]

        (grid_layer, tiled_coords), = assistant.grid_at_encode
        assert grid_layer is not None and tiled_coords is not None
        session = service.registry.get("tiled-first")
        encoded = np.asarray(session.slide.features.coords)
        assert np.array_equal(tiled_coords, encoded) and len(encoded) == session.info["patches"]
        # the grid drawn before encoding stays: the features lie on it
        assert service.tiles.for_session(session.session_id).overlays["grid"] is grid_layer
    finally:
        service.registry.close_all()
