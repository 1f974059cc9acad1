"""Out-of-distribution warning: feature statistics in a checkpoint, the score, and the shipped demo's calibration."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from slidechat.features.store import SlideFeatures
from slidechat.inference.api import DEMO_DIR
from slidechat.inference.encode import as_encoded_slide
from slidechat.inference.ood import feature_stats, ood_check
from slidechat.model.feature_stats import STATS_ARRAYS, STATS_META, FeatureStats, compute_feature_stats


def _slides(rng, n=30, dim=12, shift=0.0, scale=1.0):
    """Slides whose patches mix three tissue-like clusters in random proportions."""
    centres = np.random.default_rng(123).normal(0, 3, (3, dim))
    out = []
    for _ in range(n):
        counts = rng.multinomial(int(rng.integers(80, 200)), rng.dirichlet(np.ones(3)))
        patches = np.concatenate([c + rng.normal(0, 1, (k, dim)) for c, k in zip(centres, counts)])
        out.append((patches * scale + shift).astype(np.float32))
    return out


def test_feature_stats_round_trip_and_separate_shifted_slides(tmp_path):
    rng = np.random.default_rng(0)
    stains = [np.array([0.2, 0.4, 0.2]) + rng.normal(0, 0.02, 3) for _ in range(30)]
    stats = compute_feature_stats(_slides(rng), stains, rank=8)  # rank < dim: the residual variance is used too
    stats.save(tmp_path)
    assert (tmp_path / STATS_ARRAYS).is_file() and (tmp_path / STATS_META).is_file()
    loaded = FeatureStats.load(tmp_path)
    assert loaded.threshold == pytest.approx(stats.threshold) and loaded.threshold > 1.0
    assert loaded.calibration["slides"] == 30 and "held-out scores of 30 training slides" in loaded.describe_threshold()
    assert loaded.stain is not None and loaded.stain_scale == pytest.approx(stats.stain_scale)

    fresh = _slides(np.random.default_rng(1), n=20)
    for s in fresh[:3]:
        assert loaded.score(s).score == pytest.approx(stats.score(s).score)
        assert loaded.score(s, stains[0]).stain_distance == pytest.approx(stats.score(s, stains[0]).stain_distance)
    fresh_scores = [loaded.score(s).score for s in fresh]
    assert sum(s > loaded.threshold for s in fresh_scores) <= 1  # same distribution: (almost) never flagged
    shifted = _slides(np.random.default_rng(2), n=5, shift=2.5)  # a stain-like shift of every patch
    assert all(loaded.score(s).score > loaded.threshold for s in shifted)
    restained = loaded.score(fresh[0], np.array([0.2, 0.25, 0.45]))  # same tissue features, another colour
    assert restained.score > loaded.threshold > loaded.score(fresh[0]).score
    foreign = loaded.score(np.random.default_rng(3).normal(0, 8, (150, 12)).astype(np.float32))
    assert foreign.outlier_fraction > 0.5 and foreign.score > loaded.threshold


def test_training_writes_statistics_from_its_feature_files(tmp_path, caplog):
    from slidechat.features.store import write_features_h5
    from slidechat.training.checkpoint import write_feature_stats

    slides = _slides(np.random.default_rng(4), n=12)
    for i, s in enumerate(slides):
        write_features_h5(tmp_path / "features" / f"s{i:02d}.h5", s, np.zeros((len(s), 2)), {"slide_id": f"s{i}"})
    assert write_feature_stats(tmp_path / "final", tmp_path / "features") == tmp_path / "final"
    stats = FeatureStats.load(tmp_path / "final")
    assert stats.dim == 12 and stats.calibration["slides"] == 12
    expected = compute_feature_stats(slides)  # the same numbers as from the arrays themselves
    assert stats.score(slides[0]).score == pytest.approx(expected.score(slides[0]).score, rel=1e-5)

    for p in sorted((tmp_path / "features").glob("*.h5"))[3:]:
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="training"):
        assert write_feature_stats(tmp_path / "few", tmp_path / "features") is None
    assert "at least 10 slides" in caplog.text and FeatureStats.load(tmp_path / "few") is None


def test_ood_check_without_statistics_is_none(tiny_checkpoint_dir, tmp_path):
    import slidechat

    assert not (tiny_checkpoint_dir / STATS_META).exists()
    model = slidechat.load(str(tiny_checkpoint_dir), device="cpu")
    feats = SlideFeatures(features=np.zeros((5, model.config.encoder.feature_dim), np.float32), coords=None)
    slide = as_encoded_slide(model, feats)
    assert feature_stats(model) is None and ood_check(model, slide) is None
    assert slide.ood is None and slide.ood_score is None


def test_corrupt_statistics_warn_and_switch_the_check_off(tiny_checkpoint_dir, tmp_path, caplog):
    import shutil

    import slidechat

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, ckpt)
    (ckpt / STATS_META).write_text("{not json", encoding="utf-8")
    (ckpt / STATS_ARRAYS).write_bytes(b"garbage")
    model = slidechat.load(str(ckpt), device="cpu")
    feats = SlideFeatures(features=np.ones((5, model.config.encoder.feature_dim), np.float32), coords=None)
    with caplog.at_level(logging.WARNING, logger="slidechat.inference.ood"):
        assert as_encoded_slide(model, feats).ood is None
    assert "unreadable feature statistics" in caplog.text


def test_resaving_a_checkpoint_keeps_its_statistics(tiny_checkpoint_dir, tmp_path):
    import shutil

    import slidechat

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, ckpt)
    model = slidechat.load(str(ckpt), device="cpu")
    rng = np.random.default_rng(3)
    compute_feature_stats(_slides(rng, dim=model.config.encoder.feature_dim)).save(ckpt)
    model.save_pretrained(tmp_path / "again")
    for name in (STATS_ARRAYS, STATS_META):
        assert (tmp_path / "again" / name).read_bytes() == (ckpt / name).read_bytes()


# ---------------------------------------------------------------- the shipped demo checkpoint
@pytest.fixture(scope="module")
def demo():
    import slidechat

    return slidechat.load("demo", device="cpu")


@pytest.mark.usefixtures("single_torch_thread")
def test_demo_passes_fresh_synthslides_and_flags_the_scanner_slide(demo, synth_dataset, cmu_slide, tmp_path):
    stats = FeatureStats.load(DEMO_DIR)
    assert stats is not None and stats.calibration["slides"] >= 64
    cache = tmp_path / "cache"
    # synth_dataset is seed 0: slides the demo (trained on seed 1234) never saw
    fresh = [demo.encode_slide(p, cache_dir=cache) for p in sorted((synth_dataset / "slides").glob("*.tiff"))[:2]]
    for slide in fresh:
        assert slide.ood is not None and not slide.ood.flagged, slide.ood
        assert slide.ood_score == slide.ood.score < slide.ood.threshold
        assert "resembles" in slide.ood.message
    real = demo.encode_slide(cmu_slide, cache_dir=cache)
    assert real.ood.flagged and real.ood_score > real.ood.threshold
    assert real.ood.mean_distance / stats.mean_distance_scale > real.ood.threshold  # its features alone flag it
    assert real.ood.message.startswith("This slide is unlike the slides this model was trained on (score ")
    assert f"threshold {real.ood.threshold:.1f}): answers may be wrong." in real.ood.message
    assert "percentile" in real.ood.message  # how the threshold was set
    assert ood_check(demo, real) is ood_check(demo, real)  # cached per slide


@pytest.mark.slow
@pytest.mark.usefixtures("single_torch_thread")
def test_demo_flags_a_synthslide_in_an_ihc_palette(demo, tmp_path):
    from slidechat.training.demo_feature_stats import write_restained_slide

    slide = demo.encode_slide(write_restained_slide(tmp_path, seed=9999, index=0), cache_dir=tmp_path / "cache")
    assert slide.ood.flagged and slide.ood.stain_distance is not None, slide.ood
