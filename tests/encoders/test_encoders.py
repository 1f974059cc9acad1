"""Encoders load through the real code paths from small, randomly initialised models saved to disk."""

import json

import numpy as np
import pytest
import torch

from slidechat.encoders import load_encoder
from slidechat.encoders.demo_cnn import DemoCNN, DemoCNNConfig, save_demo_cnn
from slidechat.errors import CheckpointError, ConfigError


TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}
TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1},
}


def _patches(n=3, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)


def test_demo_cnn_roundtrip_and_interface(tmp_path):
    torch.manual_seed(1)
    model = DemoCNN(DemoCNNConfig(channels=(8, 16), embed_dim=12, input_size=64))
    path = save_demo_cnn(model, tmp_path / "cnn.safetensors")
    enc = load_encoder("demo-cnn", path)
    assert (enc.name, enc.embed_dim, enc.input_size) == ("demo-cnn", 12, 64)
    x = enc.transform_batch(_patches(4, 64))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(enc.transform(_patches(4, 64)[0]), x[0])
    out = enc(x)
    with torch.inference_mode():
        assert torch.allclose(out, model.eval()(x), atol=1e-5)
    assert model.classify(x).shape == (4, 7)
    # patches of another size are resized to the encoder's input size
    assert enc(enc.transform_batch(_patches(2, 96))).shape == (2, 12)


def test_demo_cnn_default_is_deterministic():
    a = load_encoder("demo-cnn")
    b = load_encoder("demo-cnn")
    x = a.transform_batch(_patches(2))
    # packaged trained weights (slidechat/assets/demo_cnn.safetensors) or the seeded random init
    assert a.embed_dim == a.model.config.embed_dim == a(x).shape[1]
    assert torch.allclose(a(x), b(x))


SMALL_VIT = {"depth": 2, "img_size": 64}


def _tiny_vit(**extra):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL_VIT, **extra).eval()


def test_timm_vit_from_safetensors_and_bin(tmp_path):
    from safetensors.torch import save_file

    ref = _tiny_vit(num_classes=10)  # the classifier head is dropped on load
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    x, outs = None, []
    for name, save in (("model.safetensors", lambda p: save_file(state, str(p))),
                       ("pytorch_model.bin", lambda p: torch.save(state, p))):
        folder = tmp_path / name.split(".")[1]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": SMALL_VIT}))
        save(folder / name)
        enc = load_encoder("timm:vit_tiny_patch16_224", folder)
        assert enc.embed_dim == 192 and enc.input_size == 64 and enc.mean == (0.5, 0.5, 0.5)
        x = enc.transform_batch(_patches(2, 64)) if x is None else x
        outs.append(enc(x))
    with torch.inference_mode():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert torch.allclose(outs[0], expected, atol=1e-4) and torch.allclose(outs[1], expected, atol=1e-4)
    # a bare weights file for a mismatched architecture is a clear error
    torch.save(state, tmp_path / "vit.bin")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder("timm:resnet18", tmp_path / "vit.bin")


def test_uni_layout_from_folder_with_config(tmp_path):
    """`uni` reads a timm/HF folder (config.json + pytorch_model.bin); a tiny ViT stands in for ViT-L/16."""
    args = {**SMALL_VIT, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args).eval()
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "model_args": args,
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }))
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    enc = load_encoder("uni", tmp_path)
    assert enc.name == "uni" and enc.input_size == 64 and enc.embed_dim == 192
    x = enc.transform_batch(_patches(2, 64))
    with torch.inference_mode():
        assert torch.allclose(enc(x), ref(x), atol=1e-4)


def test_uni_needs_weights_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="--weights"):
        load_encoder("uni")
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder("timm:resnet18", tmp_path / "missing.bin")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_encoder("timm:resnet18", tmp_path / "garbage.bin")


def _save_open_clip_dir(path, cfg, seed=0):
    import open_clip
    from safetensors.torch import save_file

    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{path}")  # random init: no weights in the folder yet
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return model.eval()


def test_conch_style_coca_from_local_dir(tmp_path):
    ref = _save_open_clip_dir(tmp_path / "conch", TINY_COCA)
    enc = load_encoder("conch", tmp_path / "conch")
    assert enc.name == "conch" and enc.input_size == 64 and enc.embed_dim == 32
    x = enc.transform_batch(_patches(2, 224))  # resized 224 -> 64
    with torch.inference_mode():
        assert torch.allclose(enc(x), ref.encode_image(x, normalize=False), atol=1e-4)


def test_open_clip_clip_from_local_dir(tmp_path):
    ref = _save_open_clip_dir(tmp_path / "clip", TINY_CLIP, seed=3)
    enc = load_encoder("open_clip:tiny", tmp_path / "clip")
    assert enc.embed_dim == 24 and enc.input_size == 32
    x = enc.transform_batch(_patches(2, 32))
    with torch.inference_mode():
        assert torch.allclose(enc(x), ref.encode_image(x, normalize=False), atol=1e-4)
    with pytest.raises(CheckpointError):
        load_encoder("conch")


def test_unknown_encoder():
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("resnet-9000")


def test_registry_lists_builtins_with_metadata_matching_the_model():
    from slidechat.encoders import encoder_spec, list_encoders

    names = list_encoders()
    for name in ("demo-cnn", "uni", "uni2-h", "gigapath", "conch", "timm:<arch>", "open_clip:<arch>"):
        assert name in names
    spec = encoder_spec("demo-cnn")
    enc = load_encoder("demo-cnn")
    assert (spec.embed_dim, spec.input_size, spec.mean, spec.std) == (enc.embed_dim, enc.input_size, enc.mean, enc.std)
    assert enc.mpp == spec.mpp == 0.5
    assert encoder_spec("timm:resnet18").name == "timm:<arch>"
    assert (encoder_spec("uni").embed_dim, encoder_spec("conch").input_size) == (1024, 448)


def test_register_encoder_decorator_family_and_errors():
    from slidechat.encoders import create_encoder, list_encoders, register_encoder, unregister_encoder
    from slidechat.encoders.base import PatchEncoder

    calls = []

    @register_encoder("test-linear", embed_dim=5, input_size=16, mpp=1.0, weights="optional")
    def build(weights=None, device="cpu", scale=1.0):
        calls.append((weights, scale))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        return PatchEncoder(name="test-linear", model=model, embed_dim=5, input_size=16)

    @register_encoder("testfam:<arch>")
    def build_family(weights=None, device="cpu", arch=""):
        return PatchEncoder(name=f"testfam:{arch}", model=torch.nn.Flatten(), embed_dim=3 * int(arch) ** 2,
                            input_size=int(arch))

    try:
        assert {"test-linear", "testfam:<arch>"} <= set(list_encoders())
        enc = create_encoder("test-linear", weights="w.bin", scale=2.0)
        assert calls == [("w.bin", 2.0)] and enc.mpp == 1.0
        assert enc(enc.transform_batch(_patches(2, 40))).shape == (2, 5)
        fam = create_encoder("testfam:16")
        assert (fam.name, fam.input_size) == ("testfam:16", 16)
        assert fam(fam.transform_batch(_patches(1, 16))).shape == (1, fam.embed_dim)
        with pytest.raises(ValueError, match="already registered"):
            register_encoder("test-linear", build)
        with pytest.raises(ConfigError, match="test-linear"):  # the error lists what is registered
            create_encoder("test-linaer")
        with pytest.raises(ConfigError, match="needs an architecture"):
            create_encoder("testfam:")
    finally:
        unregister_encoder("test-linear")
        unregister_encoder("testfam:<arch>")
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_encoder("test-linear")


@pytest.mark.parametrize("name", ["uni", "uni2-h", "gigapath", "conch"])
def test_pathology_encoders_require_local_weights(name, tmp_path):
    with pytest.raises(CheckpointError, match="--weights"):
        load_encoder(name)
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(name, tmp_path / "missing")


def _save_timm_folder(folder, arch, args, model_args_json, seed=0):
    """A random-weights model saved as a HF/timm folder (config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    ref = timm.create_model(arch, pretrained=False, num_classes=0, **args).eval()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "model_args": model_args_json}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    return ref


def test_uni2_and_gigapath_layouts_from_local_folders(tmp_path):
    """The real layer types of UNI2-h (SwiGLU, register tokens) and GigaPath (DINOv2 ViT, patch 16) at toy size."""
    import timm

    from slidechat.encoders.timm_encoder import GIGAPATH_ARCH, GIGAPATH_ARGS, UNI2_ARCH, UNI2_ARGS

    small = {"img_size": 56, "depth": 1, "embed_dim": 48, "num_heads": 2}
    uni2_args = {**UNI2_ARGS, **small, "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
    ref = _save_timm_folder(tmp_path / "uni2", UNI2_ARCH, uni2_args, small)
    enc = load_encoder("uni2-h", tmp_path / "uni2")
    assert (enc.name, enc.embed_dim, enc.input_size) == ("uni2-h", 48, 56)
    x = enc.transform_batch(_patches(2, 224))
    with torch.inference_mode():
        assert torch.allclose(enc(x), ref(x), atol=1e-4)

    small = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}
    ref = _save_timm_folder(tmp_path / "giga", GIGAPATH_ARCH, {**GIGAPATH_ARGS, **small}, small, seed=1)
    enc = load_encoder("gigapath", tmp_path / "giga")
    assert (enc.name, enc.embed_dim, enc.input_size, enc.mpp) == ("gigapath", 32, 32, 0.5)
    x = enc.transform_batch(_patches(2, 32))
    with torch.inference_mode():
        assert torch.allclose(enc(x), ref(x), atol=1e-4)
    # UNI2-h weights in a GigaPath folder: a clear error
    (tmp_path / "giga" / "model.safetensors").write_bytes((tmp_path / "uni2" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder("gigapath", tmp_path / "giga")


def test_importing_the_registry_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, slidechat.encoders as e; e.list_encoders(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
