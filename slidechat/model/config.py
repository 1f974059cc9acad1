"""Dataclass configs of the model: slide encoder, projector (Q-Former or linear), LLM, and the whole assistant.

All of them round-trip through plain dicts (``to_dict`` / ``from_dict``, the one loader of
``slidechat.utils.config``) so a checkpoint's ``config.json`` is readable and editable by hand. Unknown keys raise
``ConfigError`` naming the key (a typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slidechat.errors import ConfigError
from slidechat.utils.config import ConfigMixin, config_from_dict

CONFIG_FORMAT_VERSION = 1


@dataclass
class SlideEncoderConfig(ConfigMixin):
    """HierarchicalSlideEncoder: patch tokens -> region tokens (k x k windows) -> slide tokens.

    ``feature_dim`` is the patch encoder's output size (512 for CONCH / SlideChat CSVs, 1024 for UNI).
    """

    feature_dim: int = 512
    hidden_size: int = 256
    num_heads: int = 4
    region_size: int = 4  # k: patches per side of a region window on the patch grid
    region_layers: int = 1  # attention-pooling layers inside each window
    slide_layers: int = 2  # induced-set-attention layers over region tokens
    num_slide_tokens: int = 4  # learned [CLS]-style slide tokens
    layout_grid: int = 0  # G > 0: add a coarse G x G map of the tissue (over its bounding box) read by a small CNN
    layout_channels: int = 16  # feature channels per layout-map cell (plus one occupancy channel)
    num_layout_tokens: int = 4  # slide tokens made from the layout map (appended to the learned slide tokens)
    dropout: float = 0.0
    pos_max_period: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"encoder hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ConfigError("encoder hidden_size must be a multiple of 4 (2-D sinusoidal positions)")
        if self.region_size < 1 or self.num_slide_tokens < 1:
            raise ConfigError("region_size and num_slide_tokens must be >= 1")
        if self.layout_grid and (self.layout_grid < 4 or self.num_layout_tokens < 1 or self.layout_channels < 1):
            raise ConfigError("layout_grid must be 0 (off) or >= 4, with num_layout_tokens and layout_channels >= 1")

    @property
    def num_output_slide_tokens(self) -> int:
        """Slide tokens the encoder emits: the learned ones, then the layout-map ones."""
        return self.num_slide_tokens + (self.num_layout_tokens if self.layout_grid else 0)



@dataclass
class QFormerConfig(ConfigMixin):
    """BLIP-2 style Q-Former (post-LayerNorm BERT layers; same parameter names as ``Blip2QFormerModel``).

    ``encoder_hidden_size`` must equal the slide encoder's hidden size (set by ``SlideAssistantConfig``).
    ``key_chunk_size`` bounds the memory of cross-attention: keys are processed in chunks with
    log-sum-exp merging, so 100k keys never materialise a [K, N] matrix per head at once (unless maps are asked for).
    """

    num_query_tokens: int = 32
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 256
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    key_chunk_size: int = 16384
    # Concept tokens (optional): [{"name": "dominant", "words": ["fibrous stroma", "normal glands", ...]}, ...].
    # Each concept gets one extra LLM token = the softmax(head(queries))-weighted mix of its words' input embeddings
    # (first token of each word), placed before the K query tokens. Heads are trained on structured labels.
    concepts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Patch classes (optional): a small MLP on the slide encoder's patch tokens gives every patch these classes'
    # probabilities; a concept with ``read: patch_share`` / ``patch_presence`` / ``patch_bins`` is read from their
    # area-weighted sums, one with ``read: patch_focus`` from the shape of their areas on the patch grid
    # (``slidechat.model.patch_readout``), instead of from the queries.
    patch_classes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("qformer hidden_size must be divisible by num_attention_heads")
        if self.num_query_tokens < 1:
            raise ConfigError("num_query_tokens must be >= 1")
        for c in self.concepts:
            if not isinstance(c, dict) or not c.get("name") or len(c.get("words") or []) < 2:
                raise ConfigError(f"qformer concept {c!r}: needs a name and at least two words")
        from slidechat.model.patch_readout import check_patch_concepts

        check_patch_concepts(self.concepts, self.patch_classes)



@dataclass
class LinearProjectorConfig(ConfigMixin):
    """SlideChat-style baseline: every patch token goes through an MLP into the LLM (no compression).

    ``max_tokens`` caps the number of patch tokens per slide (SlideChat samples up to 38,400); 0 = no cap.
    """

    num_layers: int = 2  # 1 = linear, 2 = Linear-GELU-Linear (LLaVA-1.5 / SlideChat)
    max_tokens: int = 38400
    include_slide_tokens: bool = True



LLM_MODES = ("frozen", "lora", "full")
QUANTIZATIONS = (None, "4bit", "8bit")


@dataclass
class LLMConfig(ConfigMixin):
    """Which causal LM and how it is trained.

    ``name_or_path``: an alias (``smollm2-135m``, ``gemma3-270m``), a local HF folder, a hub id already in the
    local cache, or a ``.gguf`` file. GGUF sources are converted once to an HF folder under the cache dir.
    """

    name_or_path: str = "smollm2-135m"
    mode: str = "frozen"  # frozen | lora | full
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantization: str | None = None  # None | "4bit" | "8bit" (bitsandbytes, CUDA only)
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16 / float16
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.mode not in LLM_MODES:
            raise ConfigError(f"llm mode must be one of {LLM_MODES}, got {self.mode!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"llm quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization and self.mode == "full":
            raise ConfigError("a quantized LLM cannot be fully fine-tuned; use mode 'lora' (QLoRA) or 'frozen'")



@dataclass
class PatchEncoderRef(ConfigMixin):
    """The patch encoder used to extract features from a slide file (``slidechat.encoders.load_encoder``)."""

    name: str = "demo-cnn"
    weights: str | None = None  # file name inside the checkpoint folder, or an absolute path
    target_mpp: float = 0.5
    patch_size: int = 224



@dataclass
class SlideAssistantConfig(ConfigMixin):
    """The whole model. ``projector`` names a registered projector (``slidechat.model.projector``): "qformer"
    (default, section ``qformer``) or "linear" (the SlideChat-style baseline, section ``linear``)."""

    encoder: SlideEncoderConfig = field(default_factory=SlideEncoderConfig)
    projector: str = "qformer"
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    linear: LinearProjectorConfig = field(default_factory=LinearProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    patch_encoder: PatchEncoderRef | None = field(default_factory=PatchEncoderRef)
    system_prompt: str | None = None  # None = prompts.SYSTEM_PROMPT; "" = the LLM template's own default
    # N > 0: a learned vector per slide position 1..N, added to every token of that slide in a case of several
    # slides (single slides never get one), so the LLM can tell whose tokens it reads; 0 = none
    case_slide_embeddings: int = 0
    format_version: int = CONFIG_FORMAT_VERSION

    # written by earlier versions, no longer read (the placeholder is always prompts.SLIDE_PLACEHOLDER)
    REMOVED_OPTIONS = ("slide_placeholder",)

    def __post_init__(self) -> None:
        if not isinstance(self.projector, str) or not self.projector:
            raise ConfigError(f"projector must be the name of a registered projector, got {self.projector!r}")
        if not isinstance(self.case_slide_embeddings, int) or self.case_slide_embeddings < 0:
            raise ConfigError(f"case_slide_embeddings must be an integer >= 0, got {self.case_slide_embeddings!r}")
        # The Q-Former reads the slide encoder's tokens.
        self.qformer.encoder_hidden_size = self.encoder.hidden_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlideAssistantConfig":
        version = dict(data).get("format_version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise ConfigError(f"config format_version {version!r} is newer than this slidechat "
                              f"({CONFIG_FORMAT_VERSION}); upgrade slidechat")
        return config_from_dict(cls, data)
