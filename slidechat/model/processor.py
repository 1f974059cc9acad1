"""SlideChatProcessor: the text side of the model (tokenizer, chat template, slide placeholder), LlavaProcessor style.

The LLM's own chat template is used as is. The first user turn carries a ``<slide>`` placeholder (``<image>`` is
accepted too); after tokenisation it is a single id ``SLIDE_TOKEN_ID`` (-200, the LLaVA convention) that the model
replaces by the slide's projected tokens. No token is added to the LLM's vocabulary, so a frozen LLM stays
untouched. A case of several slides puts one marked placeholder per slide in that turn (``prompts.case_header``).
Training uses ``tokenize_conversation`` (labels masked with ``IGNORE_INDEX``); inference uses
``prompt_ids`` (placeholder expanded to one id per slide token) and ``stop_token_ids``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from slidechat import prompts
from slidechat.errors import ConfigError, DataError

SLIDE_TOKEN_ID = -200
IGNORE_INDEX = -100
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                "model": "assistant", "bot": "assistant"}
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>")


def normalise_messages(messages: Sequence[dict[str, Any]], with_slide: bool = True, num_slides: int = 1,
                       slide_labels: Sequence[str | None] | None = None) -> list[dict[str, str]]:
    """Accept ``{"role","content"}`` or LLaVA ``{"from","value"}`` turns; the first user turn carries the slides'
    placeholders and every other turn none.

    One slide: one ``<slide>`` (inserted at the start when missing). A case of ``num_slides`` slides: the turn's
    placeholders are kept when there are exactly ``num_slides`` of them (the data placed them), otherwise they are
    replaced by ``prompts.case_header`` (one marked line per slide, ``slide_labels`` naming them) at the turn's start.
    """
    if num_slides < 1:
        raise DataError(f"a conversation needs at least one slide, got {num_slides}")
    out: list[dict[str, str]] = []
    seen_slide = False
    for m in messages:
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise DataError(f"a conversation turn needs a role (user/assistant/system or human/gpt) and text, got {m!r}")
        role = ROLE_ALIASES[role]
        content = prompts.normalise_placeholder(content)
        if role == "user" and not seen_slide and with_slide:
            content = _place_slides(content, num_slides, slide_labels)
            seen_slide = True
        elif prompts.SLIDE_PLACEHOLDER in content:
            content = content.replace(prompts.SLIDE_PLACEHOLDER, "").strip()
        out.append({"role": role, "content": content})
    return out


def _place_slides(content: str, num_slides: int, slide_labels) -> str:
    found = content.count(prompts.SLIDE_PLACEHOLDER)
    if num_slides == 1:
        if not found:
            return prompts.SLIDE_PLACEHOLDER + "\n" + content
        head, _, tail = content.partition(prompts.SLIDE_PLACEHOLDER)
        return head + prompts.SLIDE_PLACEHOLDER + tail.replace(prompts.SLIDE_PLACEHOLDER, "")
    if found == num_slides:
        return content
    text = content.replace(prompts.SLIDE_PLACEHOLDER, "").strip()
    return prompts.case_header(num_slides, slide_labels) + "\n" + text


def slide_token_counts(num_slide_tokens: int | Sequence[int]) -> list[int]:
    """Tokens per slide as a list (an int means one slide)."""
    counts = [int(num_slide_tokens)] if isinstance(num_slide_tokens, int) else [int(n) for n in num_slide_tokens]
    if not counts or min(counts) < 1:
        raise DataError(f"every slide needs at least one token, got {counts}")
    return counts


class SlideChatProcessor:
    """Tokenizer + chat template + slide placeholder handling for one LLM."""

    def __init__(self, tokenizer, system_prompt: str | None = None, generation_config=None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = prompts.SYSTEM_PROMPT if system_prompt is None else system_prompt
        self._stop_sources = (generation_config, tokenizer)
        self._stop_ids: frozenset[int] | None = None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to ``messages`` (with the system prompt) as a string."""
        msgs = list(messages)
        if self.system_prompt and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_text(self, text: str) -> list[int]:
        """Tokenise ``text`` with the placeholder becoming ``SLIDE_TOKEN_ID`` (no special tokens added)."""
        ids: list[int] = []
        for i, part in enumerate(text.split(prompts.SLIDE_PLACEHOLDER)):
            if i:
                ids.append(SLIDE_TOKEN_ID)
            if part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, messages: Sequence[dict[str, Any]], num_slide_tokens: int | Sequence[int],
                   slide_labels: Sequence[str | None] | None = None) -> list[int]:
        """Ids of the chat-templated ``messages`` + generation prompt, the i-th slide placeholder expanded to
        ``num_slide_tokens[i]`` copies of ``SLIDE_TOKEN_ID`` (an int: one slide). The j-th ``SLIDE_TOKEN_ID`` of the
        result stands for row j of the slides' projected tokens concatenated in order."""
        counts = slide_token_counts(num_slide_tokens)
        ids = self.encode_text(self.render(normalise_messages(messages, num_slides=len(counts),
                                                              slide_labels=slide_labels),
                                           add_generation_prompt=True))
        out: list[int] = []
        slots = iter(counts)
        for t in ids:
            out.extend([SLIDE_TOKEN_ID] * next(slots) if t == SLIDE_TOKEN_ID else [t])
        return out

    def tokenize_conversation(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                              with_slide: bool = True, num_slides: int = 1,
                              slide_labels: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """Chat-template a conversation into ``input_ids`` (1-D, one ``SLIDE_TOKEN_ID`` per slide) and ``labels``
        (``IGNORE_INDEX`` everywhere except the assistant turns' tokens, their end-of-turn token included)."""
        msgs = normalise_messages(messages, with_slide=with_slide, num_slides=num_slides,
                                  slide_labels=slide_labels)
        full = self.render(msgs, add_generation_prompt=add_generation_prompt)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self.render(msgs[:i], add_generation_prompt=True))
            end_text = self.render(msgs[: i + 1])
            if not full.startswith(end_text) or not end_text.startswith(full[:start]):
                raise ConfigError("this LLM's chat template is not prefix-stable across turns; cannot mask labels")
            spans.append((start, len(end_text)))
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for start, end in spans + [(len(full), len(full))]:
            prompt_ids = self.encode_text(full[pos:start])
            answer_ids = self.encode_text(full[start:end])
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            pos = end
        labels = [IGNORE_INDEX if t == SLIDE_TOKEN_ID else t for t in labels]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}

    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end an assistant turn (eos of the tokenizer and generation config, template end tokens)."""
        if self._stop_ids is None:
            ids: set[int] = set()
            for source in self._stop_sources:
                eos = getattr(source, "eos_token_id", None)
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
            vocab = self.tokenizer.get_vocab()
            ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
            self._stop_ids = frozenset(ids)
        return self._stop_ids


__all__ = ["SlideChatProcessor", "normalise_messages", "slide_token_counts", "SLIDE_TOKEN_ID", "IGNORE_INDEX", "ROLE_ALIASES"]
