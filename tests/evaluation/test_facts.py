"""Fact-level checker: hand-written answers per SynthSlide question type, caption/report contradictions, and the
new columns of `slidechat eval run`."""

from __future__ import annotations

import json

import pytest

from slidechat.evaluation.metrics.facts import check_answer, check_text

NO_LESION = {"slide_id": "s0", "classes_present": ["stroma", "normal_glands", "lymphocytes"],
             "area_fractions": {"stroma": 0.28, "normal_glands": 0.42, "lymphocytes": 0.30},
             "dominant_class": "normal_glands", "tumor_fraction": 0.0, "n_fragments": 3, "lesion": None}
TUMOUR = {"slide_id": "s1", "classes_present": ["stroma", "tumor", "lymphocytes"],
          "area_fractions": {"stroma": 0.10, "tumor": 0.05, "lymphocytes": 0.85},
          "dominant_class": "lymphocytes", "tumor_fraction": 0.05, "n_fragments": 1,
          "lesion": {"class": "tumor", "quadrant": "upper-left", "area_fraction": 0.05}}

ANSWERS = [  # (category, question, truth, answer, verdict)
    ("composition", "", NO_LESION, "The slide contains normal glands (~42%), lymphocyte-rich infiltrate (~30%) and "
                                   "fibrous stroma (~28%).", "correct"),
    ("composition", "", NO_LESION, "stroma, glands and lymphocytes", "correct"),
    ("composition", "", NO_LESION, "fibrous stroma", "wrong"),
    ("composition", "", NO_LESION, "normal glands (~80%), fibrous stroma (~10%), lymphocytes (~10%)", "wrong"),
    ("composition", "", NO_LESION, "Fibrous stroma and normal glands. There is no fibrous stroma.", "hedged"),
    ("composition", "", NO_LESION, "I cannot tell.", "unparseable"),
    ("dominant", "", NO_LESION, "The predominant tissue is normal glands.", "correct"),
    ("dominant", "", NO_LESION, "Mostly fibrous stroma.", "wrong"),
    ("dominant", "", NO_LESION, "normal glands or fibrous stroma", "hedged"),
    ("dominant", "", NO_LESION, "It is hard to say.", "unparseable"),
    ("tumor_presence", "", TUMOUR, "Yes, tumour occupies about 5% of the tissue.", "correct"),
    ("tumor_presence", "", TUMOUR, "carcinoma (tumour focus)", "correct"),
    ("tumor_presence", "", TUMOUR, "Yes, tumour occupies about 60% of the tissue.", "wrong"),
    ("tumor_presence", "", NO_LESION, "No, no tumour is seen.", "correct"),
    ("tumor_presence", "", NO_LESION, "Yes, there is a carcinoma.", "wrong"),
    ("tumor_presence", "", TUMOUR, "Yes. No tumour is seen.", "hedged"),
    ("tumor_presence", "", TUMOUR, "lymphoid aggregate", "unparseable"),
    ("presence", "Is adipose tissue present in this slide?", NO_LESION, "No, there is no adipose tissue.", "correct"),
    ("presence", "Is fibrous stroma present in this slide?", NO_LESION, "Yes, fibrous stroma is present (~28% of "
                                                                         "tissue).", "correct"),
    ("presence", "Is adipose tissue present in this slide?", NO_LESION, "adipose tissue", "wrong"),
    ("presence", "Is fibrous stroma present in this slide?", NO_LESION, "Yes, but no fibrous stroma.", "hedged"),
    ("presence", "Is adipose tissue present in this slide?", NO_LESION, "necrosis", "unparseable"),
    ("lesion", "", TUMOUR, "Yes, a carcinoma (tumour focus) in the upper-left quadrant.", "correct"),
    ("lesion", "", NO_LESION, "No focal lesion is identified.", "correct"),
    ("lesion", "", NO_LESION, "none", "correct"),
    ("lesion", "", TUMOUR, "Yes, a lymphoid aggregate in the upper-left quadrant.", "wrong"),
    ("lesion", "", TUMOUR, "carcinoma (tumour focus)", "wrong"),  # no location given
    ("lesion", "", NO_LESION, "A necrotic focus in the lower-right quadrant.", "wrong"),
    ("lesion", "", TUMOUR, "A carcinoma in the upper-left or lower-right quadrant.", "hedged"),
    ("lesion", "", NO_LESION, "No focal lesion; a carcinoma in the lower-left quadrant.", "hedged"),
    ("lesion", "", TUMOUR, "Difficult to assess.", "unparseable"),
    ("fragments", "", NO_LESION, "There are three.", "correct"),
    ("fragments", "", NO_LESION, "3 tissue fragments", "correct"),
    ("fragments", "", NO_LESION, "11", "wrong"),
    ("fragments", "", NO_LESION, "two or three fragments", "hedged"),
    ("fragments", "", NO_LESION, "several", "unparseable"),
]


@pytest.mark.parametrize("category,question,truth,answer,verdict", ANSWERS)
def test_open_answer_verdicts(category, question, truth, answer, verdict):
    assert check_answer(category, answer, truth, question).verdict == verdict


def test_every_question_type_has_all_four_verdicts_covered():
    seen = {(c, v) for c, _, _, _, v in ANSWERS}
    for category in ("composition", "dominant", "tumor_presence", "presence", "lesion", "fragments"):
        assert {v for c, v in seen if c == category} == {"correct", "wrong", "hedged", "unparseable"}, category


CLEAN_CAPTION = ("The slide shows one tissue fragment made up of lymphocyte-rich infiltrate (~85%), fibrous stroma "
                 "(~10%) and tumour (~5%). A carcinoma (tumour focus) occupies about 5% of the tissue, in the "
                 "upper-left quadrant of the specimen. Tumour fraction: 5% of tissue area.")
CLEAN_REPORT = ("SPECIMEN: synthetic H&E whole-slide image.\nMICROSCOPY: 3 fragment(s); tissue types: normal glands "
                "(~42%), lymphocyte-rich infiltrate (~30%) and fibrous stroma (~28%).\nLESION: none.\nTUMOUR FRACTION: "
                "0.0% (none (0%)).\nNECROSIS: absent.\nDIAGNOSIS: benign tissue, no lesion.")
MODEL_REPORT = ("TISSUE TYPES: fibrous stroma, normal glands, lymphocyte-rich infiltrate.\nDOMINANT TISSUE: normal "
                "glands.\nLESION: none.\nTUMOUR FRACTION: 0%.\nNECROSIS: no.\nSUMMARY: three tissue fragments.")


@pytest.mark.parametrize("text,truth", [(CLEAN_CAPTION, TUMOUR), (CLEAN_REPORT, NO_LESION),
                                        (MODEL_REPORT, NO_LESION)])
def test_clean_texts_all_facts_right_and_no_false_alarm(text, truth):
    facts = check_text(text, truth)
    assert facts.contradictions == []
    assert facts.precision == 1.0, facts.to_dict()
    assert facts.recall >= 0.6


def test_caption_facts_wrong_claims_lower_precision_and_recall():
    facts = check_text("Two tissue fragments of adipose tissue (~60%) and fibrous stroma (~40%). No tumour is seen.",
                       TUMOUR)
    assert facts.precision < 0.5 and facts.recall < 0.3
    assert "fragments=2" in facts.to_dict()["wrong_claims"]


@pytest.mark.parametrize("text,kind", [
    ("Fibrous stroma (~60%) and lymphocyte-rich infiltrate (~40%). No tumour is seen. Tumour fraction: 5% of tissue "
     "area.", "tumour_absent_and_present"),
    ("A carcinoma (tumour focus) in the upper-left quadrant. No tumour is seen.", "tumour_absent_and_present"),
    ("Normal glands (~80%), necrosis (~50%) and fibrous stroma (~30%).", "percentages_over_100"),
    ("LESION: not determined, lower-left.\nNo focal lesion is identified.", "no_lesion_but_lesion_described"),
    ("Carcinoma (tumour focus) (tumour focus) in the upper-left quadrant.", "repeated_qualifier"),
    ("A lymphoid aggregate (lymphoid aggregate) in the upper-left quadrant.", "repeated_qualifier"),
    ("Three tissue fragments. 2 fragment(s).", "conflicting_fragments"),
    ("A necrotic focus in the upper-left quadrant and in the lower-right quadrant.", "conflicting_lesion_location"),
    ("Fibrous stroma (~10%) and fibrous stroma (~10%).", "tissue_listed_twice"),
    ("Adipose tissue is present. There is no adipose tissue.", "tissue_absent_and_present"),
])
def test_each_contradiction_kind_is_detected(text, kind):
    assert kind in check_text(text, TUMOUR).contradictions


MID_TUMOUR = {**TUMOUR, "tumor_fraction": 0.15,
              "area_fractions": {"stroma": 0.10, "tumor": 0.15, "lymphocytes": 0.75}}


@pytest.mark.parametrize("answer,truth,verdict", [
    ("Yes, tumour is present (10-30% of the tissue area).", MID_TUMOUR, "correct"),
    ("Yes, tumour is present (10-30% of the tissue area).", TUMOUR, "wrong"),      # 5% is outside the range
    ("Yes. Tumour makes up under 10% of the tissue.", TUMOUR, "correct"),
    ("Yes. Tumour makes up under 10% of the tissue.", MID_TUMOUR, "wrong"),
    ("Yes, tumour is present (over 30% of the tissue area).", MID_TUMOUR, "wrong"),
    ("Yes, tumour is present (over 30% of the tissue area).", {**MID_TUMOUR, "tumor_fraction": 0.34}, "correct"),
])
def test_a_stated_range_holds_only_for_a_truth_inside_it(answer, truth, verdict):
    assert check_answer("tumor_presence", answer, truth).verdict == verdict


def test_tumour_fraction_range_in_a_caption():
    right = check_text("One tissue fragment. Tumour fraction: 10-30% of the tissue area.", MID_TUMOUR)
    wrong = check_text("One tissue fragment. Tumour fraction: 10-30% of the tissue area.", TUMOUR)
    assert right.precision == 1.0 and right.contradictions == []
    assert "tissue_percent:tumor=20.0" in wrong.to_dict()["wrong_claims"]


def test_every_generator_phrasing_is_read_as_right(synth_dataset):
    """The open answers and descriptions the demo is taught (every paraphrase) state only true facts, in words the
    checker reads: a model that learnt them exactly would score 100%."""
    import numpy as np

    from slidechat.synth import text as T
    from slidechat.utils.io import read_jsonl

    truths = read_jsonl(synth_dataset / "truth.jsonl") + [{**TUMOUR, "index": 90}, {**NO_LESION, "index": 91},
                                                           {**MID_TUMOUR, "index": 92}]
    seen = set()
    for t in truths:
        for r in range(12):
            rng = np.random.default_rng([t["index"], r])
            for q in T.open_questions(t, rng):
                v = check_answer(q["category"], q["answer"], t, q["question"])
                assert v.verdict == "correct", (q, v)
                seen.add(q["answer"].split(" ")[0])
            text = T.description(t, rng)
            facts = check_text(text, t)
            assert facts.precision == 1.0 and facts.contradictions == [], (text, facts.to_dict())
            assert facts.recall >= 0.5
    assert {"Yes,", "No,", "The"} <= seen  # several phrasings were drawn


def test_eval_run_reports_fact_columns_on_demo_checkpoint(synth_dataset, tmp_path):
    from slidechat.cli import main

    out = tmp_path / "run"
    args = ["eval", "run", "--checkpoint", "demo", "--data", str(synth_dataset), "--out", str(out),
            "--tasks", "open_vqa", "captioning", "reports", "--limit", "2", "--max-new-tokens", "16",
            "--no-meteor", "--no-embedding", "--bootstrap", "100", "--no-progress", "--no-plots"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    ov = r["facts"]["open_vqa"]
    assert ov["overall"]["n"] == 2 and 0 <= ov["overall"]["accuracy"] <= 1
    assert sum(ov["overall"][k] for k in ("correct", "wrong", "hedged", "unparseable")) == 2
    for task in ("captioning", "reports"):
        for key in ("fact_recall", "contradiction_rate"):
            e = r["facts"][task][key]
            assert e["n"] == 2 and 0 <= e["ci_low"] <= e["value"] <= e["ci_high"] <= 1
    assert "BLEU-1" in r["open_vqa"] and "ROUGE-L" in r["captioning"]  # secondary columns kept
    md = (out / "results.md").read_text()
    assert "## Open VQA fact accuracy" in md and "## Caption and report facts" in md
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all("facts" in s for s in scores if s["task"] in ("open_vqa", "captioning", "reports"))


def test_eval_score_open_answers_get_fact_accuracy(synth_dataset, tmp_path):
    """`eval score` on open answers: truth.jsonl next to the gold file gives the per-type fact accuracy."""
    from slidechat.cli import main
    from slidechat.utils.io import read_jsonl

    gold = read_jsonl(synth_dataset / "open_vqa.jsonl")
    pred = tmp_path / "pred.jsonl"
    wrong_fragments = {r["id"] for r in gold if r["category"] == "fragments"}
    pred.write_text("".join(json.dumps({"id": r["id"], "output": "eleven" if r["id"] in wrong_fragments
                                        else r["answer"]}) + "\n" for r in gold))
    out = tmp_path / "score"
    assert main(["eval", "score", "--pred", str(pred), "--gold", str(synth_dataset / "open_vqa.jsonl"), "--out",
                 str(out), "--no-meteor", "--no-embedding"]) == 0
    facts = json.loads((out / "results.json").read_text())["facts"]["open_vqa"]
    per = facts["per_category"]
    assert per["fragments"]["accuracy"] == 0.0 and per["fragments"]["wrong"] == len(wrong_fragments)
    assert all(e["accuracy"] == 1.0 for c, e in per.items() if c != "fragments")
    assert "## Open VQA fact accuracy" in (out / "results.md").read_text()
