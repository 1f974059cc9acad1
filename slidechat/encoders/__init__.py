"""Patch encoders behind one interface: ``load_encoder(name, weights=None, device="cpu") -> PatchEncoder``.

Names: ``demo-cnn``, ``timm:<arch>``, ``open_clip:<arch>``, ``uni``, ``conch``. Weights always come from a
local path; nothing is downloaded.
"""

from __future__ import annotations

import os

from slidechat.encoders.base import PatchEncoder
from slidechat.errors import ConfigError

ENCODER_NAMES = ("demo-cnn", "timm:<arch>", "open_clip:<arch>", "uni", "conch")


def load_encoder(name: str, weights: str | os.PathLike | None = None, device: str = "cpu") -> PatchEncoder:
    """Build the patch encoder ``name`` with local ``weights`` on ``device``."""
    if name == "demo-cnn":
        from slidechat.encoders.demo_cnn import load_demo_cnn

        model = load_demo_cnn(weights)
        cfg = model.config
        return PatchEncoder(name="demo-cnn", model=model, embed_dim=cfg.embed_dim, input_size=cfg.input_size,
                            mean=cfg.mean, std=cfg.std, device=device)
    if name.startswith("timm:"):
        from slidechat.encoders.timm_encoder import load_timm_encoder

        return load_timm_encoder(name.split(":", 1)[1], weights, device)
    if name == "uni":
        from slidechat.encoders.timm_encoder import load_uni

        return load_uni(weights, device)
    if name.startswith("open_clip:"):
        from slidechat.encoders.open_clip_encoder import load_open_clip_encoder

        return load_open_clip_encoder(name.split(":", 1)[1], weights, device)
    if name == "conch":
        from slidechat.encoders.open_clip_encoder import load_conch

        return load_conch(weights, device)
    raise ConfigError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_NAMES)}")


__all__ = ["PatchEncoder", "load_encoder", "ENCODER_NAMES"]
