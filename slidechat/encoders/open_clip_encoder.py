"""open_clip image towers (CLIP / CoCa: CONCH, PLIP, QuiltNet-style) from local weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from slidechat.encoders.base import PatchEncoder
from slidechat.errors import CheckpointError

log = logging.getLogger(__name__)

CONCH_FALLBACK_ARCH = "coca_ViT-B-32"


class _ImageTower(nn.Module):
    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x, normalize=False)


def load_open_clip_encoder(
    arch: str, weights: str | os.PathLike | None, device: str = "cpu", name: str | None = None,
    require_weights: bool = False,
) -> PatchEncoder:
    """``weights``: a checkpoint file (for a built-in ``arch``) or a folder with ``open_clip_config.json``
    + weights (open_clip's local-dir layout, which also defines custom architectures such as CONCH)."""
    import open_clip

    wpath = Path(weights) if weights is not None else None
    if wpath is None and require_weights:
        raise CheckpointError(f"encoder {name or arch!r} needs local weights: pass --weights PATH")
    if wpath is not None and not wpath.exists():
        raise CheckpointError(f"encoder weights not found: {wpath}; give a local file or folder with --weights")
    try:
        if wpath is not None and wpath.is_dir():
            if not (wpath / "open_clip_config.json").is_file():
                raise CheckpointError(f"{wpath}: folder has no open_clip_config.json (open_clip local-dir layout)")
            model = open_clip.create_model(f"local-dir:{wpath}", device="cpu")
        elif wpath is not None:
            model = open_clip.create_model(arch, pretrained=str(wpath), device="cpu")
        else:
            log.warning("open_clip:%s has no --weights: using random initialisation", arch)
            model = open_clip.create_model(arch, device="cpu")
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"open_clip cannot load {arch!r} from {wpath} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    visual = model.visual
    pcfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(pcfg.get("mean", getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pcfg.get("std", getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    tower = _ImageTower(model).eval()
    with torch.inference_mode():
        dim = int(tower(torch.zeros(1, 3, size, size)).shape[-1])
    return PatchEncoder(name=name or f"open_clip:{arch}", model=tower, embed_dim=dim, input_size=size,
                        mean=mean, std=std, device=device, extra={"arch": arch})


def load_conch(weights: str | os.PathLike | None, device: str = "cpu") -> PatchEncoder:
    """CONCH-style CoCa image encoder from a local folder (open_clip_config.json + weights) or file."""
    return load_open_clip_encoder(CONCH_FALLBACK_ARCH, weights, device, name="conch", require_weights=True)
