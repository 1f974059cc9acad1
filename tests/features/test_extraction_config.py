"""ExtractionConfig: validated options (API and CLI, before any work), the grid-size guard, and the
ExtractionResult that carries sha256, tissue mask and features so nothing is read or hashed twice."""

import logging

import numpy as np
import pytest

from slidechat.cli import main
from slidechat.encoders import load_encoder
from slidechat.errors import ConfigError, NoTissueError
from slidechat.features import extract as extract_mod
from slidechat.features.extract import ExtractionResult, extract_slide
from slidechat.features.store import load_features
from slidechat.slide.config import ExtractionConfig, TissueConfig
from slidechat.slide.reader import SlideReader
from slidechat.slide.tiling import make_tile_grid
from slidechat.slide.tissue import TissueMask
from slidechat.utils.io import sha256_file


def test_defaults_and_replace():
    cfg = ExtractionConfig()
    assert (cfg.target_mpp, cfg.patch_size, cfg.reader_mode, cfg.tissue.min_tissue) == (0.5, 224, "threads", 0.25)
    changed = cfg.replace(patch_size=112, tissue_threshold=0.1)
    assert changed.patch_size == 112 and changed.tissue.threshold == 0.1 and cfg.patch_size == 224
    assert ExtractionConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ConfigError, match="unknown extraction option"):
        ExtractionConfig.from_dict({"patchsize": 3})


@pytest.mark.parametrize("kwargs, flag, allowed", [
    ({"patch_size": 0}, "--patch-size", "from 16 to 4096"),
    ({"patch_size": -5}, "--patch-size", "from 16 to 4096"),
    ({"patch_size": 22.5}, "--patch-size", "integer"),
    ({"target_mpp": 0}, "--target-mpp", "from 0.05 to 100"),
    ({"target_mpp": float("nan")}, "--target-mpp", "from 0.05 to 100"),
    ({"batch_size": 0}, "--batch-size", "from 1 to 8192"),
    ({"num_workers": -1}, "--num-workers", "from 0 to 64"),
    ({"mpp": 0.0}, "--mpp", "from 0.01 to 100"),
    ({"reader_mode": "fibres"}, "--reader", "threads, processes"),
])
def test_out_of_range_values_name_the_option(kwargs, flag, allowed):
    with pytest.raises(ConfigError) as err:
        ExtractionConfig(**kwargs)
    assert flag in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("kwargs, flag", [({"threshold": 1.5}, "--tissue-threshold"), ({"min_tissue": 0}, "--min-tissue"),
                                          ({"method": "magic"}, "--tissue-method"),
                                          ({"thumbnail_size": 3}, "--thumbnail-size")])
def test_tissue_options_are_checked(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ExtractionConfig(tissue=TissueConfig(**kwargs))


@pytest.mark.parametrize("option, value", [("--patch-size", "0"), ("--patch-size", "-5"), ("--target-mpp", "0"),
                                           ("--batch-size", "0"), ("--num-workers", "-2"), ("--mpp", "abc"),
                                           ("--tissue-threshold", "2"), ("--min-tissue", "0")])
def test_cli_rejects_bad_options_at_parse_time(cmu_slide, tmp_path, capsys, option, value):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stop:
        main(["extract", str(cmu_slide), "--out", str(out), option, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert option in err and "must be" in err and value in err
    assert not out.exists()


def test_grid_guard_stops_a_huge_grid_before_reading(cmu_slide, tmp_path, capsys):
    out = tmp_path / "o"
    # 100 µm/px claimed: a 0.05-µm/px patch is under one level-0 pixel -> millions of cells
    assert main(["extract", str(cmu_slide), "--out", str(out), "--mpp", "100", "--target-mpp", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--target-mpp 0.05" in err and "patches, more than the 4,000,000" in err
    assert not out.exists()  # nothing written, not even the folder


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("demo-cnn")


def test_result_carries_sha_tissue_and_features(cmu_slide, encoder, tmp_path, monkeypatch):
    cfg = ExtractionConfig(num_workers=0, batch_size=32)
    result = extract_slide(cmu_slide, encoder, tmp_path / "a.h5", cfg)
    assert isinstance(result, ExtractionResult) and result.config is cfg
    assert result.sha256 == sha256_file(cmu_slide) == result.attrs["slide_sha256"]
    assert result.tissue.mask.any() and result.num_patches == len(result.grid) > 30
    stored = load_features(result)  # os.fspath(result) is the .h5 path
    np.testing.assert_array_equal(stored.features, result.features)
    np.testing.assert_array_equal(stored.coords, result.as_slide_features().coords)

    def must_not_run(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(extract_mod, "sha256_file", must_not_run)
    monkeypatch.setattr(extract_mod, "detect_tissue", must_not_run)
    again = extract_slide(cmu_slide, encoder, tmp_path / "b.h5", cfg, sha256=result.sha256, tissue=result.tissue)
    np.testing.assert_array_equal(again.features, result.features)


def test_keep_best_patches_when_none_reaches_the_fraction(cmu_slide, caplog):
    with SlideReader(cmu_slide) as r:
        w, h = r.dimensions
        mask = np.zeros((h // 8, w // 8), dtype=bool)
        mask[::8, ::8] = True  # ~1.6% tissue everywhere, a denser spot in one place
        mask[40:48, 40:60] = True
        sparse = TissueMask(mask=mask, downsample=8.0)
        with caplog.at_level(logging.INFO, logger="slidechat"):
            grid = make_tile_grid(r, sparse, 0.5, 224)
        assert 0 < len(grid) < 10 and "best-covered" in caplog.text
        with pytest.raises(NoTissueError, match="--min-tissue"):
            make_tile_grid(r, sparse, 0.5, 224, keep_best=False)


def test_dataset_folder_finds_its_slides_subfolder(synth_dataset, tmp_path):
    from slidechat.errors import SlideChatError
    from slidechat.features.extract import expand_slide_inputs

    found = expand_slide_inputs([str(synth_dataset)])
    assert found and all(p.parent == synth_dataset / "slides" for p in found)
    nested = tmp_path / "cohort"
    (nested / "a").mkdir(parents=True)
    (nested / "a" / "x.svs").write_bytes(b"II*\x00")
    with pytest.raises(SlideChatError, match=r"subfolders with slides: .*cohort/a"):
        expand_slide_inputs([str(nested)])


def test_extract_cli_on_a_synthslide_dataset_folder(synth_dataset, tmp_path):
    """`slidechat extract DIR` on a folder written by `slidechat synth`: its slides are in DIR/slides."""
    assert main(["extract", str(synth_dataset), "--encoder", "demo-cnn", "--out", str(tmp_path / "f"),
                 "--num-workers", "0"]) == 0
    slides = sorted(p.stem for p in (synth_dataset / "slides").iterdir())
    assert slides and sorted(p.stem for p in (tmp_path / "f").glob("*.h5")) == slides


def test_truncated_tiff_gives_one_line_and_no_tifffile_log(cmu_slide, tmp_path, capfd, caplog):
    bad = tmp_path / "cut.svs"
    bad.write_bytes(cmu_slide.read_bytes()[:20000])
    with caplog.at_level(logging.DEBUG):
        assert main(["extract", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "truncated" in err[0]
