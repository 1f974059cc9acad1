"""End-to-end training on a tiny random LLM: stage 1 -> stage 2 (LoRA), loss goes down, exact resume,
bad data skipped and counted, CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidechat.features.store import write_features_h5
from slidechat.training.cli import main as train_main
from slidechat.training.loop import train_stage
from slidechat.training.recipe import load_recipe
from slidechat.training.tiny_llm import make_tiny_llm

CLASSES = ["stroma", "tumour", "fat"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """6 slides whose features encode their class; captions + VQA + a few bad records."""
    root = tmp_path_factory.mktemp("tinytrain")
    llm = make_tiny_llm(root / "llm")
    rng = np.random.default_rng(0)
    feats = root / "features"
    records, captions = [], []
    for i in range(6):
        cls = CLASSES[i % 3]
        n = 12 + 3 * i
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x[:, i % 3] += 3.0
        coords = np.stack(np.meshgrid(np.arange(4), np.arange(-(-n // 4))), -1).reshape(-1, 2)[:n] * 224
        write_features_h5(feats / f"s{i}.h5", x, coords, {"patch_size": 224, "patch_size_level0": 224,
                                                          "target_mpp": 0.5, "encoder": "toy", "slide_id": f"s{i}",
                                                          "slide_sha256": str(i)})
        captions.append({"slide_id": f"s{i}", "caption": f"The slide shows {cls}."})
        records.append({"id": f"q{i}", "image": [f"s{i}.tiff"], "conversations": [
            {"from": "human", "value": "<image>\nWhich tissue is present?"}, {"from": "gpt", "value": cls},
            {"from": "human", "value": "Is there a lesion?"}, {"from": "gpt", "value": "yes" if cls == "tumour" else "no"}]})
    records += [
        {"id": "bad-nofeat", "image": ["nowhere.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "bad-empty", "image": ["s0.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": ""}]},
        {"id": "bad-notag", "image": ["s0.csv"], "conversations": [
            {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "bad-long", "image": ["s1.csv"], "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "stroma " * 400}]},
    ]
    (root / "instructions.json").write_text(json.dumps(records))
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return root, llm


def tiny_recipe(root, llm, name, **over):
    sets = [f"name={name}", f"output_dir={root / name}", f"model.llm.name_or_path={llm}",
            f"data.features_dir={root / 'features'}"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return load_recipe("training/recipes/tiny.yaml", sets)


def test_stage1_then_stage2_loss_goes_down_and_bad_data_counted(tiny_data):
    root, llm = tiny_data
    src = json.dumps([{"path": str(root / "captions.jsonl"), "kind": "captions"},
                      {"path": str(root / "instructions.json"), "kind": "instructions"}])
    r1 = tiny_recipe(root, llm, "s1", **{"data.sources": src, "train.max_steps": 12, "train.save_every": 0,
                                         "train.eval_batches": 9})
    m1 = train_stage(r1)
    assert m1["skipped"] == {"empty_answer": 1, "missing_image_tag": 1, "no_features": 1, "too_long": 1}
    # LLM frozen: only the slide tokens can lower the loss, measured on the same (whole) data before/after
    assert m1["fixed_batches_loss_after"] < 0.9 * m1["fixed_batches_loss_before"], m1
    assert (root / "s1" / "final" / "model.safetensors").is_file()
    assert json.loads((root / "s1" / "metrics.json").read_text())["steps"] == 12
    rows = (root / "s1" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr,tokens_per_s") and len(rows) == 13
    llm_before = {n: p.clone() for n, p in m1["model"].llm.named_parameters()}
    assert all(not p.requires_grad for p in m1["model"].llm.parameters())  # stage 1: LLM frozen

    src2 = json.dumps([{"path": str(root / "instructions.json"), "kind": "instructions"}])
    r2 = tiny_recipe(root, llm, "s2", **{"data.sources": src2, "init_from": str(root / "s1" / "final"),
                                         "stage": 2, "model": "{llm: {mode: lora, lora_r: 4, lora_alpha: 8, "
                                         "lora_dropout: 0.0, lora_target_modules: [q_proj, v_proj]}}",
                                         "train.max_steps": 10, "train.save_every": 0, "train.eval_batches": 9})
    m2 = train_stage(r2)
    assert m2["fixed_batches_loss_after"] < 0.8 * m2["fixed_batches_loss_before"], m2
    assert m2["fixed_batches_loss_before"] < 1.05 * m1["fixed_batches_loss_after"]  # stage 2 starts where 1 ended
    model2 = m2["model"]
    trainable = [n for n, p in model2.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # stage 2 starts from stage 1's encoder/projector, and the base LLM weights are untouched
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in model2.llm.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], llm_before[n]) for n in llm_before)
    assert (root / "s2" / "final" / "adapter" / "adapter_config.json").is_file()
    from slidechat.model.assistant import SlideAssistant

    reloaded = SlideAssistant.from_pretrained(root / "s2" / "final", device="cpu")
    sd = reloaded.trainable_state_dict()
    assert all(torch.equal(v, model2.trainable_state_dict()[k]) for k, v in sd.items())


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data):
    root, llm = tiny_data
    src = json.dumps([{"path": str(root / "instructions.json"), "kind": "instructions"}])
    common = {"data.sources": src, "train.max_steps": 6, "train.save_every": 2, "train.grad_accum": 2,
              "data.max_patches": 10, "model.llm.mode": "lora", "model.llm.lora_r": 4, "model.llm.lora_alpha": 8,
              "model.llm.lora_dropout": 0.1, "model.llm.lora_target_modules": "[q_proj]", "train.scheduler": "cosine",
              "train.warmup_ratio": 0.2}
    full = train_stage(tiny_recipe(root, llm, "full", **common))
    part = tiny_recipe(root, llm, "part", **common)
    stopped = train_stage(part, stop_after=3)  # "killed" after step 3: a checkpoint at step 3 is left
    assert stopped["interrupted"] and not (root / "part" / "final").exists()
    assert (root / "part" / "checkpoints" / "step-000003").is_dir()
    resumed = train_stage(part, resume=True)
    assert resumed["steps"] == 6 and not resumed["interrupted"]
    a = {n: p for n, p in full["model"].named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed["model"].named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    log_steps = [int(r.split(",")[0]) for r in (root / "part" / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == [1, 2, 3, 4, 5, 6]


def test_cli_runs_a_stage_and_reports_bad_recipe(tiny_data, capsys):
    root, llm = tiny_data
    src = json.dumps([{"path": str(root / "captions.jsonl"), "kind": "captions"}])
    rc = train_main(["--recipe", "training/recipes/tiny.yaml", "--output-dir", str(root / "cli"),
                     "--set", f"model.llm.name_or_path={llm}", "--set", f"data.features_dir={root / 'features'}",
                     "--set", f"data.sources={src}", "--set", "train.max_steps=2"])
    assert rc == 0 and (root / "cli" / "final" / "config.json").is_file()
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2
    assert train_main(["--recipe", "training/recipes/tiny.yaml", "--set", "train.bogus=1"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert train_main(["--recipe", "training/recipes/tiny.yaml", "--set", "train.train_llm=lora"]) == 2
    assert "model.llm.mode" in capsys.readouterr().err  # the option moved to the LLM's own config


def test_fast_forward_matches_the_assistant_loss(tiny_data):
    """The loop's cheaper forward (LM head on labelled positions only) gives the model's own loss and grads."""
    from slidechat.training.data import Collator, FeatureResolver, SkipCounter, SlideConversationDataset, load_samples
    from slidechat.training.forward import fast_forward
    from slidechat.training.model_hooks import build_model, pad_token_id

    root, llm = tiny_data
    r = tiny_recipe(root, llm, "ff", **{"model.llm.mode": "lora", "model.llm.lora_r": 4, "model.llm.lora_alpha": 8,
                                        "model.llm.lora_dropout": 0.0, "model.llm.lora_target_modules": "[q_proj]"})
    torch.manual_seed(0)
    model = build_model(r)
    samples = load_samples(root / "instructions.json", "instructions", SkipCounter())
    ds = SlideConversationDataset(samples, model.tokenize_conversation, FeatureResolver(root / "features"),
                                  max_length=256, extra_tokens=3)
    batch = Collator(pad_token_id(model))([ds[i] for i in range(3)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "slide_features", "slide_coords")}
    ref = model(**inputs).loss
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = fast_forward(model, inputs).loss
    fast.backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in g_ref:
            torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
