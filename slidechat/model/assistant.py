"""SlideAssistant: hierarchical slide encoder -> projector (registered by name) -> any Hugging Face causal LM.

The text side (tokenizer, chat template, the ``<slide>`` placeholder that becomes ``SLIDE_TOKEN_ID``) is the
model's ``processor`` (``slidechat.model.processor.SlideChatProcessor``); ``build_inputs_embeds`` replaces each
``SLIDE_TOKEN_ID`` by the slide's projected tokens (a case of several slides: one placeholder per slide, filled in
order; with ``case_slide_embeddings`` each slide of a case gets its position's learned vector added). No token
is added to the LLM's vocabulary, so a frozen LLM stays untouched. Inference (encoding slide files, conversations,
heatmaps, reports) lives in ``slidechat.inference`` and uses this class; this class knows nothing about it.

Training: ``processor.tokenize_conversation(messages)`` and ``forward(input_ids, attention_mask, labels,
slide_features, slide_coords)`` returning the LLM output with ``.loss``.

Checkpoint folder (``save_pretrained`` / ``from_pretrained``)::

    config.json                 SlideAssistantConfig (the LLM referenced by alias / path / hub id)
    model.safetensors           slide_encoder.* + projector.* (+ case_slide_embedding.weight when configured)
    patch_encoder.safetensors   the patch encoder's weights, when it has some (optional)
    feature_stats.*             statistics of the training features, for the out-of-distribution warning (optional)
    adapter/                    peft LoRA adapter (mode "lora")
    llm/                        the full LLM + tokenizer (mode "full" only)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slidechat.errors import CheckpointError, ConfigError, DataError, SlideChatError
from slidechat.model import linear_projector, qformer  # noqa: F401  (the built-in projectors register on import)
from slidechat.model.config import SlideAssistantConfig
from slidechat.model.llm import load_llm
from slidechat.model.processor import IGNORE_INDEX, SLIDE_TOKEN_ID, SlideChatProcessor, normalise_messages
from slidechat.model.projector import ProjectorOutput, SlideProjector, create_projector
from slidechat.model.slide_encoder import HierarchicalSlideEncoder, SlideEncoderOutput, pad_and_stack
from slidechat.utils.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PATCH_ENCODER_WEIGHTS_NAME = "patch_encoder.safetensors"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def flatten_cases(slide_features: Sequence, *per_slide: Sequence | None) -> tuple:
    """``(counts, flat features, flat others...)`` from per-conversation slides (a tensor, or a list for a case);
    ``per_slide`` (coords, targets, ...) are nested like the features (``None`` stays ``None``)."""
    single = [not isinstance(f, (list, tuple)) for f in slide_features]

    def flat(rows):
        return [t for r, one in zip(rows, single) for t in ([r] if one else r)]

    counts = [1 if one else len(f) for f, one in zip(slide_features, single)]
    return (counts, flat(slide_features), *(None if o is None else flat(o) for o in per_slide))


def group_by_case(tokens: Sequence[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor | list[torch.Tensor]]:
    """Per-slide projected tokens regrouped per conversation: ``counts[b]`` slides for row b (1 -> the tensor)."""
    if sum(counts) != len(tokens):
        raise DataError(f"{len(tokens)} projected slides for conversations holding {sum(counts)}")
    out: list[torch.Tensor | list[torch.Tensor]] = []
    i = 0
    for n in counts:
        out.append(tokens[i] if n == 1 else list(tokens[i:i + n]))
        i += n
    return out


class SlideAssistant(nn.Module):
    """The whole model. Build with ``SlideAssistant(config)`` (loads the LLM) or ``from_pretrained(dir)``."""

    def __init__(self, config: SlideAssistantConfig, device: str | torch.device | None = None,
                 llm: nn.Module | None = None, tokenizer=None, adapter_dir: Path | None = None,
                 base_dir: Path | None = None) -> None:
        super().__init__()
        self.config = config
        device = torch.device(device or default_device())
        if llm is None:
            llm, tokenizer = load_llm(config.llm, device=device, base_dir=base_dir, adapter_dir=adapter_dir)
        if tokenizer is None:
            raise ConfigError("a tokenizer is required when an LLM object is passed in")
        self.llm = llm
        self.tokenizer = tokenizer
        self.processor = SlideChatProcessor(tokenizer, config.system_prompt, getattr(llm, "generation_config", None))
        embeddings = self.llm.get_input_embeddings().weight
        self.slide_encoder = HierarchicalSlideEncoder(config.encoder)
        self.projector: SlideProjector = create_projector(config.projector, config, int(embeddings.shape[1]))
        self.projector.attach_llm(tokenizer, embeddings)
        self.case_slide_embedding: nn.Embedding | None = None
        if config.case_slide_embeddings:
            self.add_case_slide_embeddings(config.case_slide_embeddings)
        self.slide_encoder.to(device)
        self.projector.to(device)
        self.checkpoint_dir: Path | None = base_dir  # where patch encoder weights etc. are resolved from

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.slide_encoder.patch_proj.weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def num_slide_tokens(self) -> int | None:
        """Tokens per slide in the LLM (concept + query tokens for the Q-Former); None when it varies with the slide."""
        return self.projector.num_output_tokens

    # ------------------------------------------------------------------ slide side
    def encode_features(self, slide_features: Sequence[torch.Tensor], slide_coords: Sequence[torch.Tensor | None] | None = None,
                        patch_sizes_level0: Sequence[float | None] | None = None, output_attentions: bool = False
                        ) -> tuple[list[SlideEncoderOutput], ProjectorOutput]:
        """Slide encoder + projector for a batch of slides. Returns the encodings and the projected tokens."""
        n = len(slide_features)
        coords = list(slide_coords) if slide_coords is not None else [None] * n
        sizes = list(patch_sizes_level0) if patch_sizes_level0 is not None else [None] * n
        encodings = []
        for f, c, ps in zip(slide_features, coords, sizes):
            f = torch.as_tensor(f).to(self.device)
            c = None if c is None else torch.as_tensor(c)
            encodings.append(self.slide_encoder(f, c, ps))
        proj = self.projector(encodings, output_attentions=output_attentions)
        proj.tokens = [t.to(self.llm_dtype) for t in proj.tokens]
        return encodings, proj

    def add_case_slide_embeddings(self, n: int) -> nn.Embedding:
        """Give slide positions 1..``n`` of a case a learned vector (zero to start: the model answers as before
        until it is trained). Updates ``self.config``."""
        if n < 1:
            raise ConfigError(f"case_slide_embeddings must be >= 1 to add them, got {n}")
        hidden = int(self.llm.get_input_embeddings().weight.shape[1])
        self.case_slide_embedding = nn.Embedding(n, hidden, device=self.device)
        nn.init.zeros_(self.case_slide_embedding.weight)
        self.config.case_slide_embeddings = n
        return self.case_slide_embedding

    def mark_case_slides(self, slide_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A case's per-slide tokens with each slide's position vector added (slides beyond the table and single
        slides are left as they are)."""
        tokens = list(slide_tokens)
        table = self.case_slide_embedding
        if table is None or len(tokens) < 2:
            return tokens
        return [t + table.weight[i].to(t.device, t.dtype) if i < table.num_embeddings else t
                for i, t in enumerate(tokens)]

    # ------------------------------------------------------------------ text side
    def tokenize_conversation(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                              with_slide: bool = True, num_slides: int = 1,
                              slide_labels: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """``processor.tokenize_conversation`` (the training data's hook)."""
        return self.processor.tokenize_conversation(messages, add_generation_prompt, with_slide, num_slides,
                                                    slide_labels)

    def build_inputs_embeds(self, input_ids: torch.Tensor, slide_tokens: Sequence[torch.Tensor | Sequence[torch.Tensor]],
                            attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace the i-th ``SLIDE_TOKEN_ID`` of each row with its i-th slide's tokens; right-pad.

        ``slide_tokens[b]`` is row b's slide tokens ([T, H]) or, for a case, a list of them in placeholder order
        (see ``group_by_case``). Returns (embeds, mask, labels)."""
        embed = self.llm.get_input_embeddings()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows_e, rows_m, rows_l = [], [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            tok_emb = embed(ids.clamp_min(0).to(embed.weight.device))
            where = (ids == SLIDE_TOKEN_ID).nonzero().flatten().tolist()
            m, lab = attention_mask[b].to(tok_emb.device), None if labels is None else labels[b].to(tok_emb.device)
            if where:
                row = slide_tokens[b]
                row = [row] if isinstance(row, torch.Tensor) else list(row)
                if len(row) != len(where):
                    raise DataError(f"a conversation holds {len(where)} <slide> placeholders but {len(row)} slides")
                row = self.mark_case_slides(row)
                parts_e, parts_m, parts_l, prev = [], [], [], 0
                for p, st in zip(where, row):
                    st = st.to(tok_emb.dtype)
                    parts_e += [tok_emb[prev:p], st]
                    parts_m += [m[prev:p], m.new_ones(st.shape[0])]
                    if lab is not None:
                        parts_l += [lab[prev:p], lab.new_full((st.shape[0],), IGNORE_INDEX)]
                    prev = p + 1
                tok_emb = torch.cat(parts_e + [tok_emb[prev:]], dim=0)
                m = torch.cat(parts_m + [m[prev:]])
                if lab is not None:
                    lab = torch.cat(parts_l + [lab[prev:]])
            rows_e.append(tok_emb)
            rows_m.append(m)
            rows_l.append(lab)
        embeds, valid = pad_and_stack(rows_e)
        mask, _ = pad_and_stack(rows_m)
        mask = mask * valid
        out_labels = None
        if labels is not None:
            out_labels, _ = pad_and_stack(rows_l)
            out_labels = out_labels.masked_fill(~valid, IGNORE_INDEX)
        return embeds, mask.long(), out_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, slide_features: Sequence[torch.Tensor] | None = None,
                slide_coords: Sequence[torch.Tensor | None] | None = None, **llm_kwargs):
        """Training/eval forward: the LLM output (``.loss`` when labels are given, ``.logits``).

        ``slide_features[b]`` is row b's slide ([N, D]) or its case's slides (a list); ``slide_coords`` alike."""
        if slide_features is None:
            if (input_ids == SLIDE_TOKEN_ID).any():
                raise DataError("input_ids hold a <slide> placeholder but no slide_features were given")
            slide_tokens: list[torch.Tensor] = []
        else:
            if len(slide_features) != input_ids.shape[0]:
                raise DataError(f"{len(slide_features)} slides for a batch of {input_ids.shape[0]} conversations")
            counts, flat_f, flat_c = flatten_cases(slide_features, slide_coords)
            _, proj = self.encode_features(flat_f, flat_c)
            slide_tokens = group_by_case(proj.tokens, counts)
        embeds, mask, labels = self.build_inputs_embeds(input_ids, slide_tokens, attention_mask, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, **llm_kwargs)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Slide encoder + projector weights (what ``model.safetensors`` holds)."""
        sd = {f"slide_encoder.{k}": v for k, v in self.slide_encoder.state_dict().items()}
        sd.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        if self.case_slide_embedding is not None:
            sd["case_slide_embedding.weight"] = self.case_slide_embedding.weight
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    def patch_encoder_weights_path(self) -> Path | None:
        ref = self.config.patch_encoder
        if ref is None or not ref.weights:
            return None
        p = Path(ref.weights)
        if not p.is_absolute() and self.checkpoint_dir is not None:
            p = self.checkpoint_dir / p
        return p

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Write the checkpoint folder (see module docstring). Returns its path."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        cfg = SlideAssistantConfig.from_dict(json.loads(json.dumps(self.config.to_dict())))
        with atomic_path(save_dir / WEIGHTS_NAME) as tmp:
            save_file(self.trainable_state_dict(), str(tmp), metadata={"format": "pt", "slidechat": "1"})
        src = self.patch_encoder_weights_path()
        if src is not None:
            if not src.exists():
                raise CheckpointError(f"patch encoder weights {src} are missing; cannot save the checkpoint")
            dst = save_dir / PATCH_ENCODER_WEIGHTS_NAME
            if src.resolve() != dst.resolve():
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
            cfg.patch_encoder.weights = PATCH_ENCODER_WEIGHTS_NAME
        if self.config.llm.mode == "lora":
            self.llm.save_pretrained(str(save_dir / "adapter"))
        elif self.config.llm.mode == "full":
            self.llm.save_pretrained(str(save_dir / "llm"))
            self.tokenizer.save_pretrained(str(save_dir / "llm"))
            cfg.llm.name_or_path = "llm"
        write_json_atomic(save_dir / CONFIG_NAME, cfg.to_dict())
        self._copy_feature_stats(save_dir)
        return save_dir

    def _copy_feature_stats(self, save_dir: Path) -> None:
        """Carry the training-feature statistics (the OOD warning's reference) into a re-saved checkpoint."""
        from slidechat.model.feature_stats import STATS_ARRAYS, STATS_META

        src = self.checkpoint_dir
        if src is None or not all((src / n).is_file() for n in (STATS_ARRAYS, STATS_META)):
            return
        for name in (STATS_ARRAYS, STATS_META):
            if (src / name).resolve() != (save_dir / name).resolve():
                with atomic_path(save_dir / name) as tmp:
                    shutil.copyfile(src / name, tmp)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str | torch.device | None = None,
                        llm_overrides: dict[str, Any] | None = None, llm: nn.Module | None = None,
                        tokenizer=None) -> "SlideAssistant":
        """Load a checkpoint folder. Raises ``CheckpointError`` when it is missing, corrupt or does not match.

        ``llm_overrides`` changes LLM config fields (e.g. ``{"mode": "lora"}`` to start stage 2 from a stage-1
        checkpoint, or ``{"name_or_path": ...}`` to point at a moved LLM folder).
        """
        d = Path(checkpoint_dir).expanduser()
        cfg_path = d / CONFIG_NAME
        if not d.is_dir() or not cfg_path.is_file():
            raise CheckpointError(f"{d} is not a slidechat checkpoint folder (no {CONFIG_NAME}); "
                                  "give the folder written by save_pretrained or `slidechat train`")
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            if llm_overrides:
                raw.setdefault("llm", {}).update(llm_overrides)
            config = SlideAssistantConfig.from_dict(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, SlideChatError) as exc:
            raise CheckpointError(f"{cfg_path} is not a valid slidechat config: {exc}") from exc
        weights = d / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{d} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from exc
        adapter_dir = d / "adapter"
        if config.llm.mode == "lora" and llm is None:
            adapter_dir = adapter_dir if (adapter_dir / "adapter_config.json").is_file() else None
            if adapter_dir is None and not llm_overrides:
                raise CheckpointError(f"{d}: the config says LoRA but adapter/ is missing or incomplete")
        model = cls(config, device=device, llm=llm, tokenizer=tokenizer, adapter_dir=adapter_dir, base_dir=d)
        model.load_trainable_state_dict(state, source=str(weights))
        return model.eval()  # like transformers' from_pretrained; call .train() to fine-tune

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load slide encoder + projector weights strictly; mismatches become a ``CheckpointError``."""
        enc = {k[len("slide_encoder."):]: v for k, v in state.items() if k.startswith("slide_encoder.")}
        proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        case = {k[len("case_slide_embedding."):]: v for k, v in state.items() if k.startswith("case_slide_embedding.")}
        other = [k for k in state if not k.startswith(("slide_encoder.", "projector.", "case_slide_embedding."))]
        try:
            if other:
                raise RuntimeError(f"unexpected keys {other[:5]}")
            if bool(case) != (self.case_slide_embedding is not None):
                raise RuntimeError(f"case_slide_embeddings is {self.config.case_slide_embeddings} in the config but "
                                   f"the weights {'hold' if case else 'lack'} case_slide_embedding.weight")
            self.slide_encoder.load_state_dict(enc, strict=True)
            self.projector.load_state_dict(proj, strict=True)
            if self.case_slide_embedding is not None:
                self.case_slide_embedding.load_state_dict(case, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source} does not match the model in config.json: {str(exc)[:500]}") from exc


__all__ = ["SlideAssistant", "default_device", "group_by_case", "flatten_cases", "normalise_messages", "SLIDE_TOKEN_ID", "IGNORE_INDEX", "WEIGHTS_NAME",
           "CONFIG_NAME", "PATCH_ENCODER_WEIGHTS_NAME"]
