"""Patch encoders behind one interface, through a registry (as timm / open_clip / TRIDENT do).

``create_encoder(name, weights=None, device="cpu") -> PatchEncoder`` (``load_encoder`` is the same call),
``list_encoders()`` for the names, ``register_encoder(name, factory, ...)`` (also a decorator) to add one.
Built-ins: ``demo-cnn``, ``uni``, ``uni2-h``, ``gigapath``, ``conch``, ``timm:<arch>``, ``open_clip:<arch>``.
Weights always come from a local path; nothing is downloaded. Importing this package does not import torch.
"""

from __future__ import annotations

from slidechat.encoders import builtin as _builtin  # noqa: F401  (registers the built-in encoders)
from slidechat.encoders.registry import (
    EncoderSpec,
    create_encoder,
    describe_encoders,
    encoder_spec,
    list_encoders,
    register_encoder,
    unregister_encoder,
)

load_encoder = create_encoder
ENCODER_NAMES = tuple(list_encoders())  # the built-ins; list_encoders() also has later registrations


def __getattr__(name: str):
    if name == "PatchEncoder":  # lazily: it needs torch
        from slidechat.encoders.base import PatchEncoder

        return PatchEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PatchEncoder", "EncoderSpec", "create_encoder", "load_encoder", "list_encoders", "register_encoder",
           "unregister_encoder", "encoder_spec", "describe_encoders", "ENCODER_NAMES"]
