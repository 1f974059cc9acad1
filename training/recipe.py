"""Training recipes: dataclass configs loaded from YAML.

A *stage recipe* trains one stage (0: contrastive, 1: alignment, 2: instruction tuning).
A *pipeline recipe* (``kind: pipeline``) prepares data from nothing (SynthSlide, demo CNN, feature
extraction) and then runs a list of stage recipes, each starting from the previous stage's checkpoint.
Loaded by the one config loader (``slidechat.utils.config``): unknown keys are errors naming the dotted key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slidechat.errors import ConfigError
from slidechat.utils.config import config_from_dict, config_to_dict
from slidechat.slide.config import ExtractionConfig
from slidechat.training.patch_cnn import PatchCNNTrainConfig
from slidechat.training.patch_readout import PatchReadoutConfig
from slidechat.training.slide_pretrain import SlidePretrainConfig
from slidechat.training.trainer import TrainerSettings


@dataclass
class DataSource:
    """One training file. ``kind``: ``instructions`` (LLaVA/SlideInstruction JSON list),
    ``captions`` (JSONL {slide_id, caption}), ``reports`` (JSONL {slide_id, report_text})."""

    path: str
    kind: str = "instructions"
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("instructions", "captions", "reports"):
            raise ConfigError(f"data source kind {self.kind!r}: use instructions, captions or reports")
        if self.repeat < 1:
            raise ConfigError("data source repeat must be >= 1")


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    features_dir: str | list[str] = ""  # a folder of feature files, or a list of folders (an earlier one wins)
    max_length: int = 1024          # tokens including the slide tokens
    max_patches: int | None = None  # random subset of patches per sample (None = all)
    multi_turn: bool = True         # False: split each conversation into single-turn samples
    require_image_tag: bool = True  # LLaVA rule: the first human turn must contain <image>
    grounding_dir: str | None = None  # <slide>.npy per-patch targets (rows of the features) for train.grounding_weight


@dataclass
class TrainConfig(TrainerSettings):
    """A stage's ``train`` section: the trainer's settings plus what the LLM stages train (the LLM's mode and LoRA
    settings are the model's own options: ``model.llm.mode`` / ``lora_r`` / ``lora_alpha`` / ... of LLMConfig)."""

    lr_llm: float | None = None             # separate LR for LoRA/LLM params (default: lr)
    gradient_checkpointing: bool = False
    fast_forward: bool = True               # LM head only on labelled positions (one process; same loss)
    train_modules: list[str] = field(default_factory=lambda: ["slide_encoder", "projector"])
    group_by_length: bool = True
    num_workers: int = 0
    grounding_weight: float = 0.0           # > 0: projector relevance pulled onto data.grounding_dir targets
    grounding_target: float = 0.5           # relevance mass on the targets at which that loss stops
    eval_batches: int = 0                   # loss on the first N batches (fixed order) before and after training


@dataclass
class StageRecipe:
    """One training stage."""

    name: str = "stage"
    stage: int = 1
    output_dir: str = "runs/stage"
    init_from: str | None = None            # previous stage checkpoint (None: a fresh model)
    model: dict[str, Any] = field(default_factory=dict)  # SlideAssistantConfig options (with init_from: llm.mode/lora_*)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    contrastive: dict[str, Any] = field(default_factory=dict)  # stage 0 options (see training.contrastive)

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2):
            raise ConfigError(f"stage must be 0, 1 or 2, got {self.stage}")
        mode = (self.model.get("llm") or {}).get("mode", "frozen")
        if mode not in ("frozen", "lora", "full"):
            raise ConfigError(f"model.llm.mode {mode!r}: use frozen, lora or full")


@dataclass
class SynthStep:
    n: int = 32
    seed: int = 1234
    size: str = "tiny"
    lesion_probability: float = 0.75  # chance a slide has a focal lesion


@dataclass
class CaseSynthStep:
    """SynthSlide cases (``slidechat.synth.cases``) written to ``<out>/synth_cases``; their slides are extracted with
    the others and ``case_data`` (``training.synth_data.build_case_instructions`` options) builds
    ``<out>/data/case_instructions.json``."""

    n_cases: int = 16
    seed: int = 4321
    size: str = "tiny"
    min_slides: int = 2
    max_slides: int = 4
    from_dataset: str | None = None  # compose the cases of this SynthSlide folder's slides (no new slides)


@dataclass
class EvaluateStep:
    """The pipeline's last step: ``slidechat eval run`` (closed VQA per category + pointing game) on a fresh
    SynthSlide set (a seed training never saw), generated in ``<out>/eval/synth-seed<seed>`` unless ``synth_dir``."""

    n: int = 24
    seed: int = 98765
    size: str = "tiny"
    synth_dir: str | None = None
    max_new_tokens: int = 16                # closed-VQA answer length
    tasks: list[str] = field(default_factory=lambda: ["closed_vqa", "grounding"])
    limit: int | None = None                # at most this many items per task (smoke runs)
    cases: int = 0                          # > 0: also a fresh case set of this many cases (case closed VQA)
    case_max_new_tokens: int = 128          # case answers state each slide's finding and the answer so far


@dataclass
class PipelineRecipe:
    """Data preparation from nothing, then stages; ``export`` copies the final checkpoint."""

    name: str = "pipeline"
    output_dir: str = "runs/pipeline"
    synth: SynthStep | None = None
    patch_cnn: PatchCNNTrainConfig | None = None
    extract: ExtractionConfig | None = None
    stages: list[StageRecipe] = field(default_factory=list)
    slide_pretrain: SlidePretrainConfig | None = None  # before stage 1
    patch_readout: PatchReadoutConfig | None = None    # concepts read from patch classes (after slide pre-training)
    demo_data: dict[str, Any] = field(default_factory=dict)  # training.synth_data.build_demo_instructions options
    cases: CaseSynthStep | None = None
    case_data: dict[str, Any] = field(default_factory=dict)  # training.synth_data.build_case_instructions options
    export: str | None = None
    evaluate: EvaluateStep | None = None
    threads: int | None = None


# ----------------------------------------------------------------------------------- loading


def recipe_from_dict(data: dict, base_dir: Path | None = None) -> StageRecipe | PipelineRecipe:
    """Build a recipe from a parsed YAML mapping (``kind: pipeline`` or a stage recipe)."""
    data = dict(data)
    kind = data.pop("kind", "stage")
    for stage in [data] + list(data.get("stages") or []) if kind == "stage" else list(data.get("stages") or []):
        _reject_moved_llm_options(stage)
    if kind not in ("stage", "pipeline"):
        raise ConfigError(f"recipe kind {kind!r}: use stage or pipeline")
    return config_from_dict(PipelineRecipe if kind == "pipeline" else StageRecipe, data, where="recipe")


MOVED_LLM_OPTIONS = {"train_llm": "model.llm.mode", "lora": "model.llm.lora_r / lora_alpha / lora_dropout / "
                                                              "lora_target_modules"}


def _reject_moved_llm_options(stage: Any) -> None:
    train = stage.get("train") if isinstance(stage, dict) else None
    for key, new in MOVED_LLM_OPTIONS.items():
        if isinstance(train, dict) and key in train:
            raise ConfigError(f"recipe option train.{key} is now {new} (the LLM's own config; "
                              "see training/recipes/stage2.yaml)")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> StageRecipe | PipelineRecipe:
    """Load a YAML recipe; ``overrides`` are ``dotted.key=yaml_value`` strings (e.g. ``train.lr=1e-4``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; see training/recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    for item in overrides or []:
        apply_override(data, item)
    return recipe_from_dict(data, base_dir=path.parent)


def apply_override(data: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (value parsed as YAML; list indices allowed: stages.1.train.lr)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: use key.path=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw)
    parts = key.strip().split(".")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def recipe_to_dict(recipe: StageRecipe | PipelineRecipe) -> dict:
    """Plain dict (for saving next to a checkpoint); ``recipe_from_dict`` reads it back."""
    out = config_to_dict(recipe)
    out["kind"] = "pipeline" if isinstance(recipe, PipelineRecipe) else "stage"
    return out
