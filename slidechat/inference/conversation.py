"""Multi-turn chat about one slide, or a case of several, with streaming and key/value reuse.

A case's slides each become their projected tokens behind a marker in the first turn (``prompts.case_header``);
everything below holds for them together (the LLM sees S x T slide tokens).

A ``Conversation`` keeps the LLM's past key/values (a transformers ``DynamicCache``) of every token already
processed: system prompt, slide tokens, earlier questions and answers. A new turn renders the whole conversation
with the chat template, finds the longest common prefix with what is already in the cache (cropping the cache if the
template re-tokenised an earlier answer differently), and feeds only the rest, so turn 2's time to first token
depends on the new question, not on the slide size or the history. ``kv_reuse=False`` recomputes everything
each turn (the reference the tests compare against).

Decoding is a small loop over ``llm(...)`` calls (greedy by default; temperature / top-p sampling optional); it
is a generator, so ``ask(..., stream=True)`` yields text pieces as tokens arrive and ``ask(...)`` joins them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from slidechat.errors import SlideChatError
from slidechat.inference.cache import InferenceCache, resolve
from slidechat.inference.case import Case, as_case
from slidechat.inference.encode import EncodedSlide, as_encoded_slide
from slidechat.inference.evidence import DEFAULT_K, EvidenceRegion, top_regions
from slidechat.inference.region import parse_region, region_slide
from slidechat.model.llm import cache_kwarg, crop_cache
from slidechat.model.processor import SLIDE_TOKEN_ID
from slidechat.model.projector import ProjectorOutput
from slidechat.model.slide_encoder import SlideEncoderOutput


@dataclass
class SlideState:
    """A slide after the slide encoder and projector: what every conversation about it reuses."""

    slide: EncodedSlide
    encoding: SlideEncoderOutput
    output: ProjectorOutput  # one slide; what the projector's patch_relevance reads (see ProjectorOutput.for_relevance)

    @property
    def tokens(self) -> torch.Tensor:
        """[T, H_llm] projected slide tokens."""
        return self.output.tokens[0]


def _weights_version(model) -> int:
    # in-place weight updates (optimizer steps, load_state_dict) bump tensor versions and invalidate the entry
    return sum(p._version for m in (model.slide_encoder, model.projector) for p in m.parameters())


@torch.no_grad()
def encode_state(model, enc_slide: EncodedSlide, keep: np.ndarray | None = None) -> SlideState:
    """Slide encoder + projector on ``enc_slide`` (or on the patches ``keep`` of it), with attention maps."""
    feats = enc_slide.features
    f, c = feats.features, feats.coords
    if keep is not None:
        f, c = f[keep], None if c is None else c[keep]
    f = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
    c = None if c is None else torch.from_numpy(np.asarray(c, dtype=np.int64))
    was_training = model.training
    if was_training:
        model.eval()
    try:
        encodings, proj = model.encode_features([f], [c], [enc_slide.patch_size_level0], output_attentions=True)
    finally:
        if was_training:
            model.train(True)
    return SlideState(slide=enc_slide, encoding=encodings[0], output=proj.for_relevance())


def prepare_slide(assistant, slide, cache: InferenceCache | None = None) -> SlideState:
    """Run the slide encoder + projector once for ``slide`` (kept in the inference cache by sha256)."""
    model, cache = resolve(assistant, cache)
    enc_slide = as_encoded_slide(model, slide, cache)
    key = (enc_slide.sha256, _weights_version(model))
    return cache.slide_state(key, lambda: encode_state(model, enc_slide))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.nonzero(x != y)[0]
    return int(diff[0]) if diff.size else n


class Conversation:
    """Chat about one slide or a case: ``ask``, ``heatmap``, ``evidence``, ``messages``, ``reset``.

    ``slide`` is one slide (an EncodedSlide, SlideFeatures, or a path), a list of them, or a ``Case``;
    ``assistant`` is a ``SlideChat`` or a bare ``SlideAssistant``; ``cache`` overrides the inference cache.
    Per-slide methods take ``slide=i`` (0-based, in case order).
    """

    def __init__(self, assistant, slide, kv_reuse: bool = True, max_new_tokens: int = 256,
                 cache: InferenceCache | None = None, labels=None) -> None:
        self.model, self.cache = resolve(assistant, cache)
        self.processor = self.model.processor
        self.case: Case = as_case(slide, labels)
        self.states = [prepare_slide(self.model, s, self.cache) for s in self.case.slides]
        self.state = self.states[0]
        self.slides = [st.slide for st in self.states]
        self.slide = self.slides[0]
        self._slide_tokens = (self.state.tokens if len(self.states) == 1
                              else torch.cat(self.model.mark_case_slides([st.tokens for st in self.states]), dim=0))
        self.kv_reuse = kv_reuse
        self.max_new_tokens = max_new_tokens
        self.messages: list[dict[str, str]] = []
        self._cache = None
        self._fed: list[int] = []  # the token ids whose key/values are in the cache (slide positions = -200)
        self._lock = threading.Lock()
        self._regions: dict[tuple[int, tuple[int, int, int, int]], Conversation] = {}
        # key/values of the prompt up to the end of the slide tokens, for attention maps (see heatmap)
        self.slide_prefix: tuple[tuple[int, ...], object] | None = None
        self.slide_prefix_lock = threading.Lock()
        self.slide_attention: tuple[tuple[int, ...], list[torch.Tensor]] | None = None  # (ids read, per slide)
        self.last_prefill_tokens = 0  # how many tokens the last turn's prefill fed (for benchmarks/tests)

    @property
    def num_slides(self) -> int:
        return len(self.states)

    def slide_index(self, slide: int | None) -> int:
        """``slide`` checked against the case (``None`` -> 0 for a single slide; required for a case)."""
        if slide is None:
            if self.num_slides > 1:
                raise SlideChatError(f"this case has {self.num_slides} slides; say which one (slide=0.."
                                     f"{self.num_slides - 1})")
            return 0
        if not isinstance(slide, int) or not 0 <= slide < self.num_slides:
            raise SlideChatError(f"slide must be 0..{self.num_slides - 1} for this case, got {slide!r}")
        return slide

    @property
    def assistant(self):
        return self.model

    # ------------------------------------------------------------------ public
    def reset(self) -> None:
        """Forget the conversation and its region conversations (the slide encoding is kept)."""
        self._regions = {}
        self.messages = []
        self._cache = None
        self._fed = []

    def ask(self, question: str, stream: bool = False, max_new_tokens: int | None = None,
            temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
            seed: int | None = None, region=None, slide: int | None = None,
            logits_processor=None) -> str | Iterator[str]:
        """Ask a question. Returns the answer, or an iterator of text pieces when ``stream=True``.

        Greedy decoding by default (``temperature=0``); the answer is appended to ``messages`` when it is complete
        (or when a stream is abandoned, with what was produced so far).

        ``region=(x, y, w, h)`` (level-0 pixels) answers from the patches inside that rectangle only (slide encoder
        + projector on that subset), in a conversation of its own per region (``region_conversation``): this
        conversation's messages and key/value cache are not touched. In a case, ``slide=i`` says whose region.

        ``logits_processor(generated_ids, logits) -> logits`` reshapes each step's next-token logits (constrained
        decoding); the turn ends when it leaves no token allowed (all ``-inf``).
        """
        if not isinstance(question, str) or not question.strip():
            raise SlideChatError("the question is empty; type a question about the slide")
        if region is not None:
            return self.region_conversation(region, slide).ask(question, stream, max_new_tokens, temperature, top_p,
                                                        repetition_penalty, seed, logits_processor=logits_processor)
        gen = self._generate(question, max_new_tokens or self.max_new_tokens, temperature, top_p,
                             repetition_penalty, seed, logits_processor)
        return gen if stream else "".join(gen)

    def heatmap(self, weighting: str = "uniform", slide: int | None = None):
        """Per-patch relevance in [0, 1] with level-0 coords of slide ``slide`` (see ``slidechat.inference.heatmap``)."""
        from slidechat.inference.heatmap import conversation_heatmap

        return conversation_heatmap(self, weighting=weighting, slide=self.slide_index(slide))

    def evidence(self, k: int = DEFAULT_K, weighting: str = "llm", slide: int | None = None) -> list[EvidenceRegion]:
        """The ``k`` most attended non-overlapping regions (level-0 boxes + scores) of the heatmap.

        In a case, ``slide=None`` ranks the regions of every slide together (each slide's scores weighted by the
        LLM's share of attention to that slide, ``weighting="llm"``); ``.slide`` says where each one is."""
        if self.num_slides == 1 or slide is not None:
            i = self.slide_index(slide)
            return [r.on_slide(i) for r in top_regions(self.heatmap(weighting=weighting, slide=i), k)]
        from slidechat.inference.heatmap import slide_attention_shares

        shares = slide_attention_shares(self) if weighting == "llm" else [1.0] * self.num_slides
        top = max(shares) or 1.0
        pool = [r.on_slide(i, weight=shares[i] / top) for i in range(self.num_slides)
                for r in top_regions(self.heatmap(weighting=weighting, slide=i), k)]
        pool.sort(key=lambda r: -r.score)
        return [r.ranked(n + 1) for n, r in enumerate(pool[:k])]

    def region_conversation(self, region, slide: int | None = None) -> "Conversation":
        """The conversation about the patches inside ``region`` of slide ``slide`` (created on first use, kept
        for follow-ups)."""
        i = self.slide_index(slide)
        key = (i, parse_region(region))
        with self._lock:
            conv = self._regions.get(key)
        if conv is None:
            conv = Conversation(self.model, region_slide(self.slides[i], key[1]), kv_reuse=self.kv_reuse,
                                max_new_tokens=self.max_new_tokens, cache=self.cache)
            with self._lock:
                conv = self._regions.setdefault(key, conv)
        return conv

    # ------------------------------------------------------------------ internals
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat-templated ``messages`` + generation prompt, each slide placeholder expanded to
        that slide's T ids."""
        counts = [int(st.tokens.shape[0]) for st in self.states]
        return self.processor.prompt_ids(messages, counts[0] if len(counts) == 1 else counts,
                                         slide_labels=self.case.labels)

    def attended_ids(self) -> list[int]:
        """The token ids the LLM has read so far; before the first question, the prompt of a slide-only turn."""
        fed = list(self._fed)
        return fed if SLIDE_TOKEN_ID in fed else self.prompt_ids([{"role": "user", "content": ""}])

    def slide_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """``(start, end)`` positions in ``ids`` of each slide's tokens."""
        positions = np.flatnonzero(np.asarray(ids) == SLIDE_TOKEN_ID)
        spans, at = [], 0
        for st in self.states:
            n = int(st.tokens.shape[0])
            if at + n > len(positions):
                raise SlideChatError("the prompt holds fewer slide tokens than the case's slides")
            spans.append((int(positions[at]), int(positions[at + n - 1]) + 1))
            at += n
        return spans

    def _embed(self, ids: list[int], offset: int, full: list[int]) -> torch.Tensor:
        """Input embeddings of ``full[offset:offset+len(ids)]`` (slide positions take the slide tokens)."""
        embed = self.model.llm.get_input_embeddings()
        t = torch.tensor(ids, dtype=torch.long, device=embed.weight.device)
        out = embed(t.clamp_min(0))
        slide_pos = (t == SLIDE_TOKEN_ID).nonzero().flatten()
        if slide_pos.numel():
            # the j-th slide id of ``full`` is row j of the slides' tokens concatenated
            before = int(np.count_nonzero(np.asarray(full[:offset], dtype=np.int64) == SLIDE_TOKEN_ID))
            idx = torch.arange(before, before + slide_pos.numel(), device=out.device)
            out[slide_pos] = self._slide_tokens.to(out.device, out.dtype)[idx]
        return out

    def _next_token(self, logits: torch.Tensor, generated: list[int], temperature: float, top_p: float,
                    repetition_penalty: float, gen: torch.Generator | None) -> int:
        logits = logits.float()
        if repetition_penalty != 1.0 and generated:
            prev = torch.tensor(sorted(set(generated)), device=logits.device)
            vals = logits[prev]
            logits[prev] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def _run(self, embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        llm = self.model.llm
        out = llm(inputs_embeds=embeds, input_ids=input_ids, use_cache=True, logits_to_keep=1,
                  **{cache_kwarg(llm): self._cache})
        self._cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[0, -1]

    @torch.no_grad()
    def _generate(self, question: str, max_new_tokens: int, temperature: float, top_p: float,
                  repetition_penalty: float, seed: int | None, logits_processor=None) -> Iterator[str]:
        a = self.model
        with self._lock:
            self.messages.append({"role": "user", "content": question})
            full = self.prompt_ids(self.messages)
            if not self.kv_reuse or self._cache is None:
                self._cache, self._fed = None, []
            common = min(_common_prefix(self._fed, full), len(full) - 1)
            if self._cache is not None and common < len(self._fed):
                if common > 0 and crop_cache(self._cache, len(self._fed) - common):
                    self._fed = self._fed[:common]
                else:
                    self._cache, self._fed, common = None, [], 0
            new = full[common:]
            self.last_prefill_tokens = len(new)
            was_training = a.training
            if was_training:  # (a full .eval()/.train() walk costs ~40 ms per turn; only switch when needed)
                a.eval()
            device = a.llm.get_input_embeddings().weight.device
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            stops = self.processor.stop_token_ids()
            generated: list[int] = []
            text = ""
            try:
                logits = self._run(embeds=self._embed(new, common, full)[None])
                self._fed = full
                while True:
                    if logits_processor is not None:
                        logits = logits_processor(list(generated), logits)
                        if not torch.isfinite(logits).any():
                            break
                    tok = self._next_token(logits, generated, temperature, top_p, repetition_penalty, gen)
                    if tok in stops:
                        break
                    generated.append(tok)
                    decoded = self.processor.decode(generated)
                    if not decoded.endswith("\ufffd") and len(decoded) > len(text):
                        piece, text = decoded[len(text):], decoded
                        yield piece
                    if len(generated) >= max_new_tokens:
                        break
                    logits = self._run(input_ids=torch.tensor([[tok]], device=device))
                    self._fed.append(tok)
                tail = self.processor.decode(generated)
                if len(tail) > len(text):
                    piece, text = tail[len(text):], tail
                    yield piece
            finally:
                self.messages.append({"role": "assistant", "content": text.strip()})
                if was_training:
                    a.train(True)


__all__ = ["Conversation", "SlideState", "prepare_slide", "Case"]
