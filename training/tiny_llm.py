"""A tiny random chat LLM (Llama layout, ByteLevel-BPE tokenizer with a ChatML template) for tests and smoke runs.

Built offline in about a second; nothing is downloaded. ``make_tiny_llm(dir)`` writes an HF folder that
``LLMConfig(name_or_path=dir)`` loads like any other local model.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "Describe this slide. The slide shows fibrous stroma, normal glands, tumour, necrosis, lymphocytes and fat.",
    "Which tissue types are present? Is there a lesion? Yes. No. upper-left upper-right lower-left lower-right center",
    "What fraction of the tissue is tumour? under 10% 10-30% over 30% none (0%) A B C D answer with a letter",
    "You are SlideChat, an assistant for pathology whole-slide images. Answer concisely.",
]


def make_tiny_llm(out_dir: str | Path, *, hidden_size: int = 32, layers: int = 2, vocab_size: int = 400, init_std: float = 0.3,
                  seed: int = 0) -> Path:
    """Write a random tiny causal LM + tokenizer to ``out_dir`` (skipped if it already holds one)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None)
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=init_std,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
