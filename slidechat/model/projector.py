"""The projector interface and registry: slide-encoder outputs -> tokens in the LLM's embedding space.

Every projector is an ``nn.Module`` subclass of ``SlideProjector`` registered by name (open_clip / timm style)::

    @register_projector("qformer")
    class QFormerProjector(SlideProjector): ...

    projector = create_projector(config.projector, config, llm_hidden_size)

It provides ``forward(encodings, output_attentions=False) -> ProjectorOutput``, ``num_output_tokens`` (None when
the count depends on the slide) and ``patch_relevance(encodings, output, token_weights=None)``: the one per-patch
relevance used by both the heatmap and the grounding loss. ``token_weights`` are optional weights over the
projector's output tokens (the LLM's attention to them); a projector whose relevance cannot be read from its own
attention (``relevance_needs_token_weights``) needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from slidechat.errors import ConfigError


@dataclass
class ProjectorOutput:
    """Projected slide tokens for the LLM: one [T_i, H_llm] tensor per slide.

    ``cross_attentions``: per-layer [B, heads, K, L] maps over the slide encoder's tokens (Q-Former, when asked);
    ``concept_logits``: [B, n_words] per concept (Q-Former with concept tokens); ``selected_patches``: per slide,
    the indices of the patch tokens fed to the LLM (linear projector).
    """

    tokens: list[torch.Tensor]
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    concept_logits: dict[str, torch.Tensor] | None = None
    selected_patches: list[torch.Tensor] | None = field(default=None)

    def for_relevance(self) -> "ProjectorOutput":
        """A detached CPU copy that keeps only what ``patch_relevance`` reads (maps averaged over layers and
        heads: [B, 1, K, L]), so a cached slide state stays small."""
        cross = None
        if self.cross_attentions:
            cross = (torch.stack([a.detach().float() for a in self.cross_attentions]).mean(dim=(0, 2))[:, None].cpu(),)
        selected = None if self.selected_patches is None else [s.detach().cpu() for s in self.selected_patches]
        return replace(self, tokens=[t.detach() for t in self.tokens], cross_attentions=cross,
                       concept_logits=None, selected_patches=selected)


def spread_to_patches(relevance: torch.Tensor, encoding) -> torch.Tensor:
    """Relevance over all slide-encoder tokens [N + R + S] -> the N patches: a region's mass is spread evenly over
    its patches, the slide tokens' mass over all patches (differentiable)."""
    n, r = encoding.num_patches, encoding.num_regions
    patch, region, slide = relevance[:n], relevance[n : n + r], relevance[n + r :]
    idx = encoding.region_index.to(relevance.device)
    sizes = encoding.region_sizes.to(relevance.device, relevance.dtype).clamp_min(1)
    return patch + (region / sizes)[idx] + slide.sum() / n


class SlideProjector(nn.Module):
    """Base class of projectors. Subclasses set ``name`` via ``register_projector`` and implement the methods."""

    name: ClassVar[str] = ""
    relevance_needs_token_weights: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, llm_hidden_size: int) -> "SlideProjector":
        """Build from a ``SlideAssistantConfig`` (each projector reads its own section)."""
        raise NotImplementedError

    @property
    def num_output_tokens(self) -> int | None:
        """Tokens per slide; None when it depends on the slide (e.g. one per patch)."""
        raise NotImplementedError

    def attach_llm(self, tokenizer, input_embeddings: torch.Tensor) -> None:
        """Called once the LLM is known (e.g. to look up concept words' embeddings). Default: nothing."""

    def forward(self, encodings: Sequence, output_attentions: bool = False) -> ProjectorOutput:
        raise NotImplementedError

    def patch_relevance(self, encodings: Sequence, output: ProjectorOutput,
                        token_weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-patch relevance [N_i] (>= 0, not normalised) for each slide of ``output``."""
        raise NotImplementedError


_REGISTRY: dict[str, type[SlideProjector]] = {}


def register_projector(name: str) -> Callable[[type[SlideProjector]], type[SlideProjector]]:
    """Class decorator: make a ``SlideProjector`` subclass available as ``config.projector = name``."""

    def add(cls: type[SlideProjector]) -> type[SlideProjector]:
        if not (isinstance(cls, type) and issubclass(cls, SlideProjector)):
            raise TypeError(f"{cls!r} is not a SlideProjector subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a projector named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def list_projectors() -> list[str]:
    """Names accepted by ``config.projector`` (the built-in ones register when ``slidechat.model`` is imported)."""
    return sorted(_REGISTRY)


def get_projector_class(name: str) -> type[SlideProjector]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown projector {name!r}; registered projectors are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create_projector(name: str, config, llm_hidden_size: int) -> SlideProjector:
    """The projector registered as ``name``, built from ``config`` (a ``SlideAssistantConfig``)."""
    return get_projector_class(name).from_config(config, llm_hidden_size)


__all__ = ["SlideProjector", "ProjectorOutput", "register_projector", "create_projector", "list_projectors",
           "get_projector_class", "spread_to_patches"]
