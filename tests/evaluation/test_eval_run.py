"""`slidechat eval run` with a tiny random checkpoint on SynthSlide and on a SlideBench CSV (+ resume)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from slidechat.cli import main
from slidechat.utils.io import read_jsonl



@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One feature cache for the module, so each synthetic slide is tiled and encoded once."""
    return tmp_path_factory.mktemp("eval_feature_cache")


def test_eval_run_synth_all_tasks_and_resume(synth_dataset, tiny_checkpoint_dir, feature_cache, tmp_path, test_output,
                                             capsys):
    out = tmp_path / "run"
    cache = feature_cache
    args = ["eval", "run", "--checkpoint", str(tiny_checkpoint_dir), "--data", str(synth_dataset), "--out", str(out),
            "--tasks", "closed_vqa", "captioning", "reports", "grounding", "retrieval", "--limit", "2",
            "--max-new-tokens", "4", "--mcq-max-new-tokens", "4", "--cache-dir", str(cache), "--no-meteor",
            "--no-embedding", "--bootstrap", "100", "--no-progress", "--overlays", "1"]
    assert main(args) == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert sorted({(p["task"]) for p in preds}) == ["captioning", "closed_vqa", "grounding", "reports"]
    assert len(preds) == 8 and all(p["status"] == "ok" for p in preds)
    r = json.loads((out / "results.json").read_text())
    assert r["closed_vqa"]["overall"]["n"] == 2 and 0 <= r["closed_vqa"]["overall"]["accuracy"] <= 1
    assert r["captioning"]["n"] == 2 and r["reports"]["n"] == 2 and "BLEU-4" in r["reports"]
    assert "dominant_tissue" in r["report_fields"]["fields"]
    g = r["grounding"]
    assert g["n"] == 2 and 0 <= g["mass_in_lesion"] <= 1 and 0 < g["chance_mass"] < 1
    assert len(g["overlays"]) == 1 and (out / g["overlays"][0]).stat().st_size > 1000
    assert "skipped" in r["retrieval"] and any("retrieval skipped" in n for n in r["notes"])
    md = (out / "results.md").read_text()
    assert "## Closed VQA" in md and "## Grounding" in md and "plots/closed_vqa_broad_category.png" in md
    shutil.copytree(out, test_output / "eval_run_synth", dirs_exist_ok=True)

    # resume: a torn line from a kill is cut off, the finished items are not asked again
    with open(out / "predictions.jsonl", "a") as fh:
        fh.write('{"task": "closed_vqa", "id": "0", "outp')
    assert main(args) == 0
    assert read_jsonl(out / "predictions.jsonl") == preds
    again = json.loads((out / "results.json").read_text())
    assert again["closed_vqa"]["overall"] == r["closed_vqa"]["overall"]

    # another checkpoint into the same folder is refused with a clear message
    other = tmp_path / "other_ckpt"
    shutil.copytree(tiny_checkpoint_dir, other)
    capsys.readouterr()
    assert main([*args[:2], "--checkpoint", str(other), *args[4:]]) == 2
    assert "another --out" in capsys.readouterr().err

    # SlideBench CSV whose Slide column names feature files in --features-dir
    feats = tmp_path / "feats"
    feats.mkdir()
    truth = read_jsonl(synth_dataset / "truth.jsonl")
    from slidechat.features.store import load_features

    for h5 in cache.rglob("*.h5"):
        sid = load_features(h5).attrs.get("slide_id")
        shutil.copy(h5, feats / f"{sid}.h5")
    bench = tmp_path / "SlideBench-VQA-mini.csv"
    with open(synth_dataset / "closed_vqa.csv", newline="") as src, open(bench, "w", newline="") as dst:
        rows = [row for row in csv.reader(src)]
        kept = [rows[0]] + [row for row in rows[1:] if (feats / f"{row[1]}.h5").exists()][:3]
        kept.append(["999", "missing-slide", "X", "Microscopy", "n", "q?", "a", "b", "", "", "A"])
        csv.writer(dst).writerows(kept)
    out2 = tmp_path / "bench"
    assert main(["eval", "run", "--checkpoint", str(tiny_checkpoint_dir), "--data", str(bench), "--out", str(out2),
                 "--features-dir", str(feats), "--mcq-max-new-tokens", "4", "--bootstrap", "50", "--no-progress"]) == 0
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["closed_vqa"]["overall"]["n"] == 4 and r2["closed_vqa"]["errors"] == ["999"]
    assert any(p["status"] == "error" and "missing-slide" in p["error"] for p in read_jsonl(out2 / "predictions.jsonl"))
    assert len(truth) >= 2


def test_eval_run_retrieval_with_stage0_heads(synth_dataset, tiny_checkpoint_dir, feature_cache, tmp_path):
    """A checkpoint with (random) stage-0 retrieval heads gets recall@K and zero-shot numbers."""
    from slidechat.model.retrieval import RetrievalHeads, save_retrieval_heads

    ckpt = tmp_path / "ckpt_with_heads"
    shutil.copytree(tiny_checkpoint_dir, ckpt)
    llm_hidden = 64  # the tiny LLM's hidden size: slide tokens and LLM text features are both 64-d
    torch.manual_seed(0)
    save_retrieval_heads(RetrievalHeads(llm_hidden, llm_hidden, 16), ckpt, text_encoder="llm",
                         text_dim=llm_hidden, embed_dim=16)
    out = tmp_path / "ret"
    assert main(["eval", "run", "--checkpoint", str(ckpt), "--data", str(synth_dataset), "--out", str(out),
                 "--tasks", "retrieval", "--cache-dir", str(feature_cache), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())["retrieval"]
    n = len(read_jsonl(synth_dataset / "captions.jsonl"))
    assert r["n"] == n and "skipped" not in r
    for direction in ("slide_to_text", "text_to_slide"):
        assert 0 <= r[direction]["R@1"] <= r[direction]["R@5"] == 1.0  # R@5 covers all of <= 5 candidates
    assert 0 <= r["zero_shot_accuracy"] <= 1
    assert "## Retrieval" in (out / "results.md").read_text()
