"""Shared fixtures. Everything is offline; slides are generated on the fly or copied from tests/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(__file__).parent / "data"
# Screenshots, plots and other artefacts tests leave for humans to look at.
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """Two torch threads (this machine's cores) for the whole session, set once the session starts."""
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def single_torch_thread():
    """One torch thread for tests of many tiny ops, where a second OpenMP thread only spin-waits."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """A real Aperio SVS region (CMU-1, 2220x2967, mpp 0.499, one level, JPEG tiles)."""
    return DATA_DIR / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    return TEST_OUTPUT


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """Four tiny SynthSlide slides (seed 0) with truth and text products; shared by the whole session."""
    from slidechat.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n=4, seed=0, size="tiny")
    return out


# ---------------------------------------------------------------- model: a tiny random LLM for tests
TINY_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_llm(out_dir: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random causal LM (Llama or Qwen2, hidden 64) + a small byte-level BPE tokenizer with a ChatML
    template into ``out_dir`` (an HF folder that ``LLMConfig(name_or_path=out_dir)`` loads)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [
        "Which tissue types are present in this slide? Fibrous stroma, normal glands, tumour, necrosis, fat.",
        "Is there a focal lesion? Yes, a carcinoma in the upper-left quadrant. No, benign tissue.",
        "What percentage of the tissue area is tumour? About 12%. Write a short pathology report.",
        "You are SlideChat, an assistant for pathology whole-slide images. Answer concisely.",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TINY_CHATML
    common = dict(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, ~400-token BPE vocab, ChatML template) as an HF folder."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture
def tiny_model_config(tiny_llm_dir):
    """Factory: a SlideAssistantConfig with tiny encoder/Q-Former (feature_dim 32) on the tiny LLM; kwargs override."""
    from slidechat.model.config import (LLMConfig, QFormerConfig, SlideAssistantConfig, SlideEncoderConfig)

    def make(projector: str = "qformer", mode: str = "frozen", feature_dim: int = 32, **kw) -> SlideAssistantConfig:
        return SlideAssistantConfig(
            encoder=SlideEncoderConfig(feature_dim=feature_dim, hidden_size=32, num_heads=2, region_size=4,
                                       slide_layers=1, num_slide_tokens=2),
            projector=projector,
            qformer=QFormerConfig(num_query_tokens=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64),
            llm=LLMConfig(name_or_path=str(tiny_llm_dir), mode=mode, lora_r=4, lora_alpha=8, lora_dropout=0.0),
            patch_encoder=None, **kw)

    return make


# ---------------------------------------------------------------- app: a tiny assistant that reads slide files
@pytest.fixture(scope="session")
def tiny_slide_assistant(tiny_llm_dir):
    """A tiny random SlideAssistant with the demo-CNN patch encoder (random weights when none are packaged),
    so it tiles and encodes real slide files end to end; shared by the app tests."""
    import torch

    from slidechat.inference import SlideChat
    from slidechat.model.assistant import SlideAssistant
    from slidechat.model.config import PatchEncoderRef

    config = _tiny_demo_cnn_config(tiny_llm_dir, PatchEncoderRef(name="demo-cnn"))
    torch.manual_seed(0)
    return SlideChat(SlideAssistant(config, device="cpu"))


# ---------------------------------------------------------------- evaluation: a tiny checkpoint folder on disk
@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_llm_dir, tmp_path_factory) -> Path:
    """A saved tiny random checkpoint (demo-CNN patch encoder at 2 µm/px, tiny Q-Former, tiny LLM) that
    ``slidechat.load(path)`` reads, for CLI-level tests (`slidechat report`, `slidechat eval run`)."""
    import torch

    from slidechat.model.assistant import SlideAssistant
    from slidechat.model.config import PatchEncoderRef

    config = _tiny_demo_cnn_config(tiny_llm_dir, PatchEncoderRef(name="demo-cnn", target_mpp=2.0, patch_size=224))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_ckpt")
    SlideAssistant(config, device="cpu").save_pretrained(out)
    return out


def _tiny_demo_cnn_config(tiny_llm_dir, patch_encoder):
    """A tiny slide encoder + Q-Former over demo-CNN features and the tiny random LLM."""
    from slidechat.encoders import load_encoder
    from slidechat.model.config import LLMConfig, QFormerConfig, SlideAssistantConfig, SlideEncoderConfig

    dim = int(load_encoder("demo-cnn").embed_dim)
    return SlideAssistantConfig(
        encoder=SlideEncoderConfig(feature_dim=dim, hidden_size=32, num_heads=2, region_size=4, slide_layers=1,
                                   num_slide_tokens=2),
        qformer=QFormerConfig(num_query_tokens=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64),
        llm=LLMConfig(name_or_path=str(tiny_llm_dir)), patch_encoder=patch_encoder)


@pytest.fixture(scope="module")
def tiny_qformer_chat(tiny_llm_dir):
    """A SlideChat over a tiny random Q-Former assistant (32-d features, 8 queries) on the tiny LLM; no patch encoder."""
    import torch

    from slidechat.inference.pipeline import SlideChat
    from slidechat.model.assistant import SlideAssistant
    from slidechat.model.config import LLMConfig, QFormerConfig, SlideAssistantConfig, SlideEncoderConfig

    cfg = SlideAssistantConfig(
        encoder=SlideEncoderConfig(feature_dim=32, hidden_size=32, num_heads=2, slide_layers=1, num_slide_tokens=2),
        qformer=QFormerConfig(num_query_tokens=8, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        llm=LLMConfig(name_or_path=str(tiny_llm_dir)), patch_encoder=None)
    torch.manual_seed(0)
    return SlideChat(SlideAssistant(cfg, device="cpu"))
