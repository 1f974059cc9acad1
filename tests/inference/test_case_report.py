"""`slidechat report --cases`: one record per case over all its slides; a broken slide fails only its case."""

from __future__ import annotations

import shutil

import pytest

from slidechat.cli import main
from slidechat.synth.cases import generate_case_dataset
from slidechat.utils.io import read_jsonl

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_report_cases_csv_one_record_per_case_and_resume(tiny_checkpoint_dir, cmu_slide, tmp_path, capsys):
    synth = tmp_path / "synth"
    generate_case_dataset(synth, 1, seed=5, size="tiny", min_slides=2, max_slides=2)
    slides = sorted((synth / "slides").glob("*.tiff"))
    shutil.copy(cmu_slide, tmp_path / "skin.svs")
    (tmp_path / "broken.svs").write_text("not a slide")
    cases = tmp_path / "cases.csv"
    cases.write_text("case_id,slide_path,label\n"
                     f"C-synth,{slides[0]},A1 H&E\nC-synth,{slides[1]},A2 H&E\n"
                     "C-broken,skin.svs,skin\nC-broken,broken.svs,bad block\n"
                     f"C-mixed,skin.svs,skin\nC-mixed,{slides[0]},synthetic\n")
    out = tmp_path / "out"
    args = ["report", "--cases", str(cases), "--out", str(out), "--checkpoint", str(tiny_checkpoint_dir),
            "--max-new-tokens", "3", "--summary-max-new-tokens", "4", "--no-progress", "--no-prefetch",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "2 ok, 1 error" in capsys.readouterr().err
    recs = read_jsonl(out / "reports.jsonl")
    assert [r["id"] for r in recs] == ["C-synth", "C-broken", "C-mixed"]
    ok = [r for r in recs if r["status"] == "ok"]
    for r in ok:
        assert len(r["slides"]) == 2 and r["report_text"] and r["fields"]
        assert r["num_patches"] == sum(s["num_patches"] for s in r["slides"])
        for s in r["slides"]:
            assert (out / s["thumbnail_path"]).is_file() and (out / s["heatmap_path"]).is_file()
    assert [s["label"] for s in ok[0]["slides"]] == ["A1 H&E", "A2 H&E"]
    broken = recs[1]
    assert "slide 2 of case C-broken" in broken["error"] and "broken.svs" in broken["error"]
    assert [s["label"] for s in broken["slides"]] == ["skin", "bad block"]
    page = (out / "index.html").read_text()
    assert "Slide 2 (A2 H&amp;E)" in page and "C-broken" in page
    # resume: nothing is asked again
    assert main(args) == 0
    assert read_jsonl(out / "reports.jsonl") == recs
    # slides and --cases together, or neither: one clear line
    assert main(["report", str(slides[0]), "--cases", str(cases), "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
