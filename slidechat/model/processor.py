"""SlideChatProcessor: the text side of the model (tokenizer, chat template, slide placeholder), LlavaProcessor style.

The LLM's own chat template is used as is. The first user turn carries a ``<slide>`` placeholder (``<image>`` is
accepted too); after tokenisation it is a single id ``SLIDE_TOKEN_ID`` (-200, the LLaVA convention) that the model
replaces by the slide's projected tokens. No token is added to the LLM's vocabulary, so a frozen LLM stays
untouched. Training uses ``tokenize_conversation`` (labels masked with ``IGNORE_INDEX``); inference uses
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


def normalise_messages(messages: Sequence[dict[str, Any]], with_slide: bool = True) -> list[dict[str, str]]:
    """Accept ``{"role","content"}`` or LLaVA ``{"from","value"}`` turns; put one ``<slide>`` in the first user turn
    (inserted at its start if missing when ``with_slide``) and drop placeholders from every other turn."""
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
            if prompts.SLIDE_PLACEHOLDER not in content:
                content = prompts.SLIDE_PLACEHOLDER + "\n" + content
            head, _, tail = content.partition(prompts.SLIDE_PLACEHOLDER)
            content = head + prompts.SLIDE_PLACEHOLDER + tail.replace(prompts.SLIDE_PLACEHOLDER, "")
            seen_slide = True
        elif prompts.SLIDE_PLACEHOLDER in content:
            content = content.replace(prompts.SLIDE_PLACEHOLDER, "").strip()
        out.append({"role": role, "content": content})
    return out


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

    def prompt_ids(self, messages: Sequence[dict[str, Any]], num_slide_tokens: int) -> list[int]:
        """Ids of the chat-templated ``messages`` + generation prompt, the placeholder expanded to
        ``num_slide_tokens`` copies of ``SLIDE_TOKEN_ID`` (one per projected slide token)."""
        ids = self.encode_text(self.render(normalise_messages(messages), add_generation_prompt=True))
        if SLIDE_TOKEN_ID in ids:
            p = ids.index(SLIDE_TOKEN_ID)
            ids = ids[:p] + [SLIDE_TOKEN_ID] * num_slide_tokens + ids[p + 1 :]
        return ids

    def tokenize_conversation(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                              with_slide: bool = True) -> dict[str, torch.Tensor]:
        """Chat-template a conversation into ``input_ids`` (1-D, one ``SLIDE_TOKEN_ID`` for the slide) and ``labels``
        (``IGNORE_INDEX`` everywhere except the assistant turns' tokens, their end-of-turn token included)."""
        msgs = normalise_messages(messages, with_slide=with_slide)
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


__all__ = ["SlideChatProcessor", "normalise_messages", "SLIDE_TOKEN_ID", "IGNORE_INDEX", "ROLE_ALIASES"]
