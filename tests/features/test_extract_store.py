import h5py
import numpy as np
import pytest

from slidechat.errors import DataError
from slidechat.features.store import is_complete_features_h5, load_features, write_features_h5

ATTRS = dict(patch_size=224, patch_size_level0=224, target_mpp=0.5, encoder="demo-cnn", slide_id="s1", slide_sha256="ab")


def test_h5_roundtrip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    coords = np.arange(14).reshape(7, 2) * 224
    p = write_features_h5(tmp_path / "s1.h5", feats, coords, ATTRS)
    assert not list(tmp_path.glob(".*tmp"))
    sf = load_features(p)
    np.testing.assert_array_equal(sf.features, feats)
    assert sf.coords.dtype == np.int64 and (sf.coords == coords).all()
    assert sf.attrs["encoder"] == "demo-cnn" and sf.attrs["target_mpp"] == 0.5 and sf.slide_id == "s1"
    assert is_complete_features_h5(p, {"encoder": "demo-cnn", "target_mpp": 0.5})
    assert not is_complete_features_h5(p, {"encoder": "uni"})


def test_reads_clam_style_h5(tmp_path):
    p = tmp_path / "clam.h5"
    with h5py.File(p, "w") as fh:
        fh.create_dataset("features", data=np.ones((1, 3, 8), np.float32))
        c = fh.create_dataset("coords", data=np.zeros((3, 2), np.int32))
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 0
    sf = load_features(p)
    assert sf.features.shape == (3, 8) and sf.attrs["patch_size"] == 256 and sf.coords.shape == (3, 2)


def test_reads_slidechat_csv(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 512))
    p = tmp_path / "TCGA-XX.csv"
    header = ",".join(str(i) for i in range(512))
    np.savetxt(p, feats, delimiter=",", header=header, comments="")
    sf = load_features(p)
    assert sf.features.shape == (5, 512) and sf.coords is None
    np.testing.assert_allclose(sf.features, feats, rtol=1e-5)
    assert sf.slide_id == "TCGA-XX"


def test_bad_feature_files(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    with pytest.raises(DataError):
        load_features(bad)
    with pytest.raises(DataError):
        load_features(tmp_path / "missing.h5")
    assert not is_complete_features_h5(bad)
