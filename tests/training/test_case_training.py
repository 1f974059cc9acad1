"""Case training data: SynthSlide case conversations -> samples with several slides -> batches -> the training
forward (the fast path and the model's own forward agree), on the tiny random Q-Former model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from slidechat.errors import ConfigError
from slidechat.features.store import write_features_h5
from slidechat.prompts import split_case_header
from slidechat.model.processor import SLIDE_TOKEN_ID
from slidechat.synth.cases import generate_case_dataset
from slidechat.training.data import Collator, FeatureResolver, SkipCounter, SlideConversationDataset, load_samples
from slidechat.training.forward import fast_forward
from slidechat.training.synth_data import build_case_instructions, training_slide_labels
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
    singles = [r for r in records if len(r["image"]) == 1]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in singles)
    for r in multi:
        # the first turn names every slide in front of its placeholder; later turns carry none
        header, question = split_case_header(r["conversations"][0]["value"])
        lines = header.splitlines()
        assert len(lines) == len(r["image"]) and question and "<image>" not in question
        assert all(line.startswith(f"Slide {i + 1}") and line.endswith(": <image>") for i, line in enumerate(lines))
        assert all("<image>" not in t["value"] for t in r["conversations"][1:])
        # every slide name an answer uses is one the prompt gave: no invented labels
        names = {line[: -len(": <image>")] for line in lines}
        answers = " ".join(t["value"] for t in r["conversations"] if t["from"] == "gpt")
        used = set(re.findall(r"Slide \d+(?: \((?![A-D]\))[^)]*\))?", answers))  # "(B)" is an option letter
        assert used and used <= names, (used, names)


def test_some_case_conversations_leave_the_slides_unlabelled(case_data, tmp_path):
    root, _ = case_data
    out = tmp_path / "mixed.json"
    for share, n_unlabelled in ((1.0, 2), (0.0, 0)):
        counts = build_case_instructions(root / "synth", out, mcq_rounds=1, replay_mcq_rounds=0,
                                         unlabelled_share=share)
        records = json.loads(out.read_text())
        headers = {split_case_header(r["conversations"][0]["value"])[0] for r in records}
        answers = " ".join(t["value"] for r in records for t in r["conversations"][1::2])
        assert counts["unlabelled_cases"] == n_unlabelled == sum("Slide 1 (" not in h for h in headers)
        assert bool(re.search(r"Slide 1 \((?![A-D]\))", answers)) == (n_unlabelled == 0)  # "(B)": a letter
    with pytest.raises(ConfigError, match="unlabelled_share"):
        build_case_instructions(root / "synth", out, unlabelled_share=1.5)


def test_case_conversations_in_the_form_the_demo_was_trained_on(case_data, tmp_path):
    # one placeholder in the first turn (the processor marks the slides by number), answers with the folder's labels
    root, _ = case_data
    out = tmp_path / "unnamed.json"
    counts = build_case_instructions(root / "synth", out, mcq_rounds=1, replay_mcq_rounds=0,
                                     name_slides_in_prompt=False)
    records = json.loads(out.read_text())
    assert counts["unlabelled_cases"] == 0 and records
    assert all(r["conversations"][0]["value"].startswith("<image>\n")
               and r["conversations"][0]["value"].count("<image>") == 1 for r in records)
    answers = " ".join(t["value"] for r in records for t in r["conversations"][1::2])
    assert re.search(r"Slide 1 \([A-Z]1 H&E\)", answers)


def test_training_labels_name_every_slide_in_the_ways_users_do():
    ids = ["synth-s1-0001", "synth-s1-0002", "synth-s1-0003"]
    seen = [training_slide_labels(ids, np.random.default_rng(k)) for k in range(40)]
    assert all(len(labels) == 3 and len(set(labels)) == 3 for labels in seen if "level" not in labels[0])
    assert any(labels[0].endswith("H&E") for labels in seen) and [f"{i}.tiff" for i in ids] in seen
    assert ["Part 1", "Part 2", "Part 3"] in seen and any(labels[0].endswith("level 1") for labels in seen)


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
    # every slide's tokens come right behind its name as the conversation gives it, and nowhere else
    tokenizer = model.tokenizer
    for i in cases:
        ids = ds.items[i]["input_ids"].tolist()
        header = split_case_header(samples[i].messages[0]["content"])[0].splitlines()
        marks = [k for k, t in enumerate(ids) if t == SLIDE_TOKEN_ID]
        assert len(marks) == len(header) == len(ds.items[i]["paths"])
        for k, line in zip(marks, header):
            before = tokenizer.decode([t for t in ids[max(0, k - 64):k] if t >= 0])
            assert before.rstrip().endswith(line.split("<")[0].rstrip()), (before, line)
    batch = Collator(0)([ds[i] for i in cases[:1] + [j for j in range(len(ds)) if j not in cases][:1]])
    model.eval()
    with torch.no_grad():
        fast = fast_forward(model, batch).loss
        full = model(batch["input_ids"], batch["attention_mask"], batch["labels"], slide_features=batch["slide_features"],
                     slide_coords=batch["slide_coords"]).loss
    assert torch.isfinite(fast) and torch.allclose(fast, full, atol=1e-4)
