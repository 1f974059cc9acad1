"""PatchEncoder: the one interface every patch encoder is used through."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PatchEncoder:
    """Wraps a torch module mapping normalised images [B, 3, S, S] to embeddings [B, D].

    ``transform`` turns one uint8 HxWx3 patch into a normalised float tensor 3xSxS;
    ``transform_batch`` does the same for a uint8 [B, H, W, 3] array/tensor in one vectorised step.
    """

    name: str
    model: torch.nn.Module
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    mpp: float | None = None  # µm/px the encoder expects its patches at (None: unknown)

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).eval()
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    def transform_batch(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(patches)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self._mean) / self._std

    def transform(self, patch: np.ndarray) -> torch.Tensor:
        return self.transform_batch(patch)[0]

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(batch.to(self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().reshape(out.shape[0], -1)
