"""The shipped demo checkpoint, end to end on the real offline assets (SmolLM2 GGUF + trained slide side)."""

from __future__ import annotations

import csv

import numpy as np
import torch

import slidechat
from slidechat.evaluation.answer_parser import parse_choice
from slidechat.inference.api import DEMO_DIR
from slidechat.prompts import format_mcq


def test_demo_checkpoint_loads_encodes_answers_in_format_and_points(synth_dataset, tmp_path):
    assert (DEMO_DIR / "config.json").is_file() and (DEMO_DIR / "model.safetensors").is_file()
    torch.set_num_threads(2)
    assistant = slidechat.load("demo", device="cpu")

    slide_path = next((synth_dataset / "slides").glob("*.tiff"))
    slide = assistant.encode_slide(slide_path, cache_dir=tmp_path / "cache")
    assert slide.features.num_patches > 50 and slide.features.coords is not None

    with open(synth_dataset / "closed_vqa.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Slide"] == slide.slide_id][:2]
    assert rows
    conv = assistant.chat(slide)
    for row in rows:
        options = {k: row[k] for k in "ABCD" if row[k]}
        answer = conv.ask(format_mcq(row["Question"], options), max_new_tokens=12)
        # the trained model answers in the taught format ("<option text> (<letter>)"): parseable to a letter
        assert parse_choice(answer, options) in options, answer

    heat = conv.heatmap()
    assert heat.scores.shape == (slide.features.num_patches,)
    assert np.isclose(heat.scores.max(), 1.0) and heat.scores.min() >= 0.0
    assert heat.scores.std() > 0.01  # a trained Q-Former attends to some patches more than to others
