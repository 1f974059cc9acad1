"""Per-patch relevance maps from the Q-Former's cross-attention (or the LLM's attention for the linear baseline).

Q-Former: the cross-attention probabilities [layers, heads, K, L] over the L = N patch + R region + S slide tokens
are averaged over heads and layers, then over the K queries (uniformly, or weighted by how much the LLM attended
to each query token: ``weighting="llm"``). Region scores are spread evenly over the region's patches and slide
scores over all patches; the sum per patch is min-max normalised to [0, 1].

Linear baseline (no queries): the LLM's attention from the text after the slide to each patch token; patches not
fed to the LLM (over ``max_tokens``) score 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slidechat.errors import SlideChatError
from slidechat.model.assistant import SLIDE_TOKEN_ID


@dataclass
class Heatmap:
    """``scores`` [N] in [0, 1]; ``coords`` [N, 2] level-0 top-left (x, y); ``has_coords`` False when the features
    had no coords (then coords are a raster in units of ``patch_size_level0``)."""

    scores: np.ndarray
    coords: np.ndarray
    patch_size_level0: float
    slide_id: str = ""
    has_coords: bool = True

    def top_patches(self, k: int = 10) -> np.ndarray:
        """Indices of the ``k`` highest-scoring patches."""
        return np.argsort(-self.scores)[:k]


def normalise01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    if not np.isfinite(lo) or hi - lo <= 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def relevance_to_patches(relevance: torch.Tensor, encoding) -> np.ndarray:
    """Map relevance over all tokens [N + R + S] back to the N patches (region/slide mass spread evenly)."""
    n, r = encoding.num_patches, encoding.num_regions
    rel = relevance.float().cpu()
    patch, region, slide = rel[:n], rel[n : n + r], rel[n + r :]
    idx = encoding.region_index.cpu()
    per_patch = patch + (region / encoding.region_sizes.cpu().float())[idx] + slide.sum() / n
    return per_patch.numpy()


def _attended_ids(conv) -> list[int]:
    """The token ids the LLM has read so far; before the first question, the prompt of a slide-only turn."""
    if SLIDE_TOKEN_ID in conv._fed:
        return conv._fed
    return conv.prompt_ids([{"role": "user", "content": ""}])


@torch.no_grad()
def llm_attention_to_slide(conv) -> torch.Tensor:
    """Mean attention (over layers, heads and the text tokens after the slide) of the LLM to each slide position."""
    a = conv.assistant
    fed = _attended_ids(conv)
    start = fed.index(SLIDE_TOKEN_ID)
    t = int(conv.state.tokens.shape[0])
    embeds = conv._embed(fed, 0, fed)[None]
    llm = a.llm
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    previous = base.config._attn_implementation
    try:
        base.set_attn_implementation("eager")
        out = llm(inputs_embeds=embeds, output_attentions=True, use_cache=False, logits_to_keep=1)
    finally:
        base.set_attn_implementation(previous)
    att = torch.stack([x[0].float().mean(0) for x in out.attentions]).mean(0)  # [L, L]
    return att[start + t :, start : start + t].mean(0).cpu()


def query_weights(token_attention: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Weights over the K queries from the LLM's attention to the projector's T output tokens.

    With concept tokens (T = C + K, concepts first) each concept token is made from all K queries, so its
    attention is shared evenly among them. Returns K weights summing to 1.
    """
    concepts = token_attention.shape[0] - num_queries
    w = token_attention[concepts:] + token_attention[:concepts].sum() / num_queries
    return w / w.sum().clamp_min(1e-12)


def conversation_heatmap(conv, weighting: str = "uniform") -> Heatmap:
    """The heatmap of a conversation's slide (``weighting``: "uniform" over queries, or "llm")."""
    if weighting not in ("uniform", "llm"):
        raise SlideChatError(f"heatmap weighting must be 'uniform' or 'llm', got {weighting!r}")
    st = conv.state
    enc = st.encoding
    if st.cross_attention is not None:
        maps = st.cross_attention.mean(dim=0)  # [K, L]
        if weighting == "llm":
            w = query_weights(llm_attention_to_slide(conv), maps.shape[0])
        else:
            w = torch.full((maps.shape[0],), 1.0 / maps.shape[0])
        scores = relevance_to_patches(w @ maps, enc)
    else:
        att = llm_attention_to_slide(conv)
        n_slide = int(enc.slide_tokens.shape[0]) if conv.assistant.projector.include_slide_tokens else 0
        scores = np.zeros(enc.num_patches, dtype=np.float32)
        scores[st.selected_patches.numpy()] = att[n_slide:].numpy()
    ps = conv.slide.patch_size_level0 or 1.0
    coords = enc.patch_coords.cpu().numpy()
    if not enc.has_coords:
        coords = coords * ps
    return Heatmap(scores=normalise01(scores), coords=coords.round().astype(np.int64), patch_size_level0=float(ps),
                   slide_id=conv.slide.slide_id, has_coords=enc.has_coords)
