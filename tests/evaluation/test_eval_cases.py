"""Case data through the user paths: `slidechat eval run` on case rows and `slidechat chat` with several
--slide (a real scanner slide beside a SynthSlide), on the tiny random checkpoint."""

from __future__ import annotations

import csv
import json

import pytest

from slidechat.cli import main
from slidechat.inference.pipeline import SlideChat
from slidechat.synth.cases import generate_case_dataset
from slidechat.utils.io import read_jsonl

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def two_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_cases")
    generate_case_dataset(out, 2, seed=23, size="tiny", min_slides=2, max_slides=2)
    return out


def test_eval_run_on_case_rows(two_cases, tiny_checkpoint_dir, tmp_path, monkeypatch):
    # a SlideBench-style CSV that holds only the case rows; slides are found in --slides-dir
    bench = tmp_path / "case_bench.csv"
    bench.write_text((two_cases / "case_closed_vqa.csv").read_text())
    out = tmp_path / "run"
    asked = []  # the case each question is asked of, as the model gets it
    real_chat = SlideChat.chat

    def chat(self, slide, *args, **kwargs):
        asked.append(list(slide.labels))
        return real_chat(self, slide, *args, **kwargs)

    monkeypatch.setattr(SlideChat, "chat", chat)
    args = ["eval", "run", "--checkpoint", str(tiny_checkpoint_dir), "--data", str(bench),
            "--slides-dir", str(two_cases / "slides"), "--out", str(out), "--tasks", "closed_vqa",
            "--mcq-max-new-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50", "--no-progress"]
    assert main(args) == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 6 and all(p["status"] == "ok" for p in preds), preds
    assert all(";" in p["slide_id"] for p in preds)
    # the slides are named as the CSV's Slide Labels column names them
    with open(bench, newline="") as fh:
        labels = {r["ID"]: r["Slide Labels"].split(";") for r in csv.DictReader(fh)}
    assert all(p["labels"] == labels[p["id"]] for p in preds)
    assert sorted(map(tuple, asked)) == sorted(tuple(labels[p["id"]]) for p in preds)
    assert all(lab.endswith("H&E") for case in asked for lab in case)
    result = json.loads((out / "results.json").read_text())["closed_vqa"]
    assert result["overall"]["n"] == 6
    assert set(result["narrow_category"]) == {"Lesion slide", "Tumour in any slide", "Necrosis count"}


def test_eval_run_names_the_missing_slide_of_a_case(two_cases, tiny_checkpoint_dir, tmp_path):
    with open(two_cases / "case_closed_vqa.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    rows[1][1] = rows[1][1] + ";no-such-slide"
    bench = tmp_path / "broken.csv"
    with open(bench, "w", newline="") as fh:
        csv.writer(fh).writerows(rows[:2])
    out = tmp_path / "run"
    assert main(["eval", "run", "--checkpoint", str(tiny_checkpoint_dir), "--data", str(bench), "--slides-dir",
                 str(two_cases / "slides"), "--out", str(out), "--tasks", "closed_vqa", "--mcq-max-new-tokens", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "20", "--no-progress"]) == 0
    (pred,) = read_jsonl(out / "predictions.jsonl")
    assert pred["status"] == "error" and "no-such-slide" in pred["error"]


def test_chat_cli_on_a_case_of_a_scanner_slide_and_a_synthslide(two_cases, tiny_checkpoint_dir, cmu_slide,
                                                               tmp_path, capsys):
    synth = sorted((two_cases / "slides").glob("*.tiff"))[0]
    heat = tmp_path / "heat.json"
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint_dir), "--slide", str(cmu_slide), "--slide", str(synth),
               "--label", "skin H&E", "--label", "synthetic", "-q", "Which slide shows the focal lesion?",
               "--max-new-tokens", "3", "--no-stream", "--evidence", "3", "--heatmap", str(heat),
               "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "slide 1 " in captured.err and "slide 2 " in captured.err
    evidence = [line for line in captured.err.splitlines() if line.startswith("evidence ")]
    assert len(evidence) == 3 and all("Slide 1 (skin H&E):" in e or "Slide 2 (synthetic):" in e for e in evidence)
    maps = json.loads(heat.read_text())["slides"]
    assert len(maps) == 2 and all(len(m["scores"]) == len(m["coords"]) > 0 for m in maps)
    # a region on the second slide, named by --region-slide
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint_dir), "--slide", str(cmu_slide), "--slide", str(synth),
               "-q", "What is here?", "--region", "0,0,4608,3584", "--region-slide", "2", "--max-new-tokens", "2",
               "--no-stream", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and "region (0, 0, 4608, 3584):" in capsys.readouterr().err
    rc = main(["chat", "--checkpoint", str(tiny_checkpoint_dir), "--slide", str(cmu_slide), "--slide", str(synth),
               "-q", "x", "--region", "0,0,10,10", "--region-slide", "3", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2 and "--region-slide must be 1..2" in capsys.readouterr().err
