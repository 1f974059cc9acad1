"""LinearProjector: the SlideChat-style baseline. Every patch token (capped at ``max_tokens`` by uniform
subsampling, + the slide tokens if ``include_slide_tokens``) goes through an MLP into the LLM; the LLM's cost grows
with N. It has no attention of its own, so its relevance is the LLM's attention to the patch tokens
(``token_weights``); patches not fed to the LLM score 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from slidechat.model.projector import ProjectorOutput, SlideProjector, register_projector


@register_projector("linear")
class LinearProjector(SlideProjector):
    relevance_needs_token_weights = True

    def __init__(self, encoder_hidden: int, llm_hidden: int, num_layers: int = 2, max_tokens: int = 38400,
                 include_slide_tokens: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(encoder_hidden, llm_hidden)]
        for _ in range(num_layers - 1):
            layers += [nn.GELU(), nn.Linear(llm_hidden, llm_hidden)]
        self.mlp = nn.Sequential(*layers)
        self.max_tokens = max_tokens
        self.include_slide_tokens = include_slide_tokens

    @classmethod
    def from_config(cls, config, llm_hidden_size: int) -> "LinearProjector":
        lc = config.linear
        return cls(config.encoder.hidden_size, llm_hidden_size, lc.num_layers, lc.max_tokens, lc.include_slide_tokens)

    @property
    def num_output_tokens(self) -> None:
        return None  # one per patch (up to max_tokens), plus the slide tokens

    def select(self, n: int, device=None) -> torch.Tensor:
        """Indices of the patch tokens that are kept (uniform stride when over ``max_tokens``)."""
        if self.max_tokens and n > self.max_tokens:
            return torch.linspace(0, n - 1, self.max_tokens, device=device).round().long()
        return torch.arange(n, device=device)

    def forward(self, encodings: Sequence, output_attentions: bool = False) -> ProjectorOutput:
        tokens, selected = [], []
        for enc in encodings:
            keep = self.select(enc.num_patches, enc.patch_tokens.device)
            x = enc.patch_tokens[keep]
            if self.include_slide_tokens:
                x = torch.cat([enc.slide_tokens, x], dim=0)
            tokens.append(self.mlp(x))
            selected.append(keep)
        return ProjectorOutput(tokens=tokens, selected_patches=selected)

    def patch_relevance(self, encodings: Sequence, output: ProjectorOutput,
                        token_weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        out = []
        for b, enc in enumerate(encodings):
            keep = output.selected_patches[b]
            n_slide = int(enc.slide_tokens.shape[0]) if self.include_slide_tokens else 0
            if token_weights is None:  # no attention to read: every fed patch counts the same
                w = torch.ones(keep.shape[0])
            else:
                w = token_weights[b][n_slide:].float()
            rel = torch.zeros(enc.num_patches, dtype=w.dtype, device=w.device)
            out.append(rel.index_put((keep.to(w.device),), w))
        return out


__all__ = ["LinearProjector"]
