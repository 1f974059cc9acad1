"""Concepts read from patch-level class probabilities: the aggregation, the shape of a focus, the config, training
on real features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidechat.errors import ConfigError
from slidechat.model.assistant import SlideAssistant
from slidechat.model.config import QFormerConfig
from slidechat.model.patch_readout import FOCUS_FEATURES, PatchClassReadout, focus_shape_features
from slidechat.synth.classes import TISSUE_CLASSES
from slidechat.synth.patch_labels import patch_class_shares
from slidechat.training.patch_readout import PatchReadoutConfig, read_spec, train_patch_readout

CLASSES = ["a", "b", "c"]
CONCEPTS = [{"name": "dominant", "words": ["x", "y", "z"], "read": "patch_share"},
            {"name": "present_c", "words": ["c", "absent"], "read": "patch_presence", "class": "c"}]


def _logits_for(probs: np.ndarray) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_shares_are_the_area_weighted_mean_over_tissue():
    # two full-tissue patches of class a, one half-glass patch of class b: b covers 0.5 / 2.5 of the tissue
    probs = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]]) + 1e-9
    shares, expected = PatchClassReadout.aggregate(_logits_for(probs / probs.sum(1, keepdims=True)))
    assert torch.allclose(shares, torch.tensor([2 / 2.5, 0.5 / 2.5, 0.0]), atol=1e-5)
    assert torch.allclose(expected, torch.tensor([2.0, 0.5, 0.0]), atol=1e-5)


def test_presence_grows_with_the_expected_area_and_dominant_follows_the_largest_share():
    readout = PatchClassReadout(8, CLASSES, CONCEPTS).requires_grad_(False)
    small = readout.concept_logits(torch.tensor([0.6, 0.39, 0.01]), torch.tensor([60.0, 39.0, 1.0]))
    large = readout.concept_logits(torch.tensor([0.3, 0.2, 0.5]), torch.tensor([30.0, 20.0, 50.0]))
    assert float(large["present_c"][0]) > float(small["present_c"][0])
    assert float(small["present_c"][1]) == 0.0  # the absent word's logit is the fixed reference
    assert int(small["dominant"].argmax()) == 0 and int(large["dominant"].argmax()) == 2


def test_bins_split_the_share_and_none_is_the_absence():
    bins = {"name": "fraction", "words": ["none", "low", "mid", "high"], "read": "patch_bins", "class": "c",
            "edges": [0.1, 0.3]}
    readout = PatchClassReadout(8, CLASSES, [bins]).requires_grad_(False)
    for share, expected, word in [(0.05, 5.0, 1), (0.2, 20.0, 2), (0.5, 50.0, 3), (0.0, 0.0, 0)]:
        lg = readout.concept_logits(torch.tensor([1 - share, 0.0, share]), torch.tensor([100 - expected, 0, expected]))
        assert int(lg["fraction"].argmax()) == word, (share, lg["fraction"])
        assert torch.allclose(torch.softmax(lg["fraction"], -1).sum(), torch.tensor(1.0), atol=1e-3)


@pytest.mark.parametrize("concept, message", [
    ({"name": "d", "words": ["x", "y"], "read": "patch_share"}, "one word per patch class"),
    ({"name": "p", "words": ["c", "absent"], "read": "patch_presence", "class": "q"}, "not one of the patch classes"),
    ({"name": "p", "words": ["c", "absent"], "read": "patch_max"}, "is not one of"),
    ({"name": "b", "words": ["n", "l", "h"], "read": "patch_bins", "class": "c", "edges": [0.3, 0.1]}, "increasing"),
    ({"name": "b", "words": ["n", "l", "h"], "read": "patch_bins", "class": "c", "edges": [0.1, 0.3]}, "need 4 words"),
    ({"name": "f", "words": ["a", "none"], "read": "patch_focus", "classes": ["q"]}, "needs classes"),
    ({"name": "f", "words": ["a", "c"], "read": "patch_focus", "classes": ["a", "c"]}, "need 3 words"),
])
def test_concepts_the_patch_classes_cannot_answer_are_config_errors(concept, message):
    with pytest.raises(ConfigError, match=message):
        QFormerConfig(patch_classes=CLASSES, concepts=[concept])
    with pytest.raises(ConfigError, match="patch_classes is empty"):
        QFormerConfig(concepts=[CONCEPTS[0]])


def _grid(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs.ravel(), ys.ravel()], 1)


def test_focus_shape_numbers_tell_one_compact_area_from_several_irregular_ones():
    grid = _grid(16, 16)
    x, y = grid[:, 0], grid[:, 1]
    disc = (np.hypot(x - 5, y - 9) < 3.6).astype(np.float32)
    pieces = (((x < 2) & (y < 9)) | ((y < 2) & (x < 8)) | ((x > 11) & (y > 12)) | ((y == 8) & (x > 6))
              | ((x == 14) & (y < 5)))  # an L and three bars
    probs = np.stack([1 - disc - 0.5 * pieces, disc, 0.5 * pieces + 0.25 * pieces], 1).clip(0, 1)
    f = focus_shape_features(probs.astype(np.float32), grid, [1, 2]).reshape(2, FOCUS_FEATURES)
    (d_area, d_share, d_n, d_part, d_compact, d_solid), (p_area, _, p_n, p_part, p_compact, p_solid) = f
    assert np.isclose(np.exp(d_area), disc.sum() + 1e-3, rtol=1e-4)  # expected area in patches
    assert np.isclose(np.exp(d_n) - 1, 1) and np.isclose(d_part, 1.0)  # one area, all of it
    assert np.isclose(np.exp(p_n) - 1, 4) and p_part < 0.6  # four areas, the L a little over half
    assert d_compact > np.log(0.85) and d_solid > np.log(0.8)  # a disc: about its ellipse and its hull
    assert p_compact < d_compact and p_solid < d_solid
    empty = focus_shape_features(np.zeros((4, 2), np.float32), _grid(2, 2), [0])
    assert np.isfinite(empty).all() and np.isclose(np.exp(empty[2]) - 1, 0)


def test_a_focus_concept_reads_the_patch_grid_and_starts_with_every_word_alike():
    focus = {"name": "lesion", "words": ["a focus", "c focus", "none"], "read": "patch_focus", "classes": ["a", "c"]}
    readout = PatchClassReadout(8, CLASSES, [CONCEPTS[0], focus]).requires_grad_(False)
    assert readout.needs_grid and "lesion" not in readout.scale
    tokens, grid = torch.randn(20, 8), torch.from_numpy(_grid(4, 5))
    out = readout([tokens], [grid])
    assert out["lesion"].shape == (1, 3) and torch.all(out["lesion"] == 0)  # untrained: no word preferred
    with pytest.raises(ConfigError, match="patch grids"):
        readout([tokens])


def test_patch_class_shares_count_the_label_map_inside_each_patch():
    lm = np.zeros((8, 8), dtype=np.uint8)
    lm[:, 4:] = 2
    lm[4:, :2] = 1
    coords = np.array([[0, 0], [4, 0], [0, 4]])  # level-0 px at downsample 1, patches 4 px wide
    s = patch_class_shares(lm, 1, coords, 4.0, 3, samples=4)
    assert np.allclose(s.sum(1), 1.0)
    assert np.allclose(s[0], [1, 0, 0]) and np.allclose(s[1], [0, 0, 1]) and np.allclose(s[2], [0.5, 0.5, 0])


def test_readout_learns_the_training_slides_and_round_trips(synth_dataset, tiny_model_config, tmp_path):
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_many
    from slidechat.slide.config import ExtractionConfig
    from slidechat.training.model_hooks import configure_trainable
    from slidechat.training.recipe import StageRecipe, TrainConfig

    feats = tmp_path / "features"
    extract_many([str(synth_dataset / "slides")], load_encoder("demo-cnn"), feats, ExtractionConfig(num_workers=0))
    cfg = tiny_model_config(feature_dim=64)
    cfg.qformer.concepts = [
        {"name": "present_necrosis", "words": ["necrosis", "absent"]},
        {"name": "dominant", "words": ["stroma", "glands", "tumour", "necrosis", "lymph", "fat"]},
        {"name": "fragments", "words": ["1", "2", "3", "4"]}]
    torch.manual_seed(0)
    model = SlideAssistant(cfg, device="cpu").eval()
    rc = PatchReadoutConfig(read={"dominant": "patch_share", "present_necrosis": "patch_presence"},
                            val_synth_dir=str(synth_dataset), head_steps=200, calibration_epochs=200)
    m = train_patch_readout(model, rc, synth_dataset, feats, tmp_path / "readout")
    assert m["train_patches"] > 100 and m["val_patch_accuracy"] > 0.6
    assert m["val_concept_accuracy_patch_readout"]["dominant"] == 1.0  # scored on the training slides: learnt
    assert set(model.projector.concept_heads) == {"fragments"}  # the read concepts lost their query heads
    assert model.config.qformer.patch_classes == list(TISSUE_CLASSES)

    from slidechat.features.store import load_features
    sf = load_features(next(feats.glob("*.h5")))
    args = ([torch.from_numpy(sf.features.astype(np.float32))], [torch.from_numpy(sf.coords)])
    with torch.no_grad():
        _, proj = model.encode_features(*args)
    assert list(proj.concept_logits) == ["present_necrosis", "dominant", "fragments"]  # the config's order
    assert len(proj.tokens[0]) == 3 + cfg.qformer.num_query_tokens
    loaded = SlideAssistant.from_pretrained(tmp_path / "readout" / "final", device="cpu")
    assert loaded.config.qformer.concepts[1]["read"] == "patch_share"
    with torch.no_grad():
        _, proj2 = loaded.encode_features(*args)
    assert torch.allclose(proj2.tokens[0], proj.tokens[0], atol=1e-5)
    # later language-model stages leave the readout as it was fit
    configure_trainable(loaded, StageRecipe(train=TrainConfig(train_modules=["projector"])))
    assert not any(p.requires_grad for p in loaded.projector.patch_readout.parameters())
    assert any(p.requires_grad for p in loaded.projector.qformer.parameters())


def test_read_spec_names_the_presence_class():
    assert read_spec({"present_necrosis": "patch_presence", "dominant": "patch_share"}) == {
        "present_necrosis": {"read": "patch_presence", "class": "necrosis"}, "dominant": {"read": "patch_share"}}


def test_pipeline_adds_the_readout_to_a_checkpoint_with_a_fresh_validation_set(synth_dataset, tiny_model_config,
                                                                               tmp_path):
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_many
    from slidechat.model.config import PatchEncoderRef
    from slidechat.slide.config import ExtractionConfig
    from slidechat.training.pipeline import run_pipeline
    from slidechat.training.recipe import recipe_from_dict

    feats = tmp_path / "features"
    extract_many([str(synth_dataset / "slides")], load_encoder("demo-cnn"), feats, ExtractionConfig(num_workers=0))
    cfg = tiny_model_config(feature_dim=64)
    cfg.patch_encoder = PatchEncoderRef(name="demo-cnn")
    cfg.qformer.concepts = [{"name": "dominant", "words": ["stroma", "glands", "tumour", "necrosis", "lymph", "fat"]}]
    torch.manual_seed(0)
    SlideAssistant(cfg, device="cpu").save_pretrained(tmp_path / "base")
    recipe = recipe_from_dict({"kind": "pipeline", "output_dir": str(tmp_path / "run"), "export": str(tmp_path / "out"),
                               "patch_readout": {"init_from": str(tmp_path / "base"), "synth_dir": str(synth_dataset),
                                                 "features_dir": str(feats), "read": {"dominant": "patch_share"},
                                                 "val_seed": 7, "val_n": 2, "head_steps": 50,
                                                 "calibration_epochs": 20}})
    summary = run_pipeline(recipe)
    m = summary["steps"]["patch_readout"]
    assert m["train_slides"] == 4 and m["val_slides"] == 2  # the fresh set of seed 7, not a split of the training set
    assert len(list((tmp_path / "run" / "val-seed7" / "features").glob("*.h5"))) == 2
    loaded = SlideAssistant.from_pretrained(tmp_path / "out", device="cpu")
    assert loaded.projector.patch_readout is not None and not len(loaded.projector.concept_heads)
    # resumed: the readout is not trained again
    again = run_pipeline(recipe, resume=True)
    assert again["steps"]["patch_readout"] == m


def test_a_stage_adds_a_focus_concept_to_a_trained_readout_and_keeps_the_rest(synth_dataset, tiny_model_config,
                                                                             tmp_path):
    from slidechat.encoders import load_encoder
    from slidechat.features.extract import extract_many
    from slidechat.slide.config import ExtractionConfig

    feats = tmp_path / "features"
    extract_many([str(synth_dataset / "slides")], load_encoder("demo-cnn"), feats, ExtractionConfig(num_workers=0))
    cfg = tiny_model_config(feature_dim=64)
    cfg.qformer.concepts = [
        {"name": "dominant", "words": ["stroma", "glands", "tumour", "necrosis", "lymph", "fat"]},
        {"name": "lesion", "words": ["tumour focus", "necrosis focus", "lymph focus", "stroma only"]}]
    torch.manual_seed(0)
    model = SlideAssistant(cfg, device="cpu").eval()
    focus = PatchReadoutConfig(read={"lesion": {"read": "patch_focus", "classes": ["tumor", "necrosis", "lymphocytes"]}},
                               val_synth_dir=str(synth_dataset), head_steps=0, weight_decay=1e-3,
                               more_slides=[{"synth_dir": str(synth_dataset), "features_dir": str(feats)}])
    with pytest.raises(ConfigError, match="no patch readout"):  # no head to keep yet
        train_patch_readout(model, focus, synth_dataset, feats, tmp_path / "focus")
    first = PatchReadoutConfig(read={"dominant": "patch_share"}, val_synth_dir=str(synth_dataset), head_steps=100,
                               calibration_epochs=50)
    train_patch_readout(model, first, synth_dataset, feats, tmp_path / "readout")
    kept = {k: v.clone() for k, v in model.projector.patch_readout.state_dict().items()}
    m = train_patch_readout(model, focus, synth_dataset, feats, tmp_path / "focus")
    assert m["train_slides"] == 8  # the training folder and one more
    readout = model.projector.patch_readout
    assert all(torch.equal(readout.state_dict()[k], v) for k, v in kept.items())  # head and dominant as they were
    assert m["patch_loss"] is None and m["val_concept_accuracy_patch_readout"]["lesion"] == 1.0  # training slides
    assert float(readout.focus["lesion"].weight.abs().sum()) > 0
    assert not len(model.projector.concept_heads)  # the lesion's query head is gone

    from slidechat.features.store import load_features
    sf = load_features(next(feats.glob("*.h5")))
    args = ([torch.from_numpy(sf.features.astype(np.float32))], [torch.from_numpy(sf.coords)])
    loaded = SlideAssistant.from_pretrained(tmp_path / "focus" / "final", device="cpu")
    assert loaded.config.qformer.concepts[1]["read"] == "patch_focus"
    with torch.no_grad():
        _, proj = model.encode_features(*args)
        _, proj2 = loaded.encode_features(*args)
    assert torch.allclose(proj2.concept_logits["lesion"], proj.concept_logits["lesion"], atol=1e-5)
    assert torch.allclose(proj2.tokens[0], proj.tokens[0], atol=1e-5)
