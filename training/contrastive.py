"""Stage 0 (optional): BLIP-2 style slide<->text contrastive (ITC) + matching (ITM) for the slide encoder + projector.

The model parts (``RetrievalHeads``, ``TextEncoder``) live in ``slidechat.model.retrieval``; this module holds the
stage's data (slide, text) pairs, its loss and the :class:`ContrastiveStage` the trainer runs. Text embeddings
are computed once (the text encoder is frozen); the slide side is the mean of the projector's tokens. The heads
are saved next to the checkpoint (``retrieval.safetensors`` + ``retrieval.json``) and give
``slidechat.inference.retrieval.Retriever`` (retrieval, zero-shot) on any checkpoint trained with this stage.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidechat.errors import ConfigError, DataError
from slidechat.model.retrieval import RetrievalHeads, TextEncoder, save_retrieval_heads
from slidechat.training.data import FeatureCache, FeatureResolver, SkipCounter, load_samples
from slidechat.training.model_hooks import build_model, configure_trainable
from slidechat.training.trainer import StepOutput, Stage, TrainContext

log = logging.getLogger("training")

CONTRASTIVE_DEFAULTS = {"embed_dim": 256, "itm_weight": 1.0, "text_encoder": "minilm"}


def itc_itm_loss(heads: RetrievalHeads, s: torch.Tensor, t: torch.Tensor, itm_weight: float = 1.0,
                 pair_ids: list[str] | None = None) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE over the batch + ITM with the hardest in-batch negative per slide and per text.

    ``pair_ids``: slide id of each row; rows of the same slide are not used as each other's negatives.
    """
    b = s.shape[0]
    logits = heads.logit_scale.exp().clamp(max=100) * s @ t.T
    target = torch.arange(b, device=s.device)
    same = torch.zeros(b, b, dtype=torch.bool, device=s.device)
    if pair_ids is not None:
        ids = np.asarray(pair_ids)
        same = torch.from_numpy(ids[:, None] == ids[None, :]).to(s.device) & ~torch.eye(b, dtype=torch.bool, device=s.device)
    masked = logits.masked_fill(same, -1e4)
    itc = (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target)) / 2
    stats = {"itc": float(itc.detach())}
    loss = itc
    if itm_weight > 0 and b > 1:
        with torch.no_grad():
            sim = (s @ t.T).masked_fill(torch.eye(b, dtype=torch.bool, device=s.device) | same, -1e4)
            hard_t = sim.argmax(1)  # hardest text for each slide
            hard_s = sim.argmax(0)  # hardest slide for each text
        pos = heads.itm_logit(s, t)
        neg = torch.cat([heads.itm_logit(s, t[hard_t]), heads.itm_logit(s[hard_s], t)])
        itm = F.binary_cross_entropy_with_logits(torch.cat([pos, neg]),
                                                 torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
        loss = loss + itm_weight * itm
        stats["itm"] = float(itm.detach())
    return loss, stats


def _texts_from_sources(recipe) -> list[tuple[str, str]]:
    """(slide key, text) pairs: captions/reports, or the first answer of each instruction conversation."""
    pairs = []
    skips = SkipCounter()
    for src in recipe.data.sources:
        for s in load_samples(src.path, src.kind, skips, require_image_tag=recipe.data.require_image_tag):
            answer = next(m["content"] for m in s.messages if m["role"] == "assistant")
            pairs.append((s.slide_key, answer))
    return pairs


class _WithHeads(nn.Module):
    """The assistant and the retrieval heads as one trainable (and checkpointed) module; its forward is the loss,
    so a distributed wrapper sees the whole step."""

    def __init__(self, assistant, heads: RetrievalHeads) -> None:
        super().__init__()
        self.assistant = assistant
        self.heads = heads

    def forward(self, feats: list[torch.Tensor], coords: list, text_feats: torch.Tensor, pair_ids: list[str],
                itm_weight: float) -> torch.Tensor:
        _, proj = self.assistant.encode_features(feats, coords)
        sl = self.heads.slide_embed(torch.stack(proj.tokens))
        loss, _ = itc_itm_loss(self.heads, sl, self.heads.text_embed(text_feats), itm_weight, pair_ids)
        return loss


class ContrastiveStage(Stage):
    """ITC + ITM on (slide, text) pairs; saves ``final/`` (the assistant + its retrieval heads)."""

    def __init__(self, recipe, model=None) -> None:
        self.recipe = recipe
        self.name = recipe.name
        self.stage_id = 0
        self.model = model
        self.opts = {**CONTRASTIVE_DEFAULTS, **(recipe.contrastive or {})}
        unknown = set(self.opts) - set(CONTRASTIVE_DEFAULTS)
        if unknown:
            raise ConfigError(f"contrastive: unknown option(s) {sorted(unknown)}; valid: {sorted(CONTRASTIVE_DEFAULTS)}")

    def build(self, ctx: TrainContext) -> nn.Module:
        recipe = self.recipe
        model = self.model if self.model is not None else build_model(recipe)
        configure_trainable(model, recipe)
        if model.num_slide_tokens is None:
            raise ConfigError("stage 0 (contrastive) needs a projector with a fixed token count (qformer)")
        self.resolver = FeatureResolver(recipe.data.features_dir)
        self.cache = FeatureCache()
        self.pairs = [(k, t) for k, t in _texts_from_sources(recipe) if self.resolver.resolve(k) is not None]
        if len(self.pairs) < 2:
            raise DataError(f"stage 0 needs at least 2 (slide, text) pairs with features; found {len(self.pairs)}")
        self.text_encoder = TextEncoder(self.opts["text_encoder"], assistant=model)
        self.text_feats = self.text_encoder.encode([t for _, t in self.pairs])
        heads = RetrievalHeads(model.llm.get_input_embeddings().weight.shape[1], self.text_encoder.dim,
                               int(self.opts["embed_dim"]))
        return _WithHeads(model, heads)

    def batches_per_epoch(self) -> int:
        return -(-len(self.pairs) // self.recipe.train.batch_size)

    def epoch_batches(self, epoch: int, start: int, ctx: TrainContext):
        bs = self.recipe.train.batch_size
        perm = np.random.default_rng([self.recipe.train.seed, epoch]).permutation(len(self.pairs))
        batches = [perm[s:s + bs] for s in range(0, len(perm), bs)]
        for idx in batches[start:]:
            yield idx if len(idx) >= 2 else None  # one pair has no in-batch negative

    def loss(self, module, batch, ctx: TrainContext) -> StepOutput:
        feats, coords = zip(*(self.cache.get(self.resolver.resolve(self.pairs[i][0])) for i in batch))
        dev = ctx.device
        loss = module([f.to(dev) for f in feats], [None if c is None else c.to(dev) for c in coords],
                      self.text_feats[batch].to(dev), [self.pairs[i][0] for i in batch], float(self.opts["itm_weight"]))
        return StepOutput(loss, len(batch))

    def metrics_after(self, module, ctx: TrainContext, interrupted: bool) -> dict:
        return {"pairs": len(self.pairs)}

    def save_final(self, module, ctx: TrainContext) -> None:
        final = ctx.output_dir / "final"
        module.assistant.save_pretrained(final)
        save_retrieval_heads(module.heads, final, text_encoder=self.opts["text_encoder"], text_dim=self.text_encoder.dim,
                             embed_dim=int(self.opts["embed_dim"]))

    def result(self, module):
        return module.assistant
