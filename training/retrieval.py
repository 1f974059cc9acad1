"""Slide<->text retrieval and zero-shot classification for checkpoints trained with stage 0.

    from slidechat.training.retrieval import Retriever
    r = Retriever(assistant)                      # reads retrieval.safetensors/json from the checkpoint folder
    r.retrieve("a slide with a tumour focus", slides, top_k=5)  -> [(index, score), ...]
    r.zero_shot(slide, ["fat", "tumour", "necrosis"])          -> {label: probability}

Slides are anything ``assistant.chat`` accepts (EncodedSlide, SlideFeatures, an .h5 path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from slidechat.errors import CheckpointError
from slidechat.training.contrastive import RETRIEVAL_CONFIG, RETRIEVAL_WEIGHTS, RetrievalHeads, TextEncoder


class Retriever:
    def __init__(self, assistant, checkpoint_dir: str | Path | None = None) -> None:
        d = Path(checkpoint_dir or assistant.checkpoint_dir or "")
        if not (d / RETRIEVAL_WEIGHTS).is_file():
            raise CheckpointError(f"{d} has no {RETRIEVAL_WEIGHTS}; train it with a stage-0 recipe "
                                  "(training/recipes/stage0.yaml)")
        cfg = json.loads((d / RETRIEVAL_CONFIG).read_text())
        self.assistant = assistant
        self.heads = RetrievalHeads(cfg["slide_dim"], cfg["text_dim"], cfg["embed_dim"])
        self.heads.load_state_dict(load_file(str(d / RETRIEVAL_WEIGHTS)))
        self.heads.eval()
        self.text_encoder = TextEncoder(cfg["text_encoder"], assistant=assistant)

    @torch.no_grad()
    def embed_slides(self, slides: list) -> torch.Tensor:
        from slidechat.inference.encode import as_encoded_slide

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
