"""SynthSlide cases: the generator's files agree with the slides' own truth, and every reader takes them."""

from __future__ import annotations

import csv
import json

import pytest

from slidechat.errors import ConfigError
from slidechat.evaluation.benchmark_data import case_slides, load_benchmark
from slidechat.evaluation.slidebench import load_closed_vqa
from slidechat.inference.case import read_cases_csv
from slidechat.synth.cases import NO_LESION_SLIDE, compose_case_dataset, generate_case_dataset, plan_cases
from slidechat.training.data import SkipCounter, load_samples
from slidechat.utils.io import read_jsonl


@pytest.fixture(scope="module")
def case_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cases")
    generate_case_dataset(out, 3, seed=11, size="tiny", min_slides=2, max_slides=3)
    return out


def test_case_plan_is_deterministic_and_in_range():
    a, b = plan_cases(40, seed=3), plan_cases(40, seed=3)
    assert a == b and a != plan_cases(40, seed=4)
    assert all(2 <= p["n_slides"] <= 4 for p in a)
    assert all(p["lesion_slide"] is None or 0 <= p["lesion_slide"] < p["n_slides"] for p in a)
    assert any(p["lesion_slide"] is None for p in a) and any(p["lesion_slide"] is not None for p in a)
    with pytest.raises(ConfigError):
        plan_cases(2, seed=0, min_slides=3, max_slides=2)


def test_case_files_agree_with_the_slide_truth(case_folder):
    truth = {r["slide_id"]: r for r in read_jsonl(case_folder / "truth.jsonl")}
    cases = read_cases_csv(case_folder / "cases.csv")
    assert len(cases) == 3 and all(2 <= len(c) <= 3 for c in cases)
    assert sum(len(c) for c in cases) == len(truth)
    for case in cases:
        assert all(p.is_file() for p in case.slides)
        ids = [p.stem for p in case.slides]
        assert sum(truth[s]["lesion"] is not None for s in ids) <= 1  # "which slide" has one answer
        assert all(lab.endswith("H&E") for lab in case.labels)
    items = load_closed_vqa(case_folder / "case_closed_vqa.csv")
    assert len(items) == 3 * 3 and all(it.broad_category == "Case" for it in items)
    labels_of = {c.case_id: c.labels for c in cases}
    for it in items:
        ids = case_slides(it.slide)
        assert len(ids) >= 2 and all(s in truth for s in ids)
        # the Slide Labels column names the slides as cases.csv does
        assert case_slides(it.extra["Slide Labels"]) == labels_of[it.id.rsplit("-", 1)[0]]
        answer = it.options[it.answer]
        if it.narrow_category == "Lesion slide":
            lesion = [i for i, s in enumerate(ids) if truth[s]["lesion"] is not None]
            assert answer.startswith(f"Slide {lesion[0] + 1} ") if lesion else answer == NO_LESION_SLIDE
        elif it.narrow_category == "Tumour in any slide":
            assert answer == ("Yes" if any(truth[s]["tumor_fraction"] > 0 for s in ids) else "No")
        else:
            assert answer == str(sum("necrosis" in truth[s]["classes_present"] for s in ids))
    reports = read_jsonl(case_folder / "case_reports.jsonl")
    assert [r["case_id"] for r in reports] == [c.case_id for c in cases]
    assert all(r["report_text"].count("SLIDE ") == r["report"]["n_slides"] for r in reports)


def test_cases_composed_of_an_existing_dataset_reuse_its_slides(case_folder, tmp_path):
    truth = {r["slide_id"]: r for r in read_jsonl(case_folder / "truth.jsonl")}
    out = tmp_path / "composed"
    cases = compose_case_dataset(case_folder, out, 12, seed=5, min_slides=2, max_slides=3)
    assert cases == compose_case_dataset(case_folder, tmp_path / "again", 12, seed=5, min_slides=2, max_slides=3)
    assert not (out / "slides").exists()  # no new slides: the source's are named
    read = read_cases_csv(out / "cases.csv")
    assert [c.case_id for c in read] == [c["case_id"] for c in cases]
    for case in read:
        assert 2 <= len(case.slides) <= 3 and all(p.is_file() for p in case.slides)
        ids = [p.stem for p in case.slides]
        assert len(set(ids)) == len(ids) and sum(truth[s]["lesion"] is not None for s in ids) <= 1
    lesion_slides = [t["lesion_slides"] for t in read_jsonl(out / "case_truth.jsonl")]
    assert any(ls for ls in lesion_slides) and any(not ls for ls in lesion_slides)
    assert len(load_closed_vqa(out / "case_closed_vqa.csv")) == 12 * 3
    with pytest.raises(ConfigError, match="no truth.jsonl"):
        compose_case_dataset(tmp_path, tmp_path / "x", 2)
    with pytest.raises(ConfigError, match="at least 9 without"):
        compose_case_dataset(case_folder, tmp_path / "y", 2, max_slides=9)


def test_case_conversations_train_and_case_rows_evaluate(case_folder):
    skips = SkipCounter()
    samples = load_samples(case_folder / "case_instructions.json", "instructions", skips, require_image_tag=False)
    assert skips.total == 0 and len(samples) == 3
    cases = read_cases_csv(case_folder / "cases.csv")
    assert [s.keys for s in samples] == [[p.stem for p in c.slides] for c in cases]
    assert all(len(s.messages) == 6 for s in samples)
    for s, c in zip(samples, cases):  # the first turn names every slide before its placeholder
        first = s.messages[0]["content"].splitlines()
        assert first[: len(c)] == [f"Slide {i + 1} ({lab}): <slide>" for i, lab in enumerate(c.labels)]
    data = load_benchmark(case_folder)
    case_items = [it for it in data.closed_vqa if ";" in it.slide]
    assert len(case_items) == 9 and len(data.closed_vqa) > 9
    with open(case_folder / "case_closed_vqa.csv", newline="") as fh:
        assert next(csv.reader(fh))[:2] == ["ID", "Slide"]
    assert json.loads((case_folder / "dataset.json").read_text())["n_cases"] == 3
