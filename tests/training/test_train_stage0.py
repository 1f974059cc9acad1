"""Stage 0 (ITC + ITM) on a tiny model: loss goes down, retrieval heads saved and usable via Retriever."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slidechat.features.store import write_features_h5
from slidechat.training.loop import train_stage
from slidechat.training.recipe import load_recipe
from slidechat.training.tiny_llm import make_tiny_llm


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage0")
    llm = make_tiny_llm(root / "llm")
    rng = np.random.default_rng(1)
    words = ["fat", "tumour", "stroma", "necrosis"]
    caps = []
    for i in range(8):
        x = rng.normal(size=(10, 16)).astype(np.float32)
        x[:, i % 4] += 4.0
        coords = np.stack([np.arange(10) % 4, np.arange(10) // 4], 1) * 224
        write_features_h5(root / "features" / f"s{i}.h5", x, coords, {"patch_size_level0": 224})
        caps.append({"slide_id": f"s{i}", "caption": f"This slide is mostly {words[i % 4]}."})
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    return root, llm


def test_stage0_contrastive_trains_and_retrieves(pairs):
    from slidechat.model.assistant import SlideAssistant
    from slidechat.inference.retrieval import Retriever

    root, llm = pairs
    src = json.dumps([{"path": str(root / "captions.jsonl"), "kind": "captions"}])
    sets = ["stage=0", f"model.llm.name_or_path={llm}", f"data.features_dir={root / 'features'}",
            f"data.sources={src}", "train.max_steps=30", "train.batch_size=8", "train.lr=4e-3", "train.log_every=10",
            "contrastive={embed_dim: 32, itm_weight: 0.5, text_encoder: minilm}"]
    r = load_recipe("training/recipes/tiny.yaml", sets + [f"output_dir={root / 's0'}"])
    m = train_stage(r)
    assert m["final_loss"] < 0.7 * m["first_loss"], m
    ckpt = root / "s0" / "final"
    assert (ckpt / "retrieval.safetensors").is_file() and (ckpt / "model.safetensors").is_file()
    assistant = SlideAssistant.from_pretrained(ckpt, device="cpu")
    ret = Retriever(assistant)
    h5 = [root / "features" / f"s{i}.h5" for i in range(8)]
    top = ret.retrieve("This slide is mostly tumour.", h5, top_k=2)
    assert {i for i, _ in top} <= {1, 5}  # the two tumour slides
    probs = ret.zero_shot(h5[2], ["This slide is mostly fat.", "This slide is mostly stroma."])
    assert probs["This slide is mostly stroma."] > 0.5

    # the same trainer as stages 1/2: interrupted after 12 steps and resumed, it ends with the same weights
    part = load_recipe("training/recipes/tiny.yaml", sets + [f"output_dir={root / 's0-part'}", "train.save_every=6"])
    assert train_stage(part, stop_after=12)["interrupted"]
    resumed = train_stage(part, resume=True)
    assert resumed["steps"] == 30 and (root / "s0-part" / "final" / "retrieval.safetensors").is_file()
    want = m["model"].trainable_state_dict()
    got = resumed["model"].trainable_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    heads_a, heads_b = (load_file(str(root / d / "final" / "retrieval.safetensors")) for d in ("s0", "s0-part"))
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
