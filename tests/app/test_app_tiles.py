"""The viewer's tile server: Deep Zoom geometry, JPEG tiles, and its safety rules over HTTP (unknown / closed /
other sessions' tokens, traversal, out-of-range level/column/row -> 404, never 500)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from slidechat.app.routes import gradio_app_with_viewer
from slidechat.app.tiles import TileNotFound, TileServer


@pytest.fixture
def served(cmu_slide, synth_dataset):
    from fastapi.testclient import TestClient
    from slidechat.utils.io import read_jsonl

    tiles = TileServer(cache_bytes=8 * 1024 * 1024)
    a = tiles.open("session-a", cmu_slide)
    synth = synth_dataset / read_jsonl(synth_dataset / "truth.jsonl")[0]["path"]
    b = tiles.open("session-b", synth)
    yield tiles, a, b, TestClient(gradio_app_with_viewer(tiles))
    tiles.close_all()


def test_geometry_and_tiles(served):
    tiles, a, _, client = served
    z = a.zoom
    assert (z.width, z.height) == (2220, 2967) and z.max_level == 12
    r = client.get(f"{a.base_url}/slide.dzi")
    assert r.status_code == 200 and 'Width="2220"' in r.text and 'TileSize="254"' in r.text
    for level in (0, 8, z.max_level):
        cols, rows = z.tile_count(level)
        r = client.get(f"{a.base_url}/slide_files/{level}/{cols - 1}_{rows - 1}.jpeg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        x0, y0, x1, y1 = z.tile_box(level, cols - 1, rows - 1)
        assert Image.open(io.BytesIO(r.content)).size == (x1 - x0, y1 - y0)
    # a full-resolution tile shows the slide's own pixels
    tile = Image.open(io.BytesIO(tiles.tile(a.token, z.max_level, 1, 1))).convert("RGB")
    ref = z.reader.read_region((253, 253), 0, (256, 256))
    diff = abs(np.asarray(tile.resize((256, 256))).astype(int) - ref.astype(int)).mean()
    assert diff < 12
    hits = tiles.cache.hits
    tiles.tile(a.token, z.max_level, 1, 1)
    assert tiles.cache.hits == hits + 1


@pytest.mark.parametrize("path", [
    "/slidechat/v/{a}/slide_files/13/0_0.jpeg",  # level above full resolution
    "/slidechat/v/{a}/slide_files/12/9_0.jpeg",  # column out of range
    "/slidechat/v/{a}/slide_files/12/0_12.jpeg",  # row out of range
    "/slidechat/v/{a}/slide_files/-1/0_0.jpeg",
    "/slidechat/v/{a}/slide_files/12/0_0.png",
    "/slidechat/v/{a}/slide_files/99999999/0_0.jpeg",
    "/slidechat/v/{a}/slide_files/12/..%2F..%2Fetc%2Fpasswd",
    "/slidechat/v/{a}/overlay/..%2F..%2Fapp.py",
    "/slidechat/v/{a}/overlay/heatmap.png",  # no heatmap yet
    "/slidechat/v/{a}/../../../etc/passwd",
    "/slidechat/v/%2Fetc%2Fpasswd/slide.dzi",
    "/slidechat/v/not-a-token/slide.dzi",
    "/slidechat/v/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/slide.dzi",
    "/slidechat/static/../tiles.py",
    "/slidechat/static/%2E%2E/tiles.py",
    "/slidechat/static//etc/passwd",
])
def test_bad_paths_are_404(served, path):
    _, a, _, client = served
    r = client.get(path.format(a=a.token))
    assert r.status_code == 404, (path, r.status_code)


def test_tokens_are_per_session_and_revoked(served, cmu_slide):
    tiles, a, b, client = served
    assert a.token != b.token and len(a.token) >= 32
    # each token reaches only its own slide
    assert 'Width="2220"' in client.get(f"{a.base_url}/slide.dzi").text
    assert 'Width="2220"' not in client.get(f"{b.base_url}/slide.dzi").text
    # opening another slide revokes the session's old token; closing the session revokes its token
    a2 = tiles.open("session-a", cmu_slide)
    assert client.get(f"{a.base_url}/slide.dzi").status_code == 404
    assert client.get(f"{a2.base_url}/slide.dzi").status_code == 200
    tiles.close_session("session-b")
    assert client.get(f"{b.base_url}/slide_files/12/0_0.jpeg").status_code == 404
    with pytest.raises(TileNotFound):
        tiles.tile(b.token, 0, 0, 0)


def test_static_viewer_assets_are_served(served):
    _, _, _, client = served
    assert client.get("/slidechat/static/openseadragon/openseadragon.min.js").status_code == 200
    assert client.get("/slidechat/static/openseadragon/images/zoomin_rest.png").status_code == 200
    assert client.get("/slidechat/static/viewer.js").status_code == 200


def test_session_close_revokes_viewer_token(tiny_slide_assistant, cmu_slide, tmp_path):
    from slidechat.app.config import AppConfig
    from slidechat.app.service import ChatService
    from slidechat.app.session import SessionRegistry

    service = ChatService(tiny_slide_assistant, AppConfig(cache_dir=tmp_path / "cache", n_examples=0),
                          SessionRegistry(root=tmp_path / "sessions"))
    session = service.registry.get("tab-1")
    token = service.open_viewer(session, cmu_slide).token
    assert service.viewer_state(session)["dzi"].endswith("/slide.dzi")
    service.registry.close("tab-1")
    with pytest.raises(TileNotFound):
        service.tiles.slide(token)
    assert not (tmp_path / "sessions" / "tab-1").exists()
