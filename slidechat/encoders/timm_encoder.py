"""timm models (any architecture; UNI, UNI2-h and Prov-GigaPath layouts) from local weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from slidechat.encoders.base import PatchEncoder
from slidechat.errors import CheckpointError

log = logging.getLogger(__name__)

UNI_ARCH = "vit_large_patch16_224"
UNI_ARGS = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}
UNI2_ARCH = "vit_giant_patch14_224"
UNI2_ARGS = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
             "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True}
GIGAPATH_ARCH = "vit_giant_patch14_dinov2"
GIGAPATH_ARGS = {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.bin")
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.")


def find_weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)}) in this folder")
    raise CheckpointError(f"encoder weights not found: {path}; give a local file or folder with --weights")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only=True, never unpickles code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_config(path: Path | None) -> dict:
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({exc})") from exc
    return {}


def load_timm_encoder(
    arch: str, weights: str | os.PathLike | None, device: str = "cpu", name: str | None = None,
    model_args: dict | None = None, require_weights: bool = False,
) -> PatchEncoder:
    """Create ``arch`` with timm (no download), load local ``weights``, return a PatchEncoder.

    A weights folder may hold a timm/HF ``config.json`` (``architecture``, ``model_args``,
    ``pretrained_cfg`` with mean/std/input_size) that overrides ``arch``/``model_args``.
    """
    import timm
    from timm.data import resolve_data_config

    wpath = Path(weights) if weights is not None else None
    if wpath is None and require_weights:
        raise CheckpointError(f"encoder {name or arch!r} needs local weights: pass --weights PATH")
    weights_file = find_weights_file(wpath) if wpath is not None else None  # before building a large model
    cfg = _read_config(wpath)
    arch = cfg.get("architecture", arch)
    args = {**(model_args or {}), **cfg.get("model_args", {})}
    args["num_classes"] = 0
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except Exception as exc:
        raise CheckpointError(f"timm cannot build {arch!r} ({type(exc).__name__}: {exc})") from exc
    if wpath is not None:
        state = load_state_dict_file(weights_file)
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise CheckpointError(f"{wpath}: weights do not fit {arch} ({str(exc).splitlines()[0]})") from exc
        missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
        if missing or unexpected:
            raise CheckpointError(
                f"{wpath}: weights do not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    else:
        log.warning("timm:%s has no --weights: using random initialisation", arch)
    data_cfg = resolve_data_config(cfg.get("pretrained_cfg", {}), model=model)
    size = int(data_cfg["input_size"][-1])
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViTs built for another size
    if built and "input_size" not in cfg.get("pretrained_cfg", {}):
        size = int(built[0] if isinstance(built, (tuple, list)) else built)
    model.eval()
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])
    return PatchEncoder(
        name=name or f"timm:{arch}", model=model, embed_dim=dim, input_size=size,
        mean=tuple(float(v) for v in data_cfg["mean"]), std=tuple(float(v) for v in data_cfg["std"]), device=device,
        extra={"arch": arch},
    )


def load_uni(weights: str | os.PathLike | None, device: str = "cpu") -> PatchEncoder:
    """UNI-style ViT-L/16 (timm ``vit_large_patch16_224``, init_values 1e-5) from local weights."""
    return load_timm_encoder(UNI_ARCH, weights, device, name="uni", model_args=UNI_ARGS, require_weights=True)


def load_uni2(weights: str | os.PathLike | None, device: str = "cpu") -> PatchEncoder:
    """UNI2-h (timm ``vit_giant_patch14_224`` with SwiGLU MLPs and 8 register tokens) from local weights.

    Its MLP and activation layers are classes, so they are given here rather than read from config.json.
    """
    import timm

    args = {**UNI2_ARGS, "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    return load_timm_encoder(UNI2_ARCH, weights, device, name="uni2-h", model_args=args, require_weights=True)


def load_gigapath(weights: str | os.PathLike | None, device: str = "cpu") -> PatchEncoder:
    """Prov-GigaPath tile encoder (timm ``vit_giant_patch14_dinov2``, patch 16) from local weights."""
    return load_timm_encoder(GIGAPATH_ARCH, weights, device, name="gigapath", model_args=GIGAPATH_ARGS,
                             require_weights=True)
