"""Constrained decoding for report fields: each answer is generated under its field's regular expression, so it
always parses into a valid value, whatever the model would have said unconstrained.

The grammar engine is xgrammar, chosen by measuring on CPU with the demo checkpoint's LLM (SmolLM2-135M, 49k
tokens; ``benchmarks/report_constrained.py``, shared 2-core machine): per-token mask cost is alike and negligible
(xgrammar ~0.4-0.5 ms, lm-format-enforcer ~0.4-0.5 ms, against ~220-250 ms for one LLM step there), so setup
decides: xgrammar builds its tokenizer view in ~0.3-0.4 s and compiles the SynthSlide fields' patterns in ~5 ms;
lm-format-enforcer takes ~2.7 s and ~0.26 s (and its transformers integration does not import on transformers 5);
outlines-core has no offline way to read a local tokenizer's vocabulary (a hand-built byte vocabulary rejected a
valid token path). The bitmask is applied to the logits through ``Conversation.ask(logits_processor=...)``,
so a field is decoded by the conversation's own loop with its key/value reuse.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from slidechat.errors import DependencyError

_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INFO_LOCK = threading.Lock()


def _xgr():
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DependencyError("schema reports need the xgrammar package (pip install xgrammar)") from exc
    return xgrammar


class FieldGrammars:
    """Compiled answer patterns for one tokenizer (the tokenizer view is built once per processor)."""

    def __init__(self, processor, vocab_size: int) -> None:
        xgr = _xgr()
        self.stops = sorted(processor.stop_token_ids())
        with _INFO_LOCK:
            key = processor
            entry = _INFO.get(key)
            if entry is None or entry[0] != vocab_size:
                info = xgr.TokenizerInfo.from_huggingface(processor.tokenizer, vocab_size=vocab_size,
                                                          stop_token_ids=self.stops)
                entry = (vocab_size, info, xgr.GrammarCompiler(info, max_threads=1))
                _INFO[key] = entry
        self.vocab_size, self.info, self.compiler = entry

    @functools.lru_cache(maxsize=256)
    def compiled(self, pattern: str):
        return self.compiler.compile_regex(pattern)

    def matcher(self, pattern: str):
        return _xgr().GrammarMatcher(self.compiled(pattern))


def grammars_for(model) -> FieldGrammars:
    vocab_size = int(model.llm.get_input_embeddings().weight.shape[0])
    cached = getattr(model, "_field_grammars", None)
    if cached is None or cached.vocab_size != vocab_size:
        cached = FieldGrammars(model.processor, vocab_size)
        try:
            model._field_grammars = cached
        except AttributeError:  # pragma: no cover
            pass
    return cached


class GrammarLogitsProcessor:
    """A ``Conversation.ask(logits_processor=...)`` that allows only the tokens that keep the answer inside
    ``pattern`` (stop tokens only where the answer is complete)."""

    def __init__(self, grammars: FieldGrammars, pattern: str) -> None:
        self._xgr = _xgr()
        self.matcher = grammars.matcher(pattern)
        self.vocab_size = grammars.vocab_size
        self.bitmask = self._xgr.allocate_token_bitmask(1, grammars.vocab_size)
        self.accepted = 0

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for tok in generated[self.accepted:]:
            if not self.matcher.accept_token(tok):  # cannot happen for tokens this mask allowed
                return torch.full_like(logits, float("-inf"))
        self.accepted = len(generated)
        if self.matcher.is_terminated():
            return torch.full_like(logits, float("-inf"))
        row = logits.detach().float().cpu()[None, : self.vocab_size].clone()
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(row, self.bitmask)
        out = torch.full(logits.shape, float("-inf"), dtype=row.dtype)
        out[: self.vocab_size] = row[0]
        return out.to(logits.device)


def constrained_answer(conv, question: str, pattern: str, max_new_tokens: int,
                       grammars: FieldGrammars | None = None) -> str:
    """Ask ``question`` in ``conv`` (greedy) with the answer kept inside ``pattern``; it joins ``conv.messages``."""
    processor = GrammarLogitsProcessor(grammars or grammars_for(conv.model), pattern)
    return conv.ask(question, max_new_tokens=max_new_tokens, logits_processor=processor)


def token_budget(field) -> int:
    """Tokens enough for the longest answer a field's pattern allows, however it is spelled: a model may build a
    value from single-byte tokens (an untrained one does), so one token per byte, plus the stop token."""
    return field.max_answer_bytes() + 1


__all__ = ["FieldGrammars", "grammars_for", "constrained_answer", "token_budget"]
