"""The training forward pass: the assistant's own forward, or a cheaper equivalent on one process.

``fast_forward`` computes exactly the loss of ``assistant(input_ids, attention_mask, labels, slide_features,
slide_coords)`` (mean cross-entropy over assistant tokens) but projects only the positions that carry a label
through the LM head: with a 49k vocabulary the full-sequence logits are ~20% of a small LLM's FLOPs and most
positions (system prompt, question, slide tokens) have no label. It optionally adds the grounding loss
(``training.grounding``). It calls the LLM's decoder directly, so under DDP/DeepSpeed/FSDP (several processes)
the loop uses the wrapped model's forward instead (gradient sync hooks live there).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F

from slidechat.model import IGNORE_INDEX
from slidechat.model.assistant import flatten_cases, group_by_case
from slidechat.model.llm import base_model
from slidechat.training.grounding import grounding_loss, has_own_relevance


def _decoder_and_head(llm):
    base = base_model(llm)
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None, None
    return decoder, head


def fast_forward(model, batch: dict, grounding_weight: float = 0.0, grounding_target: float = 0.5):
    """Loss of one batch (``.loss``; ``.lm_loss`` and ``.grounding_loss`` detached for logging)."""
    want_attn = grounding_weight > 0 and has_own_relevance(model) and batch.get("patch_targets")
    counts, feats, coords, targets = flatten_cases(batch["slide_features"], batch["slide_coords"],
                                                   batch.get("patch_targets"))
    encodings, proj = model.encode_features(feats, coords, output_attentions=bool(want_attn))
    embeds, mask, labels = model.build_inputs_embeds(batch["input_ids"], group_by_case(proj.tokens, counts),
                                                     batch["attention_mask"], batch["labels"])
    decoder, head = _decoder_and_head(model.llm)
    if decoder is None:
        lm_loss = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    else:
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = head(hidden[:, :-1][keep])
        lm_loss = F.cross_entropy(logits.float(), target[keep])
    loss = lm_loss
    g = None
    if want_attn and proj.cross_attentions:
        g = grounding_loss(model.projector.patch_relevance(encodings, proj), targets, grounding_target)
        if g is not None:
            loss = loss + grounding_weight * g
    return SimpleNamespace(loss=loss, lm_loss=lm_loss.detach(), grounding_loss=None if g is None else g.detach())
