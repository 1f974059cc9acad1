"""Metric values against hand-computed references on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slidechat.evaluation.metrics.bootstrap import bootstrap_ci
from slidechat.evaluation.metrics.captioning import caption_metrics, java_available, regex_tokenize
from slidechat.evaluation.metrics.grounding import grounding_metrics, patch_lesion_fraction, summarize_grounding
from slidechat.evaluation.metrics.report_fields import compare_field, report_field_accuracy
from slidechat.evaluation.metrics.retrieval import recall_at_k, retrieval_metrics, zero_shot_accuracy


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    x = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    a, b = bootstrap_ci(x, 2000, seed=3), bootstrap_ci(x, 2000, seed=3)
    assert a == b
    mean, lo, hi = a
    assert mean == pytest.approx(0.7)
    assert lo < 0.7 < hi
    # binomial normal approximation: se = sqrt(.7*.3/10) = 0.145 -> a 95% CI ~ +-0.28
    assert 0.2 < hi - lo < 0.75
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


# ------------------------------------------------------------------------------------------ captions
PRED = {"1": "the cat sat on the mat", "2": "a dog runs in the park."}
REFS = {"1": ["the cat is on the mat"], "2": ["a dog runs in the park"]}


def test_bleu_rouge_cider_hand_computed():
    m = caption_metrics(PRED, REFS, use_java=False)
    # corpus BLEU-1: clipped unigram matches (5 + 6) / hypothesis length (6 + 6); no brevity penalty
    assert m["BLEU-1"] == pytest.approx(11 / 12, abs=1e-6)
    # corpus BLEU-2: sqrt(p1 * p2), bigram precision (3 + 5) / (5 + 5)
    assert m["BLEU-2"] == pytest.approx(math.sqrt(11 / 12 * 8 / 10), abs=1e-6)
    # ROUGE-L (beta 1.2): item 1 LCS = 5 of 6 tokens both ways -> F = 5/6; item 2 identical -> 1
    assert m["ROUGE-L"] == pytest.approx((5 / 6 + 1) / 2, abs=1e-9)
    assert m["per_item"]["2"]["ROUGE-L"] == pytest.approx(1.0)
    assert m["METEOR"] is None and any("java" in n for n in m["notes"])
    assert 0 < m["sacreBLEU"] <= 100


def test_cider_is_ten_for_identical_distinct_captions():
    # with 2 documents, n-grams unique to one doc have idf log(2); shared ones 0; identical hyp -> cosine 1 -> x10
    refs = {"1": ["red blue green yellow"], "2": ["black white gray brown"]}  # 4 words: every n-gram order exists
    m = caption_metrics({k: v[0] for k, v in refs.items()}, refs, use_java=False)
    assert m["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_empty_prediction_scores_zero_not_crash():
    m = caption_metrics({"1": "", "2": "x y z"}, {"1": "abc def", "2": "x y z"}, use_java=False)
    assert m["per_item"]["1"]["ROUGE-L"] == 0.0 and m["per_item"]["2"]["ROUGE-L"] == 1.0


def test_regex_tokenizer_drops_punctuation_like_coco():
    assert regex_tokenize("A dog, runs: in the PARK.") == "a dog runs in the park"
    assert regex_tokenize("31% tumour; 0.5 mm") == "31 % tumour 0.5 mm"


@pytest.mark.skipif(not java_available(), reason="java not installed")
def test_ptb_tokenizer_with_java_gives_same_bleu():
    m = caption_metrics(PRED, REFS, use_java=True, with_meteor=False)
    assert m["BLEU-1"] == pytest.approx(11 / 12, abs=1e-6) and m["notes"] == []


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="java not installed")
def test_meteor_runs_and_orders_hypotheses():
    good = caption_metrics({"1": "the cat is on the mat"}, {"1": "the cat is on the mat"}, use_java=True)
    bad = caption_metrics({"1": "a dog barked"}, {"1": "the cat is on the mat"}, use_java=True)
    assert good["METEOR"] > bad["METEOR"] >= 0


def test_embedding_similarity_minilm():
    from slidechat.evaluation.metrics.embedding import embedding_similarity, minilm_path

    assert (minilm_path() / "model.safetensors").exists()
    r = embedding_similarity({"a": "tumour cells in the stroma", "b": "adipose tissue"},
                             {"a": ["tumour cells in the stroma", "fat"], "b": "a carcinoma focus"})
    assert r["per_item"]["a"] == pytest.approx(1.0, abs=1e-4)  # max over references, identical text
    assert r["per_item"]["b"] < 0.8
    assert r["embedding_similarity"] == pytest.approx((r["per_item"]["a"] + r["per_item"]["b"]) / 2)


# ------------------------------------------------------------------------------------------ grounding
def _mask():
    mask = np.zeros((10, 10), bool)  # downsample 10 -> a 100x100 level-0 slide; lesion = top-left 50x50
    mask[:5, :5] = True
    return mask


def test_grounding_hand_computed():
    coords = np.array([[0, 0], [50, 0], [0, 50], [50, 50], [0, 30]])
    frac = patch_lesion_fraction(_mask(), coords, 50, 10)
    # last patch spans y 30..80 of which 30..50 is lesion: 20/50
    np.testing.assert_allclose(frac, [1, 0, 0, 0, 0.4])
    m = grounding_metrics([0.9, 0.1, 0.0, 0.0, 1.0], coords, 50, _mask(), 10)
    # top patch (0,30): centre (25,55) -> mask pixel (x2, y5) is outside the lesion rows 0-4
    assert m["pointing_hit"] is False
    assert m["mass_in_lesion"] == pytest.approx((0.9 * 1 + 1.0 * 0.4) / 2.0)
    assert m["chance_pointing"] == pytest.approx(1 / 5) and m["chance_mass"] == pytest.approx(1.4 / 5)
    hit = grounding_metrics([1.0, 0.1, 0.0, 0.0, 0.2], coords, 50, _mask(), 10)
    assert hit["pointing_hit"] is True
    s = summarize_grounding([m, hit])
    assert s["pointing_game"] == 0.5 and s["n"] == 2


def test_grounding_patch_off_the_mask_edge_is_diluted():
    # x -20..30: 30 of its 50 px lie on the mask (and on the lesion); the rest is off the slide
    frac = patch_lesion_fraction(_mask(), np.array([[-20, 0], [90, 90]]), 50, 10)
    np.testing.assert_allclose(frac, [0.6, 0.0])


# ------------------------------------------------------------------------------------------ retrieval
def test_recall_at_k_hand_computed():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.1, 0.2, 0.3]])
    r = recall_at_k(sim, ks=(1, 2))
    # row 0 rank 1, row 1 rank 2 (0.8 > 0.5), row 2 rank 1
    assert r["R@1"] == pytest.approx(2 / 3) and r["R@2"] == 1.0 and r["median_rank"] == 1.0
    both = retrieval_metrics(sim, ks=(1, 5, 10))
    # columns: text 0 -> slide 0 best (0.9); text 1 -> slide 1 (0.5) best; text 2 -> slide 2 best
    assert both["text_to_slide"]["R@1"] == 1.0 and both["slide_to_text"]["R@1"] == pytest.approx(2 / 3)
    ties = recall_at_k(np.ones((2, 2)), ks=(1,))
    assert ties["R@1"] == 0.0  # ties count against the target
    assert zero_shot_accuracy([[0.1, 0.9], [0.7, 0.2], [0.3, 0.4]], [1, 0, 0]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ report fields
def test_report_field_rules():
    assert compare_field("35%", 0.3, 0.1) == (True, None)
    assert compare_field("35%", 17.7, 0.1, percent_field=True) == (False, None)
    assert compare_field(25.0, 17.7, 0.1, percent_field=True) == (True, None)
    assert compare_field(["Tumour", "fat"], ["fat", "tumour"]) == (True, 1.0)
    ok, jac = compare_field(["fat"], ["fat", "tumour"])
    assert not ok and jac == 0.5
    assert compare_field("yes", True)[0] and compare_field("absent", False)[0] and not compare_field("no", True)[0]
    assert compare_field(None, None)[0] and compare_field("none", None)[0] and not compare_field("upper-left", None)[0]
    assert compare_field("Fibrous stroma.", "fibrous stroma")[0]


def test_report_field_accuracy_aggregates():
    truth = [{"dominant_tissue": "stroma", "tumor_fraction_percent": 20.0, "specimen_fragments": 2},
             {"dominant_tissue": "fat", "tumor_fraction_percent": 0.0, "specimen_fragments": 1}]
    preds = [{"dominant_tissue": "stroma", "tumor_fraction_percent": 45.0},
             {"dominant_tissue": "fat", "tumor_fraction_percent": 5.0}]
    r = report_field_accuracy(list(zip(preds, truth)))
    assert r["fields"]["dominant_tissue"]["accuracy"] == 1.0
    assert r["fields"]["tumor_fraction_percent"]["accuracy"] == 0.5
    assert r["mean_field_accuracy"] == 0.75 and r["exact_report"] == 0.5
    assert r["not_predicted"] == ["specimen_fragments"]
