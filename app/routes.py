"""HTTP routes of the viewer: Deep Zoom descriptor + tiles + overlay images per token, and the static viewer files.

Every miss (unknown or closed token, out-of-range level/column/row, a name that is not a tile) is a plain 404;
a slide that cannot be decoded at that spot is logged and answered 404 as well, so the viewer shows a gap
instead of the server failing.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from slidechat.app.tiles import TileNotFound, TileServer

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TILE_NAME = re.compile(r"^(\d{1,6})_(\d{1,6})\.jpeg$")
_OVERLAY_NAME = re.compile(r"^([a-z0-9-]{1,40})\.png$")
_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


def viewer_router(tiles: TileServer):
    """A FastAPI router serving ``/slidechat/v/{token}/...`` and ``/slidechat/static/...``."""
    from fastapi import APIRouter
    from fastapi.responses import FileResponse, Response

    router = APIRouter()
    not_found = Response(status_code=404, content=b"not found", media_type="text/plain")

    @router.get("/slidechat/v/{token}/slide.dzi")
    def dzi(token: str):
        try:
            slide = tiles.slide(token)
        except TileNotFound:
            return not_found
        return Response(slide.zoom.dzi_xml(), media_type="application/xml", headers=_CACHE_HEADERS)

    @router.get("/slidechat/v/{token}/slide_files/{level}/{name}")
    def tile(token: str, level: str, name: str):
        m = _TILE_NAME.match(name)
        if m is None or not level.isdigit() or len(level) > 3:
            return not_found
        try:
            data = tiles.tile(token, int(level), int(m.group(1)), int(m.group(2)))
        except TileNotFound:
            return not_found
        except Exception:
            log.exception("tile %s/%s failed", level, name)
            return not_found
        return Response(data, media_type="image/jpeg", headers=_CACHE_HEADERS)

    @router.get("/slidechat/v/{token}/overlay/{name}")
    def overlay(token: str, name: str):
        m = _OVERLAY_NAME.match(name)
        if m is None:
            return not_found
        try:
            data = tiles.overlay(token, m.group(1))
        except TileNotFound:
            return not_found
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/slidechat/static/{path:path}")
    def static(path: str):
        target = (STATIC_DIR / path).resolve()
        if STATIC_DIR not in target.parents or not target.is_file():
            return not_found
        return FileResponse(target, headers={"Cache-Control": "public, max-age=86400"})

    return router


def gradio_app_with_viewer(tiles: TileServer):
    """A Gradio server app that serves the viewer routes before Gradio's own (pass as ``launch(_app=...)``)."""
    from gradio.routes import App

    app = App()
    app.include_router(viewer_router(tiles))
    return app
