"""The patch-encoder registry: ``register_encoder`` / ``list_encoders`` / ``create_encoder``.

An entry is a name, a factory ``factory(weights=None, device="cpu", **kwargs) -> PatchEncoder`` and what a
user needs to pick it: embedding size, input size, mean/std, the microns per pixel its patches should have,
and whether weights are packaged, optional or required. A *family* entry (``timm:<arch>``) takes any
architecture after the colon and its factory gets ``arch=``. Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from slidechat.errors import ConfigError

if TYPE_CHECKING:
    from slidechat.encoders.base import PatchEncoder

WEIGHTS_KINDS = ("packaged", "optional", "required")
FAMILY_SUFFIX = ":<arch>"


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder. Sizes are those of the real weights (None: they depend on the architecture)."""

    name: str
    factory: Callable[..., "PatchEncoder"] = field(repr=False)
    embed_dim: int | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    mpp: float | None = None  # µm/px the encoder was trained at (0.5 ≈ 20x)
    weights: str = "optional"
    description: str = ""
    family: bool = False  # name is "<prefix>:<arch>"

    @property
    def prefix(self) -> str:
        return self.name.removesuffix(FAMILY_SUFFIX)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.embed_dim, "input_size": self.input_size,
                "mean": self.mean, "std": self.std, "mpp": self.mpp, "weights": self.weights,
                "description": self.description}


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(
    name: str, factory: Callable[..., "PatchEncoder"] | None = None, *, embed_dim: int | None = None,
    input_size: int | None = None, mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None, mpp: float | None = None, weights: str = "optional",
    description: str = "", overwrite: bool = False,
):
    """Register ``factory`` under ``name`` (``"prefix:<arch>"`` registers a family); usable as a decorator.

    ``weights``: "packaged" (works with none given), "optional" (random init without) or "required".
    """
    if factory is None:
        return lambda f: register_encoder(name, f, embed_dim=embed_dim, input_size=input_size, mean=mean, std=std,
                                          mpp=mpp, weights=weights, description=description, overwrite=overwrite)
    family = name.endswith(FAMILY_SUFFIX)
    base = name.removesuffix(FAMILY_SUFFIX)
    if not base or ":" in base or any(c.isspace() for c in name):
        raise ValueError(f"invalid encoder name {name!r}: use e.g. 'my-encoder' or 'prefix:<arch>'")
    if weights not in WEIGHTS_KINDS:
        raise ValueError(f"weights must be one of {WEIGHTS_KINDS}, got {weights!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"encoder {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = EncoderSpec(
        name=name, factory=factory, embed_dim=embed_dim, input_size=input_size,
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        mpp=mpp, weights=weights, description=description, family=family,
    )
    return factory


def unregister_encoder(name: str) -> None:
    """Remove ``name`` from the registry (no error when absent)."""
    _REGISTRY.pop(name, None)


def list_encoders() -> list[str]:
    """Registered encoder names, in registration order (families as ``prefix:<arch>``)."""
    return list(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry that ``name`` resolves to (a family for ``prefix:anything``)."""
    return _resolve(name)[0]


def _resolve(name: str) -> tuple[EncoderSpec, str | None]:
    if not isinstance(name, str):
        raise ConfigError(f"encoder name must be a string, got {type(name).__name__}")
    spec = _REGISTRY.get(name)
    if spec is not None and not spec.family:
        return spec, None
    if ":" in name:
        prefix, arch = name.split(":", 1)
        spec = _REGISTRY.get(prefix + FAMILY_SUFFIX)
        if spec is not None:
            if not arch or arch == "<arch>":
                example = "vit_base_patch16_224" if prefix == "timm" else "ViT-B-16"
                raise ConfigError(f"encoder {name!r} needs an architecture after the colon, e.g. {prefix}:{example}")
            return spec, arch
    names = list_encoders()
    close = difflib.get_close_matches(name, [n for n in names if not n.endswith(FAMILY_SUFFIX)], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown encoder {name!r}{hint}; registered encoders: {', '.join(names)}")


def create_encoder(name: str, weights: str | os.PathLike | None = None, device: str = "cpu",
                   **kwargs) -> "PatchEncoder":
    """Build the registered encoder ``name`` from local ``weights`` (a file or folder) on ``device``."""
    spec, arch = _resolve(name)
    if arch is not None:
        kwargs["arch"] = arch
    encoder = spec.factory(weights=weights, device=device, **kwargs)
    if encoder.mpp is None:
        encoder.mpp = spec.mpp
    return encoder


def describe_encoders() -> str:
    """A table of the registered encoders (name, dim, input, mpp, weights, description) for help texts."""
    rows = [("name", "dim", "input", "mpp", "weights", "")]
    for s in _REGISTRY.values():
        rows.append((s.name, str(s.embed_dim or "-"), str(s.input_size or "-"), f"{s.mpp:g}" if s.mpp else "-",
                     s.weights, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows).rstrip()
