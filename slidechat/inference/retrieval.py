"""Slide<->text retrieval and zero-shot classification with a checkpoint's stage-0 retrieval heads.

    from slidechat.inference.retrieval import Retriever
    r = Retriever(assistant)                      # reads retrieval.safetensors/json from the checkpoint folder
    r.retrieve("a slide with a tumour focus", slides, top_k=5)  -> [(index, score), ...]
    r.zero_shot(slide, ["fat", "tumour", "necrosis"])          -> {label: probability}

Slides are anything ``assistant.chat`` accepts (EncodedSlide, SlideFeatures, an .h5 path).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slidechat.inference.encode import as_encoded_slide
from slidechat.model.retrieval import TextEncoder, load_retrieval_heads


class Retriever:
    """Embeds slides (mean projector token -> slide head) and texts (text encoder -> text head) into one space."""

    def __init__(self, assistant, checkpoint_dir: str | Path | None = None) -> None:
        self.assistant = assistant
        self.heads, cfg = load_retrieval_heads(Path(checkpoint_dir or assistant.checkpoint_dir or ""))
        self.text_encoder = TextEncoder(cfg["text_encoder"], assistant=assistant)

    @torch.no_grad()
    def embed_slides(self, slides: list) -> torch.Tensor:
        feats, coords = [], []
        for s in slides:
            enc = as_encoded_slide(self.assistant, s)
            feats.append(torch.as_tensor(enc.features.features))
            c = enc.features.coords
            coords.append(None if c is None else torch.as_tensor(c))
        _, proj = self.assistant.encode_features(feats, coords)
        return self.heads.slide_embed(torch.stack(proj.tokens))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.heads.text_embed(self.text_encoder.encode(texts))

    def retrieve(self, text: str, slides: list, top_k: int = 5) -> list[tuple[int, float]]:
        """Slides ranked by similarity to ``text``: [(index, cosine similarity)]."""
        sims = (self.embed_slides(slides) @ self.embed_texts([text]).T).squeeze(1)
        order = torch.argsort(sims, descending=True)[:top_k]
        return [(int(i), float(sims[i])) for i in order]

    @torch.no_grad()
    def zero_shot(self, slide, labels: list[str], template: str = "{}") -> dict[str, float]:
        """Probability of each label (softmax over the ITC similarities with the label prompts)."""
        s = self.embed_slides([slide])
        t = self.embed_texts([template.format(x) for x in labels])
        p = torch.softmax(self.heads.logit_scale.exp() * (s @ t.T).squeeze(0), dim=0)
        return {lab: float(v) for lab, v in zip(labels, p)}
