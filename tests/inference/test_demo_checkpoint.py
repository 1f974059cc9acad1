"""The shipped demo checkpoint, end to end on the real offline assets (SmolLM2 GGUF + trained slide side)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import slidechat
from slidechat.evaluation.answer_parser import parse_choice
from slidechat.inference.api import DEMO_DIR
from slidechat.inference.case import Case
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


def test_demo_case_of_a_scanner_slide_and_a_synthslide(demo, cmu_slide, synth_dataset, tmp_path):
    synth = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    slides = [demo.encode_slide(p, cache_dir=tmp_path / "cache") for p in (cmu_slide, synth)]
    conv = demo.chat(Case("C-1", slides, ["skin H&E", "synthetic H&E"]), max_new_tokens=24)
    k = demo.num_slide_tokens
    assert conv.slide_spans(conv.attended_ids()) and len(conv.slide_spans(conv.attended_ids())) == 2
    answers = [conv.ask("Which slide shows the focal lesion?"),
               conv.ask(format_mcq("Is tumour present in any of the slides?", {"A": "Yes", "B": "No"}))]
    assert all(isinstance(a, str) and a.strip() for a in answers)
    assert conv.last_prefill_tokens < 2 * k  # turn 2 fed only its own tokens, not both slides again
    maps = [conv.heatmap("llm", slide=i) for i in range(2)]
    assert [len(m.scores) for m in maps] == [s.num_patches for s in slides]
    assert all(np.isfinite(m.scores).all() and m.scores.max() == pytest.approx(1.0) for m in maps)
    ev = conv.evidence(4)
    assert len(ev) == 4 and {r.slide for r in ev} <= {0, 1}
    for r in ev:  # every box lies inside its own slide
        w, h = slides[r.slide].features.attrs["slide_width"], slides[r.slide].features.attrs["slide_height"]
        assert 0 <= r.box[0] and r.box[0] + r.box[2] <= w and 0 <= r.box[1] and r.box[1] + r.box[3] <= h
    # the whole-slide answer of one slide is unchanged by the case machinery (S = 1 path)
    alone = demo.chat(slides[1], max_new_tokens=12).ask("Describe this slide.")
    again = demo.chat([slides[1]], max_new_tokens=12).ask("Describe this slide.")
    assert alone == again


def test_demo_chat_cli_on_a_case_warns_about_the_scanner_slide(cmu_slide, synth_dataset, tmp_path, capsys):
    from slidechat.cli import main

    synth = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    rc = main(["chat", "--slide", str(cmu_slide), "--slide", str(synth), "--label", "skin", "--label", "synthetic",
               "-q", "Which slide shows the focal lesion?", "--max-new-tokens", "16", "--no-stream", "--evidence", "2",
               "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip()  # an answer
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "unlike the slides this model was trained on" in warnings[0]
    assert out.err.index("slide 1 ") < out.err.index("warning: ") < out.err.index("slide 2 ")  # the scanner slide's
    assert sum(line.startswith("evidence ") for line in out.err.splitlines()) == 2


def test_demo_batch_report_on_cases(cmu_slide, synth_dataset, tmp_path):
    from slidechat.cli import main
    from slidechat.utils.io import read_jsonl

    synth = sorted((synth_dataset / "slides").glob("*.tiff"))
    cases = tmp_path / "cases.csv"
    cases.write_text(f"case_id,slide_path,label\nC-1,{cmu_slide},skin\nC-1,{synth[0]},synthetic\nC-2,{synth[1]},\n")
    out = tmp_path / "reports"
    assert main(["report", "--cases", str(cases), "--out", str(out), "--no-progress", "--no-prefetch",
                 "--max-new-tokens", "24", "--summary-max-new-tokens", "32", "--cache-dir", str(tmp_path / "cache")]) == 0
    recs = read_jsonl(out / "reports.jsonl")
    assert [r["id"] for r in recs] == ["C-1", "C-2"] and all(r["status"] == "ok" for r in recs), recs
    assert all(r["schema"] == "synthslide" and r["fields"] and r["report_text"].strip() for r in recs)
    assert [len(r["slides"]) for r in recs] == [2, 1]
    assert recs[0]["slides"][0]["ood"]["flagged"] and not recs[0]["slides"][1]["ood"]["flagged"]
    assert all((out / s["heatmap_path"]).is_file() for r in recs for s in r["slides"])
    assert "unlike the slides this model was trained on" in (out / "index.html").read_text()
