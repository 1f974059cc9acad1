"""slide -> .h5 features, on the real CMU-1 SVS and SynthSlide, through the function and the CLI."""


import h5py
import numpy as np
import pytest

from slidechat.cli import main
from slidechat.encoders import load_encoder
from slidechat.errors import SlideChatError
from slidechat.features.extract import expand_slide_inputs, extract_many, extract_slide
from slidechat.features.store import REQUIRED_ATTRS, is_complete_features_h5, load_features
from slidechat.slide.config import ExtractionConfig
from slidechat.utils.io import read_jsonl, sha256_file



@pytest.fixture(scope="module")
def encoder():
    return load_encoder("demo-cnn")


def test_extract_real_svs_with_worker_processes(cmu_slide, encoder, tmp_path):
    stages = []
    out = extract_slide(cmu_slide, encoder, tmp_path / "cmu.h5",
                        ExtractionConfig(num_workers=2, batch_size=16, reader_mode="processes"),
                        progress=lambda s, d, t: stages.append((s, d, t)))
    with h5py.File(out, "r") as fh:
        assert fh["features"].dtype == np.float32 and fh["coords"].dtype.kind == "i"
        n = fh["features"].shape[0]
        assert fh["features"].shape == (n, load_encoder("demo-cnn").embed_dim) and fh["coords"].shape == (n, 2) and n > 30
        for key in REQUIRED_ATTRS:
            assert key in fh.attrs
        assert fh.attrs["slide_sha256"] == sha256_file(cmu_slide)
        assert fh.attrs["patch_size"] == 224 and fh.attrs["patch_size_level0"] == 224
        assert fh.attrs["encoder"] == "demo-cnn" and fh.attrs["slide_id"] == "cmu-1-small-region"
        assert np.isfinite(fh["features"][()]).all()
        assert len(np.unique(fh["features"][()].round(4), axis=0)) == n  # every patch got its own embedding
    assert [s for s, _, _ in stages][:2] == ["tissue", "tissue"] and "tiling" in [s for s, _, _ in stages]
    assert stages[-1] == ("encoding", n, n)
    # the main-process path gives the same features as the worker path
    same = extract_slide(cmu_slide, encoder, tmp_path / "cmu0.h5", ExtractionConfig(num_workers=0))
    threads = extract_slide(cmu_slide, encoder, tmp_path / "cmu_t.h5",
                            ExtractionConfig(num_workers=2, reader_mode="threads"))
    a, b, c = load_features(out), load_features(same), load_features(threads)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    np.testing.assert_allclose(a.features, c.features, atol=1e-5)
    np.testing.assert_array_equal(a.coords, b.coords)
    # features really are the encoder applied to the patch at each coord
    from slidechat.slide.reader import SlideReader

    with SlideReader(cmu_slide) as r:
        x, y = a.coords[5]
        patch = r.read_region((int(x), int(y)), 0, (224, 224))
    np.testing.assert_allclose(encoder(encoder.transform_batch(patch[None])).numpy()[0], a.features[5], atol=1e-4)


def test_cli_folder_csv_glob_and_resume(synth_dataset, tmp_path, capsys):
    slides = synth_dataset / "slides"
    out = tmp_path / "feats"
    assert main(["extract", str(slides / "*-0000.tiff"), "--out", str(out), "--num-workers", "0"]) == 0
    line = capsys.readouterr().out
    assert "1 extracted" in line and "patches/s" in line
    first = out / "synth-s0-0000.h5"
    mtime = first.stat().st_mtime_ns
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text("slide_path,label\n" + "".join(f"{p},x\n" for p in sorted(slides.iterdir())[1:3]))
    assert main(["extract", str(slides / "synth-s0-0000.tiff"), str(csv_path), "--out", str(out),
                 "--num-workers", "0"]) == 0
    line = capsys.readouterr().out
    assert "2 extracted, 1 already done, 0 failed" in line
    assert first.stat().st_mtime_ns == mtime  # resumed, not rewritten
    assert sorted(p.name for p in out.iterdir()) == [f"synth-s0-000{i}.h5" for i in range(3)]
    truth = {r["slide_id"]: r for r in read_jsonl(synth_dataset / "truth.jsonl")}
    for h5 in out.iterdir():
        f = load_features(h5)
        t = truth[f.slide_id]
        assert f.coords[:, 0].max() < t["width"] and f.coords[:, 1].max() < t["height"]
        assert 80 < f.num_patches < 400


def test_extract_many_reports_and_expands(synth_dataset, encoder, tmp_path):
    slides = synth_dataset / "slides"
    assert len(expand_slide_inputs([str(slides)])) == 4
    with pytest.raises(SlideChatError, match="no slides found"):
        expand_slide_inputs([str(tmp_path / "nothing-*.svs")])
    events = []
    summary = extract_many([slides / "synth-s0-0003.tiff"], encoder, tmp_path / "o",
                           ExtractionConfig(num_workers=0, target_mpp=1.0), on_slide=lambda p, s, m: events.append(s))
    assert events == ["ok"] and summary.n_patches > 0 and not summary.failed
    f = load_features(summary.written[0])
    assert f.attrs["patch_size_level0"] == 448 and f.attrs["target_mpp"] == 1.0
    assert is_complete_features_h5(summary.written[0], {"target_mpp": 1.0})
    # a different target resolution is not "already done"
    again = extract_many([slides / "synth-s0-0003.tiff"], encoder, tmp_path / "o",
                         ExtractionConfig(num_workers=0, target_mpp=0.5))
    assert len(again.written) == 1 and not again.skipped


def test_features_separate_tissue_classes(synth_dataset, encoder, tmp_path):
    """Even the untrained demo CNN's features differ between tissue classes (a sanity check on the path)."""
    from PIL import Image

    rec = read_jsonl(synth_dataset / "truth.jsonl")[2]
    f = load_features(extract_slide(synth_dataset / rec["path"], encoder, tmp_path / "s.h5",
                                    ExtractionConfig(num_workers=0)))
    labels = np.asarray(Image.open(synth_dataset / rec["label_map_path"]))
    ds = rec["mask_downsample"]
    centre = (f.coords + 112) // ds
    cls = labels[centre[:, 1], centre[:, 0]]
    means = {c: f.features[cls == c].mean(0) for c in np.unique(cls) if c > 0 and (cls == c).sum() >= 5}
    assert len(means) >= 2
    keys = list(means)
    spread = np.mean([f.features[cls == c].std(0).mean() for c in keys])
    gaps = [np.abs(means[a] - means[b]).mean() for i, a in enumerate(keys) for b in keys[i + 1:]]
    assert min(gaps) > 0.5 * spread
