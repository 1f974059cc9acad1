"""Training data layer: LLaVA/SlideChat JSON, captions, feature resolution (.h5 + SlideChat CSV),
bad-sample skipping with counts, the length-grouped sampler, and recipe loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidechat.errors import ConfigError, DataError
from slidechat.features.store import write_features_h5
from slidechat.training.data import (Collator, FeatureResolver, SkipCounter, SlideConversationDataset, llava_to_sample,
                           load_samples, slide_key)
from slidechat.training.recipe import load_recipe, recipe_from_dict
from slidechat.training.sampler import LengthGroupedBatchSampler


def toy_tokenize(messages):
    """Whitespace 'tokenizer': ids are word lengths; labels only on assistant words (like the model hook)."""
    ids, labels = [1], [-100]
    for m in messages:
        words = m["content"].split() or ["<empty>"]
        ids += [len(w) % 50 + 2 for w in words]
        labels += [len(w) % 50 + 2 if m["role"] == "assistant" and m["content"].strip() else -100 for w in words]
    return {"input_ids": ids, "labels": labels}


@pytest.fixture()
def feats_dir(tmp_path):
    d = tmp_path / "features"
    d.mkdir()
    rng = np.random.default_rng(0)
    write_features_h5(d / "slideA.h5", rng.normal(size=(20, 8)).astype(np.float32),
                      np.arange(40).reshape(20, 2) * 224, {"patch_size": 224, "patch_size_level0": 224,
                                                            "target_mpp": 0.5, "encoder": "x", "slide_id": "slideA",
                                                            "slide_sha256": "0"})
    # SlideChat-style feature CSV: header + one row per patch, 512 feature columns
    rows = rng.normal(size=(7, 512))
    lines = [",".join(f"f{i}" for i in range(512))] + [",".join(f"{v:.4f}" for v in r) for r in rows]
    (d / "TCGA-XX-0001.csv").write_text("\n".join(lines) + "\n")
    (d / "broken.h5").write_bytes(b"not an hdf5 file")
    return d


def slidechat_records():
    return [
        {"id": "ok-csv", "image": ["TCGA-XX-0001.csv"], "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "Tumour tissue."}]},
        {"id": "ok-h5", "image": ["slideA.tiff"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Stroma and fat."},
            {"from": "human", "value": "Any lesion?"}, {"from": "gpt", "value": "No."}]},
        {"id": "nofeat", "image": ["missing.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "empty", "image": ["slideA.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "   "}]},
        {"id": "notag", "image": ["slideA.csv"], "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "long", "image": ["slideA.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "word " * 200}]},
        {"id": "bad-turn", "image": ["slideA.csv"], "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "unreadable", "image": ["broken.svs"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
    ]


def test_slide_key_and_llava_conversion():
    assert slide_key("TCGA-A1-XXXX.csv") == "TCGA-A1-XXXX"
    assert slide_key("slides/s_001.tiff") == "s_001"
    s = llava_to_sample(slidechat_records()[1])
    assert s.slide_key == "slideA"
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert "<image>" not in s.messages[0]["content"] and s.messages[0]["content"] == "Describe."


def test_features_from_several_folders_an_earlier_one_wins(tmp_path, feats_dir):
    other = tmp_path / "other"
    rng = np.random.default_rng(1)
    for stem, n in (("slideA", 3), ("slideZ", 4)):  # slideA is in feats_dir too
        write_features_h5(other / f"{stem}.h5", rng.normal(size=(n, 8)).astype(np.float32),
                          np.zeros((n, 2), np.int64), {"patch_size": 224, "patch_size_level0": 224})
    both = FeatureResolver([feats_dir, other])
    assert both.resolve("slideZ") == other / "slideZ.h5" and both.resolve("slideA").parent == feats_dir
    assert FeatureResolver([other, feats_dir]).resolve("slideA") == other / "slideA.h5"
    with pytest.raises(DataError, match="missing"):
        FeatureResolver([feats_dir, tmp_path / "missing"])


def test_bad_samples_are_skipped_and_counted(tmp_path, feats_dir):
    path = tmp_path / "instr.json"
    path.write_text(json.dumps(slidechat_records()))
    skips = SkipCounter()
    samples = load_samples(path, "instructions", skips)
    ds = SlideConversationDataset(samples, toy_tokenize, FeatureResolver(feats_dir), max_length=64,
                                  extra_tokens=4, skips=skips)
    assert sorted(it["id"] for it in ds.items) == ["ok-csv", "ok-h5", "unreadable"]
    counts = skips.as_dict()
    assert counts == {"empty_answer": 1, "malformed": 1, "missing_image_tag": 1, "no_features": 1, "too_long": 1}
    # an unreadable feature file is found only when used: skipped (None) and counted, no exception
    got = {ds.items[i]["id"]: ds[i] for i in range(len(ds))}
    assert got["unreadable"] is None and skips.as_dict()["unreadable_features"] == 1
    csv_item = got["ok-csv"]
    assert csv_item["slide_features"].shape == (7, 512) and csv_item["slide_coords"] is None
    h5_item = got["ok-h5"]
    assert h5_item["slide_features"].shape == (20, 8) and h5_item["slide_coords"].shape == (20, 2)
    batch = Collator(pad_token_id=0)([got["ok-csv"], None, got["ok-h5"]])
    assert batch["input_ids"].shape[0] == 2 and batch["ids"] == ["ok-csv", "ok-h5"]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_captions_and_single_turn_split(tmp_path, feats_dir):
    cap = tmp_path / "captions.jsonl"
    cap.write_text(json.dumps({"slide_id": "slideA", "caption": "Fat and stroma."}) + "\n"
                   + json.dumps({"slide_id": "slideA", "caption": ""}) + "\n{torn")
    skips = SkipCounter()
    samples = load_samples(cap, "captions", skips)
    assert len(samples) == 1 and samples[0].messages[1]["content"] == "Fat and stroma."
    assert skips.as_dict() == {"empty_answer": 1}
    instr = tmp_path / "i.json"
    instr.write_text(json.dumps(slidechat_records()[1:2]))
    single = load_samples(instr, "instructions", SkipCounter(), multi_turn=False)
    assert [len(s.messages) for s in single] == [2, 2] and single[1].messages[1]["content"] == "No."


def test_max_patches_subsampling_is_deterministic(tmp_path, feats_dir):
    path = tmp_path / "instr.json"
    path.write_text(json.dumps(slidechat_records()[1:2]))
    ds = SlideConversationDataset(load_samples(path, "instructions", SkipCounter()), toy_tokenize,
                                  FeatureResolver(feats_dir), max_length=64, max_patches=5, seed=3)
    a, b = ds[0], ds[0]
    assert a["slide_features"].shape == (5, 8) and torch.equal(a["slide_features"], b["slide_features"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["slide_coords"], a["slide_coords"])


def test_length_grouped_sampler_covers_all_and_resumes():
    lengths = list(np.random.default_rng(0).integers(5, 500, size=103))
    s = LengthGroupedBatchSampler(lengths, 4, seed=1, group_factor=5)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(103))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    rand = LengthGroupedBatchSampler(lengths, 4, seed=1, group_by_length=False)
    spread_rand = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in rand])
    assert spread < spread_rand / 2  # grouping pads much less
    s.batches_done = 10
    assert list(s) == batches[10:]
    s.set_epoch(1)
    assert list(s) != batches
    r0 = LengthGroupedBatchSampler(lengths, 4, seed=1, rank=0, world_size=2)
    r1 = LengthGroupedBatchSampler(lengths, 4, seed=1, rank=1, world_size=2)
    assert len(list(r0)) == len(list(r1)) == len(r0)
    assert not set(map(tuple, r0)) & set(map(tuple, r1))


def test_recipe_loading_and_errors(tmp_path):
    for name in ("stage1", "stage2", "demo", "tiny"):
        load_recipe(f"training/recipes/{name}.yaml")
    p = tmp_path / "r.yaml"
    p.write_text("stage: 1\ntrain: {lr: 1e-3, max_steps: 5}\ndata: {sources: [{path: x.json}]}\n")
    r = load_recipe(p, ["train.batch_size=2"])
    assert r.train.lr == 1e-3 and r.train.batch_size == 2 and r.data.sources[0].kind == "instructions"
    with pytest.raises(ConfigError, match="unknown option"):
        recipe_from_dict({"stage": 1, "trian": {}})
    with pytest.raises(ConfigError, match="stage must be"):
        recipe_from_dict({"stage": 7})
    with pytest.raises(ConfigError, match="expected int"):
        recipe_from_dict({"train": {"batch_size": "four"}})


def test_malformed_lines_are_skipped_and_counted(tmp_path, feats_dir):
    cap = tmp_path / "captions.jsonl"
    cap.write_text('{"slide_id": "slideA", "caption": "Stroma."}\n{"slide_id": "slideB", "capt\n'
                   '["not", "an", "object"]\n{"slide_id": "slideB", "caption": "Fat."}\n')
    skips = SkipCounter()
    samples = load_samples(cap, "captions", skips)
    assert [s.slide_key for s in samples] == ["slideA", "slideB"]
    assert skips.as_dict() == {"malformed_line": 2} and skips.examples["malformed_line"] == "captions.jsonl:2"
    bad_json = tmp_path / "instr.json"
    bad_json.write_text('[{"id": 1,')
    with pytest.raises(DataError, match="instr.json"):
        load_samples(bad_json, "instructions", SkipCounter())


def test_demo_instructions_mix_open_answers_descriptions_and_choices(synth_dataset, tmp_path):
    """The demo's stage-2 data: every kind asked, answers in sentences, repeated draws of a question type kept in
    different conversations of a slide."""
    from slidechat.training.synth_data import build_demo_instructions
    from slidechat.utils.io import read_jsonl

    out = tmp_path / "instructions.json"
    counts = build_demo_instructions(synth_dataset, out, mcq_rounds=1, open_rounds=2, describe_rounds=1,
                                     turns_per_conversation=6)
    n = len(read_jsonl(synth_dataset / "truth.jsonl"))
    assert counts["open"] == 2 * 6 * n and counts["describe"] == n and counts["mcq"] > 0 and counts["report"] > 0
    records = json.loads(out.read_text())
    assert all("draw" not in r for r in records)
    for r in records:
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and len(turns) <= 12
        questions = [t["value"].replace("<image>\n", "") for t in turns[::2]]
        assert len(set(questions)) == len(questions), questions  # no question asked twice in one conversation
    answers = [t["value"] for r in records for t in r["conversations"][1::2]]
    assert any(a.startswith(("Yes, ", "No, ")) and a.endswith(".") for a in answers)
    assert any("quadrant" in a and a.count(".") >= 2 for a in answers)  # a description
