"""Per-patch relevance maps of a conversation's slide: the projector's ``patch_relevance`` min-max normalised.

Q-Former: its cross-attention over the N patch + R region + S slide tokens, averaged over layers and heads, then
over the K queries, uniformly (``weighting="uniform"``) or weighted by how much the LLM attended to each of the
projector's output tokens (``weighting="llm"``; a concept token's share goes evenly to the queries it is read
from). Region scores are spread evenly over the region's patches and slide scores over all patches.

Linear baseline (no attention of its own): the LLM's attention to each patch token, whatever the weighting;
patches not fed to the LLM score 0.

The LLM's attention is the mean over layers, heads and the text tokens after the slide (the questions and answers
so far; before the first question, the rest of a slide-only prompt); in a case, after the last slide, each slide's
heatmap reading its own tokens' share. It is computed by an eager-attention view of
the LLM that shares its weights (``InferenceCache.attention_view``): the shared model is never switched, so
concurrent sessions are unaffected. Only the text after the slide is run through the view, on top of the slide
prefix's key/values (computed once per conversation and cropped back after each call), so the attention matrix
is [text, all] rather than [all, all].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slidechat.errors import SlideChatError
from slidechat.model.llm import cache_kwarg, crop_cache
from slidechat.viz import normalize_scores

WEIGHTINGS = ("uniform", "llm")


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


@torch.no_grad()
def llm_attention_to_slides(conv) -> list[torch.Tensor]:
    """Per slide, [T] mean attention (over layers, heads and the text tokens after the last slide) of the LLM to
    each of its tokens."""
    ids = conv.attended_ids()
    memo = conv.slide_attention
    if memo is not None and memo[0] == tuple(ids):
        return memo[1]  # heatmaps of every slide and the case's evidence read the same attention
    spans = conv.slide_spans(ids)
    end = spans[-1][1]
    if end >= len(ids):
        raise SlideChatError("no text follows the slide, so the LLM's attention to it is undefined")
    embeds = conv._embed(ids, 0, ids)[None]
    llm = conv.model.llm
    view = conv.cache.attention_view(llm)
    key = tuple(ids[:end])
    with conv.slide_prefix_lock:  # the slide prefix's key/values are reused across calls, cropped back after each
        past = conv.slide_prefix[1] if conv.slide_prefix is not None and conv.slide_prefix[0] == key else None
        if past is None:
            prefix = llm(inputs_embeds=embeds[:, :end], use_cache=True, logits_to_keep=1)
            past = getattr(prefix, "cache", None) or getattr(prefix, "past_key_values", None)
        out = view(inputs_embeds=embeds[:, end:], use_cache=True, output_attentions=True, logits_to_keep=1,
                   **{cache_kwarg(llm): past})
        conv.slide_prefix = (key, past) if crop_cache(past, past.get_seq_length() - end) else None
    att = torch.stack([a[0, :, :, :end].float().mean(dim=0) for a in out.attentions]).mean(dim=(0, 1)).cpu()
    per_slide = [att[a:b] for a, b in spans]
    conv.slide_attention = (tuple(ids), per_slide)
    return per_slide


def llm_attention_to_slide(conv, slide: int = 0) -> torch.Tensor:
    """[T] the LLM's mean attention to each token of slide ``slide`` (see ``llm_attention_to_slides``)."""
    return llm_attention_to_slides(conv)[slide]


def slide_attention_shares(conv) -> list[float]:
    """How the LLM's attention to the case's slide tokens splits over its slides (sums to 1)."""
    totals = [float(a.sum()) for a in llm_attention_to_slides(conv)]
    total = sum(totals) or 1.0
    return [t / total for t in totals]


def conversation_heatmap(conv, weighting: str = "uniform", slide: int = 0) -> Heatmap:
    """The heatmap of slide ``slide`` of a conversation (``weighting``: "uniform" over queries, or "llm")."""
    if weighting not in WEIGHTINGS:
        raise SlideChatError(f"heatmap weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    st = conv.states[slide]
    enc = st.encoding
    projector = conv.model.projector
    weights = None
    if weighting == "llm" or projector.relevance_needs_token_weights:
        weights = [llm_attention_to_slide(conv, slide)]
    with torch.no_grad():
        relevance = projector.patch_relevance([enc], st.output, weights)[0]
    ps = st.slide.patch_size_level0 or 1.0
    coords = enc.patch_coords.cpu().numpy()
    if not enc.has_coords:
        coords = coords * ps
    return Heatmap(scores=normalize_scores(relevance.float().cpu().numpy()).astype(np.float32),
                   coords=coords.round().astype(np.int64), patch_size_level0=float(ps), slide_id=st.slide.slide_id,
                   has_coords=enc.has_coords)


__all__ = ["Heatmap", "conversation_heatmap", "llm_attention_to_slide", "llm_attention_to_slides",
           "slide_attention_shares", "WEIGHTINGS"]
