"""The built-in encoders, registered on import. Factories import torch/timm/open_clip only when called.

Sizes, mean/std and mpp are those of the published weights; every pathology foundation model loads from a
local path the user gives (``--weights``), nothing is downloaded.
"""

from __future__ import annotations

from slidechat.encoders.registry import register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TWENTY_X = 0.5  # µm/px


@register_encoder("demo-cnn", embed_dim=64, input_size=112, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                  mpp=TWENTY_X, weights="packaged", description="small patch CNN trained on SynthSlide (default)")
def _demo_cnn(weights=None, device="cpu"):
    from slidechat.encoders.base import PatchEncoder
    from slidechat.encoders.demo_cnn import load_demo_cnn

    model = load_demo_cnn(weights)
    cfg = model.config
    return PatchEncoder(name="demo-cnn", model=model, embed_dim=cfg.embed_dim, input_size=cfg.input_size,
                        mean=cfg.mean, std=cfg.std, device=device)


@register_encoder("uni", embed_dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=TWENTY_X,
                  weights="required", description="UNI ViT-L/16 (timm folder or pytorch_model.bin)")
def _uni(weights=None, device="cpu"):
    from slidechat.encoders.timm_encoder import load_uni

    return load_uni(weights, device)


@register_encoder("uni2-h", embed_dim=1536, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=TWENTY_X,
                  weights="required", description="UNI2-h ViT-H/14, SwiGLU, 8 register tokens")
def _uni2(weights=None, device="cpu"):
    from slidechat.encoders.timm_encoder import load_uni2

    return load_uni2(weights, device)


@register_encoder("gigapath", embed_dim=1536, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=TWENTY_X,
                  weights="required", description="Prov-GigaPath tile encoder ViT-g/16 (DINOv2)")
def _gigapath(weights=None, device="cpu"):
    from slidechat.encoders.timm_encoder import load_gigapath

    return load_gigapath(weights, device)


@register_encoder("conch", embed_dim=512, input_size=448, mean=OPENAI_MEAN, std=OPENAI_STD, mpp=TWENTY_X,
                  weights="required", description="CONCH CoCa image tower (open_clip folder)")
def _conch(weights=None, device="cpu"):
    from slidechat.encoders.open_clip_encoder import load_conch

    return load_conch(weights, device)


@register_encoder("timm:<arch>", description="any timm architecture; random init without --weights")
def _timm(weights=None, device="cpu", arch: str = ""):
    from slidechat.encoders.timm_encoder import load_timm_encoder

    return load_timm_encoder(arch, weights, device)


@register_encoder("open_clip:<arch>", description="any open_clip image tower (CLIP, CoCa, PLIP, QuiltNet...)")
def _open_clip(weights=None, device="cpu", arch: str = ""):
    from slidechat.encoders.open_clip_encoder import load_open_clip_encoder

    return load_open_clip_encoder(arch, weights, device)
