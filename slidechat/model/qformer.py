"""QFormerProjector: K learned queries read the slide tokens and become K tokens in the LLM's embedding space.

The Q-Former is the BLIP-2 design (post-LayerNorm BERT layers: self-attention over the queries, cross-attention
to the slide tokens every ``cross_attention_frequency`` layers, a query feed-forward), with the **same module and
parameter names as** ``transformers.Blip2QFormerModel`` (query-only path, ``use_qformer_text_input=False``), so a
BLIP-2 Q-Former state dict loads into ``QFormerModel`` unchanged (tests compare outputs numerically).

Differences from ``Blip2QFormerModel`` (none of them numerical):
- cross-attention is computed over key chunks with log-sum-exp (online softmax) merging, so 100k slide tokens
  never materialise the full [heads, K, N] score matrix unless attention maps are requested;
- the key padding mask is a bool [B, L] mask (True = real token);
- cross-attention probabilities are returned (per cross-attention layer, [B, heads, K, L]) for heatmaps.

**Concept tokens** (optional, ``QFormerConfig.concepts``): for each named concept (e.g. "dominant tissue" with its
candidate words) a linear head reads the K query outputs; its softmax weights mix the LLM's own input embeddings of
the candidate words into one token, and the C concept tokens go before the K query tokens. A confident head hands
the LLM the very word it must use, so the LLM learns to *read* the slide in a few hundred steps instead of decoding an
arbitrary code; the heads are trained on structured labels (``training/slide_pretrain.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.errors import ConfigError
from slidechat.model.config import QFormerConfig
from slidechat.model.patch_readout import PatchClassReadout, patch_read_concepts
from slidechat.model.projector import (ProjectorOutput, SlideProjector, register_projector,
                                        spread_to_patches)
from slidechat.model.slide_encoder import pad_and_stack


def _act(name: str):
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
            "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[name]


def chunked_attention(q: torch.Tensor, k_fn, v_fn, length: int, key_mask: torch.Tensor | None, chunk: int,
                      return_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of ``q`` [B, h, Lq, d] (already scaled) over ``length`` keys produced chunk by chunk.

    ``k_fn(s, e)`` / ``v_fn(s, e)`` return keys / values [B, h, e - s, d] of the chunk [s, e); ``key_mask`` is
    bool [B, length]. Returns the attention output [B, h, Lq, d] and, if asked, the probabilities [B, h, Lq, length].
    """
    out = None
    run_max = run_sum = None
    kept_scores = []
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        scores = q @ k_fn(s, e).transpose(-1, -2)  # [B, h, Lq, c]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, s:e], float("-inf"))
        if return_probs:
            kept_scores.append(scores)
        c_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
        p = torch.exp(scores - c_max)
        c_sum = p.sum(dim=-1, keepdim=True)
        c_out = p @ v_fn(s, e)
        if out is None:
            out, run_max, run_sum = c_out, c_max, c_sum
        else:
            new_max = torch.maximum(run_max, c_max)
            a, b = torch.exp(run_max - new_max), torch.exp(c_max - new_max)
            out = out * a + c_out * b
            run_sum = run_sum * a + c_sum * b
            run_max = new_max
    run_sum = run_sum.clamp_min(1e-30)
    probs = None
    if return_probs:
        lse = run_max + torch.log(run_sum)
        probs = torch.exp(torch.cat(kept_scores, dim=-1) - lse)
    return out / run_sum, probs


class QFormerMultiHeadAttention(nn.Module):
    """Names as ``Blip2QFormerMultiHeadAttention``: ``query``, ``key``, ``value``."""

    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_in, config.hidden_size)
        self.value = nn.Linear(kv_in, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_mask: torch.Tensor | None = None, output_attentions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, lq, _ = hidden_states.shape
        q = self._heads(self.query(hidden_states)) * (self.head_dim ** -0.5)
        if encoder_hidden_states is None:  # self-attention over the K queries: small, plain softmax
            k, v = self._heads(self.key(hidden_states)), self._heads(self.value(hidden_states))
            probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            ctx = self.attn_dropout(probs) @ v
            probs = probs if output_attentions else None
        else:
            enc = encoder_hidden_states
            chunk = max(1, int(self.config.key_chunk_size))
            ctx, probs = chunked_attention(
                q, lambda s, e: self._heads(self.key(enc[:, s:e])), lambda s, e: self._heads(self.value(enc[:, s:e])),
                enc.shape[1], encoder_mask, chunk, return_probs=output_attentions)
        return ctx.transpose(1, 2).reshape(b, lq, -1), probs


class QFormerSelfOutput(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerAttention(nn.Module):
    def __init__(self, config: QFormerConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_mask=None, output_attentions=False):
        ctx, probs = self.attention(hidden_states, encoder_hidden_states, encoder_mask, output_attentions)
        return self.output(ctx, hidden_states), probs


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _act(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerOutput(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def forward(self, hidden_states, encoder_hidden_states, encoder_mask=None, output_attentions=False):
        x, self_probs = self.attention(hidden_states, output_attentions=output_attentions)
        cross_probs = None
        if self.has_cross_attention:
            x, cross_probs = self.crossattention(x, encoder_hidden_states, encoder_mask, output_attentions)
        return self.output_query(self.intermediate_query(x), x), self_probs, cross_probs


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))


class QFormerModel(nn.Module):
    """Query-only BLIP-2 Q-Former; state-dict compatible with ``transformers.Blip2QFormerModel``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config)

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_mask: torch.Tensor | None = None, output_attentions: bool = False):
        """Returns ``(last_hidden_state [B, K, Hq], cross_attentions tuple of [B, h, K, L] or ())``."""
        x = self.dropout(self.layernorm(query_embeds))
        enc = encoder_hidden_states.to(x.dtype)
        cross = []
        for layer in self.encoder.layer:
            x, _, cp = layer(x, enc, encoder_mask, output_attentions)
            if cp is not None:
                cross.append(cp)
        return x, tuple(cross)


@register_projector("qformer")
class QFormerProjector(SlideProjector):
    """K learned queries (BLIP-2 ``query_tokens``) -> Q-Former -> ``language_projection`` to the LLM's hidden size.

    Output tokens per slide: the C concept tokens (if any), then the K query tokens. Relevance: the cross-attention
    over the slide encoder's tokens, averaged over layers and heads, weighted over the queries (uniformly, or by
    ``token_weights``: a concept token's weight is shared evenly by the K queries it is read from).
    """

    def __init__(self, config: QFormerConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, config.hidden_size) * 0.02)
        self.qformer = QFormerModel(config)
        self.language_projection = nn.Linear(config.hidden_size, llm_hidden_size)
        self._init_weights()
        query_read = [c for c in config.concepts if not c.get("read")]
        self.concept_norm = nn.LayerNorm(config.num_query_tokens * config.hidden_size) if query_read else None
        self.concept_heads = nn.ModuleDict({
            c["name"]: nn.Linear(config.num_query_tokens * config.hidden_size, len(c["words"])) for c in query_read})
        self.patch_readout = (PatchClassReadout(config.encoder_hidden_size, config.patch_classes, config.concepts)
                              if patch_read_concepts(config.concepts) else None)

    def read_concepts_from_patches(self, patch_classes: Sequence[str], read: dict[str, dict]) -> PatchClassReadout:
        """Switch the concepts named in ``read`` (name -> ``{"read": ..., "class": ...}``) to the patch-class
        readout; their query heads are dropped. An existing readout of the same patch classes keeps its patch head
        and the concepts it already reads (a stage may add one concept to a trained readout); otherwise the readout
        is new and untrained. Updates ``self.config``."""
        unknown = set(read) - {c["name"] for c in self.config.concepts}
        if unknown:
            raise ConfigError(f"no concept named {sorted(unknown)}; concepts: {[c['name'] for c in self.config.concepts]}")
        concepts = [{**c, **read[c["name"]]} if c["name"] in read else c for c in self.config.concepts]
        readout = PatchClassReadout(self.config.encoder_hidden_size, patch_classes, concepts)
        old = self.patch_readout
        if old is not None and old.patch_classes == list(patch_classes):
            kept = {k: v for k, v in old.state_dict().items() if k.split(".")[1] not in read or k.startswith("head.")}
            readout.load_state_dict(kept, strict=False)
        self.config.concepts, self.config.patch_classes = concepts, list(patch_classes)
        for name in read:
            if name in self.concept_heads:
                del self.concept_heads[name]
        if not len(self.concept_heads):
            self.concept_norm = None
        self.patch_readout = readout.to(self.query_tokens.device)
        return self.patch_readout

    @classmethod
    def from_config(cls, config, llm_hidden_size: int) -> "QFormerProjector":
        return cls(config.qformer, llm_hidden_size)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_query_tokens + len(self.config.concepts)

    def attach_llm(self, tokenizer, input_embeddings: torch.Tensor) -> None:
        if self.config.concepts:
            self.set_concept_vocabulary(tokenizer, input_embeddings)

    def set_concept_vocabulary(self, tokenizer, input_embeddings: torch.Tensor) -> None:
        """Look up each concept word's embedding (first non-blank token of " word") in the LLM's input embeddings."""
        for c in self.config.concepts:
            ids = [concept_token_id(tokenizer, w) for w in c["words"]]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"concept {c['name']!r}: words {c['words']} do not start with distinct tokens")
            self.register_buffer(f"concept_words_{c['name']}", input_embeddings[ids].detach().clone(), persistent=False)

    def _init_weights(self) -> None:
        for m in self.qformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, encodings: Sequence, output_attentions: bool = False) -> ProjectorOutput:
        """Project a batch of ``SlideEncoderOutput``s (all levels of each slide are the Q-Former's memory)."""
        memory, mask = pad_and_stack([e.tokens() for e in encodings])
        patch_tokens = [e.patch_tokens for e in encodings] if self.patch_readout is not None else None
        grids = [e.patch_grid for e in encodings] if self.patch_readout is not None else None
        return self.project_memory(memory, mask, output_attentions, patch_tokens, grids)

    def project_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                       output_attentions: bool = False,
                       patch_tokens: Sequence[torch.Tensor] | None = None,
                       patch_grids: Sequence[torch.Tensor] | None = None) -> ProjectorOutput:
        """``memory`` [B, L, H_enc] (all slide-encoder levels, padded), ``memory_mask`` bool [B, L];
        ``patch_tokens`` (each slide's [N_i, H_enc]) are needed when concepts are read from patch classes, and
        ``patch_grids`` (each [N_i, 2]) when one is read from where they lie (``patch_focus``)."""
        b = memory.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        hidden, cross = self.qformer(queries, memory, memory_mask, output_attentions)
        tokens = self.language_projection(hidden)
        logits = None
        if self.config.concepts:
            vocab = {c["name"]: getattr(self, f"concept_words_{c['name']}", None) for c in self.config.concepts}
            if any(v is None for v in vocab.values()):
                raise ConfigError("concept tokens need set_concept_vocabulary(tokenizer, embeddings) first")
            logits = {}
            if self.concept_heads:
                pooled = self.concept_norm(hidden.flatten(1))
                logits = {name: head(pooled) for name, head in self.concept_heads.items()}
            if self.patch_readout is not None:
                if patch_tokens is None:
                    raise ConfigError("concepts read from patch classes need the slides' patch tokens")
                logits.update(self.patch_readout(patch_tokens, patch_grids))
            logits = {c["name"]: logits[c["name"]] for c in self.config.concepts}  # the concept order of the config
            words = [torch.softmax(lg.float(), dim=-1).to(tokens.dtype) @ vocab[name].to(tokens.dtype)
                     for name, lg in logits.items()]
            tokens = torch.cat([torch.stack(words, dim=1), tokens], dim=1)
        return ProjectorOutput(tokens=list(tokens.unbind(0)), cross_attentions=cross if output_attentions else None,
                               concept_logits=logits)

    def query_weights(self, token_weights: torch.Tensor) -> torch.Tensor:
        """K weights summing to 1 from weights over the C + K output tokens (concepts first)."""
        k = self.config.num_query_tokens
        c = token_weights.shape[0] - k
        w = token_weights[c:].float() + token_weights[:c].float().sum() / k
        return w / w.sum().clamp_min(1e-12)

    def patch_relevance(self, encodings: Sequence, output: ProjectorOutput,
                        token_weights: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if not output.cross_attentions:
            raise ConfigError("the Q-Former's relevance needs its cross-attention: project with output_attentions=True")
        maps = torch.stack(list(output.cross_attentions), 0).mean(dim=(0, 2))  # [B, K, L]: mean over layers, heads
        out = []
        for b, enc in enumerate(encodings):
            if token_weights is None:
                rel = maps[b].mean(dim=0)
            else:
                rel = self.query_weights(token_weights[b]).to(maps.device, maps.dtype) @ maps[b]
            length = enc.num_patches + enc.num_regions + int(enc.slide_tokens.shape[0])
            out.append(spread_to_patches(rel[:length], enc))
        return out


def concept_token_id(tokenizer, word: str) -> int:
    """Id of the first non-blank token of ``word`` as it is split inside running text (after a space)."""
    for i in tokenizer(" " + word, add_special_tokens=False).input_ids:
        if tokenizer.decode([i]).strip():
            return int(i)
    raise ConfigError(f"concept word {word!r} has no token")


def qformer_from_blip2_state_dict(projector: QFormerProjector, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a ``Blip2QFormerModel`` state dict into ``projector.qformer`` (strict; names are identical)."""
    projector.qformer.load_state_dict(state_dict, strict=True)


__all__ = ["QFormerProjector", "QFormerModel", "chunked_attention", "concept_token_id", "qformer_from_blip2_state_dict"]
