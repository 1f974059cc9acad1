"""DemoCNN: a small, fast patch CNN (the embedded default encoder; trained on SynthSlide patches)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slidechat.errors import CheckpointError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "demo_cnn.safetensors"


@dataclass
class DemoCNNConfig:
    """Stride-4 stem, conv blocks (stride 2 each) -> mean+std pool -> linear embedding; optional class head."""

    channels: tuple[int, ...] = (24, 48, 96, 128)
    embed_dim: int = 128
    input_size: int = 224
    num_classes: int = 7  # background + SynthSlide tissue classes, for supervised training
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @classmethod
    def from_dict(cls, d: dict) -> "DemoCNNConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class DemoCNN(nn.Module):
    """Small CNN: ``forward`` gives embeddings [B, embed_dim]; ``classify`` gives class logits."""

    def __init__(self, config: DemoCNNConfig | None = None):
        super().__init__()
        self.config = config or DemoCNNConfig()
        # a 4x4/stride-4 stem keeps nucleus-scale texture (nuclei are 8-20 px at 0.5 mpp) and is cheap
        c0 = self.config.channels[0]
        layers: list[nn.Module] = [nn.Conv2d(3, c0, 4, stride=4, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)]
        c_in = c0
        for c in self.config.channels[1:]:
            layers += [
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # mean + std pooling keeps texture statistics; projected to the embedding
        self.proj = nn.Linear(2 * c_in, self.config.embed_dim)
        self.head = nn.Linear(self.config.embed_dim, self.config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)
        return self.proj(pooled)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.forward(x)))


def save_demo_cnn(model: DemoCNN, path: str | os.PathLike) -> Path:
    """Save weights + config (in the safetensors metadata) to one ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(asdict(model.config)), "format": "pt"})
    os.replace(tmp, path)
    return path


def load_demo_cnn(path: str | os.PathLike | None = None) -> DemoCNN:
    """Load a DemoCNN from a ``.safetensors`` file (or a folder holding ``demo_cnn.safetensors`` /
    ``model.safetensors``). With no path: the packaged weights if present, else seeded random init."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        if not DEFAULT_WEIGHTS.is_file():
            torch.manual_seed(0)
            return DemoCNN().eval()
        path = DEFAULT_WEIGHTS
    path = Path(path)
    if path.is_dir():
        for name in ("demo_cnn.safetensors", "model.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"demo-cnn weights not found: {path}; pass a .safetensors file with --weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        config = DemoCNNConfig.from_dict(json.loads(meta["config"])) if "config" in meta else DemoCNNConfig()
        cfg_json = path.with_name("config.json")
        if "config" not in meta and cfg_json.is_file():
            config = DemoCNNConfig.from_dict(json.loads(cfg_json.read_text()))
        model = DemoCNN(config)
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid demo-cnn safetensors file ({exc})") from exc
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match DemoCNN (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
