"""The shipped demo checkpoint, end to end on the real offline assets (SmolLM2 GGUF + trained slide side)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import slidechat
from slidechat.evaluation.answer_parser import parse_choice
from slidechat.inference.api import DEMO_DIR
from slidechat.prompts import format_mcq

# one thread: on a shared 2-core machine a second OpenMP thread mostly spin-waits
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def demo():
    """The shipped checkpoint, loaded once for this module."""
    return slidechat.load("demo", device="cpu")


def test_demo_checkpoint_loads_encodes_answers_in_format_and_points(demo, synth_dataset, tmp_path):
    assert (DEMO_DIR / "config.json").is_file() and (DEMO_DIR / "model.safetensors").is_file()
    assistant = demo

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


def test_demo_checkpoint_three_turns_heatmaps_and_report(demo, synth_dataset, tmp_path):
    """The shipped checkpoint (12 concept tokens before 16 query tokens) through the user path: every heatmap
    weighting before the first question and after each of three turns, then the report."""
    assistant = demo
    assert assistant.num_slide_tokens == 12 + 16
    slide = assistant.encode_slide(next((synth_dataset / "slides").glob("*.tiff")), cache_dir=tmp_path / "cache")
    conv = assistant.chat(slide)
    n = slide.num_patches
    for weighting in ("uniform", "llm"):
        heat = conv.heatmap(weighting=weighting)
        assert heat.scores.shape == (n,) and np.isclose(heat.scores.max(), 1.0)
    for question in ("Which tissue types are present in this slide?", "Describe this slide.",
                     "Is there tumour? Where?"):
        assert conv.ask(question, max_new_tokens=24).strip()
        maps = {w: conv.heatmap(weighting=w) for w in ("uniform", "llm")}
        for heat in maps.values():
            assert heat.scores.shape == (n,) and heat.scores.min() >= 0.0 and np.isclose(heat.scores.max(), 1.0)
        assert not np.allclose(maps["uniform"].scores, maps["llm"].scores)  # the LLM's attention re-weights queries
    evidence = conv.evidence(k=4)
    assert len(evidence) == 4 and evidence[0].score == 1.0
    # a question about the most attended region: its own patches, the slide conversation untouched
    fed = list(conv._fed)
    x, y, w, h = evidence[0].box
    assert conv.ask("Which tissue types are present in this slide?", region=(x - w, y - h, 3 * w, 3 * h),
                    max_new_tokens=16).strip()
    assert conv._fed == fed and len(conv.messages) == 6
    report = assistant.report(slide, max_new_tokens=12, summary_max_new_tokens=16)
    assert report.fields["tissue_types"] and report.to_markdown().startswith("## ")
    assert len(report.to_dict()["evidence"]) == 4 and "**Evidence**" in report.to_markdown()
