"""Case training data: SynthSlide case conversations -> samples with several slides -> batches -> the training
forward (the fast path and the model's own forward agree), on the tiny random Q-Former model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidechat.features.store import write_features_h5
from slidechat.model.processor import SLIDE_TOKEN_ID
from slidechat.synth.cases import generate_case_dataset
from slidechat.training.data import Collator, FeatureResolver, SkipCounter, SlideConversationDataset, load_samples
from slidechat.training.forward import fast_forward
from slidechat.training.synth_data import build_case_instructions
from slidechat.utils.io import read_jsonl

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def case_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("case_train")
    generate_case_dataset(root / "synth", 2, seed=31, size="tiny", min_slides=2, max_slides=3)
    rng = np.random.default_rng(0)
    for i, t in enumerate(read_jsonl(root / "synth" / "truth.jsonl")):
        n = 10 + 2 * i
        coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1) * 224
        write_features_h5(root / "features" / f"{t['slide_id']}.h5", rng.normal(size=(n, 32)).astype(np.float32),
                          coords, {"patch_size": 224, "patch_size_level0": 224, "slide_id": t["slide_id"],
                                   "slide_sha256": t["slide_id"], "target_mpp": 0.5, "encoder": "toy"})
    counts = build_case_instructions(root / "synth", root / "case_instructions.json", mcq_rounds=2,
                                     replay_mcq_rounds=1, turns_per_conversation=3)
    return root, counts


def test_case_instructions_hold_case_and_single_slide_conversations(case_data):
    root, counts = case_data
    assert counts["case_mcq"] == 2 * 2 * 3 and counts["case_sentences"] == 2 * 3 and counts["replay_mcq"] > 0
    records = json.loads((root / "case_instructions.json").read_text())
    multi = [r for r in records if len(r["image"]) > 1]
    assert multi and len(multi) < len(records)  # single-slide replay is mixed in
    assert all(r["conversations"][0]["value"].startswith("<image>") for r in records)
    answers = [t["value"] for r in multi for t in r["conversations"] if t["from"] == "gpt"]
    assert any(a.startswith("Slide ") for a in answers)  # the answers name slides as the prompt does


def test_reasoned_case_answers_name_each_slide_and_parse_to_the_right_letter(case_data, tmp_path):
    from slidechat.evaluation.answer_parser import parse_choice

    root, _ = case_data
    out = tmp_path / "reasoned.json"
    build_case_instructions(root / "synth", out, mcq_rounds=2, replay_mcq_rounds=0, sentence_turns=False,
                            turns_per_conversation=1, reasoned=True)
    truths = {t["case_id"]: t for t in read_jsonl(root / "synth" / "case_truth.jsonl")}
    records = json.loads(out.read_text())
    assert len(records) == 2 * 2 * 3
    for r in records:
        prompt, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        options = dict(line.split(". ", 1) for line in prompt.splitlines()
                       if line[:3] in ("A. ", "B. ", "C. ", "D. "))
        truth = truths[r["id"].split("-mcq")[0]]
        assert answer.count("Slide ") >= len(truth["slide_ids"])  # every slide's finding before the choice
        letter = parse_choice(answer, options)
        assert letter is not None and answer.endswith(f"So the answer is {options[letter]} ({letter}).")


def test_case_batches_train(case_data, tiny_qformer_chat):
    root, _ = case_data
    model = tiny_qformer_chat.model
    skips = SkipCounter()
    samples = load_samples(root / "case_instructions.json", "instructions", skips)
    ds = SlideConversationDataset(samples, model.tokenize_conversation, FeatureResolver(root / "features"),
                                  max_length=1024, extra_tokens=model.num_slide_tokens - 1, skips=skips)
    assert skips.total == 0 and len(ds) == len(samples)
    cases = [i for i, it in enumerate(ds.items) if len(it["paths"]) > 1]
    item = ds[cases[0]]
    assert isinstance(item["slide_features"], list) and len(item["slide_features"]) == len(ds.items[cases[0]]["paths"])
    assert int((item["input_ids"] == SLIDE_TOKEN_ID).sum()) == len(item["slide_features"])
    batch = Collator(0)([ds[i] for i in cases[:1] + [j for j in range(len(ds)) if j not in cases][:1]])
    model.eval()
    with torch.no_grad():
        fast = fast_forward(model, batch).loss
        full = model(batch["input_ids"], batch["attention_mask"], batch["labels"], slide_features=batch["slide_features"],
                     slide_coords=batch["slide_coords"]).loss
    assert torch.isfinite(fast) and torch.allclose(fast, full, atol=1e-4)
