"""The decode-size guard: a read whose decode would exceed the memory bound is refused up front, with one line
naming the bound and what to do, before any pixel is decoded. Big slides are sparse untiled TIFFs (a header
and a hole on disk)."""

import numpy as np
import pytest

from slidechat.cli import main
from slidechat.errors import ConfigError, SlideReadError
from slidechat.slide.memory import ENV_VAR, decode_limit, parse_size, thumbnail_bytes
from slidechat.slide.reader import SlideReader
from slidechat.slide.tissue import detect_tissue


@pytest.fixture
def untiled_slide(tmp_path):
    """A 12000 x 12000 RGB TIFF stored as one strip, no pyramid: any read decodes all 432 MB of it."""
    import tifffile

    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, shape=(12000, 12000, 3), dtype=np.uint8, photometric="rgb", rowsperstrip=12000)
    return path


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_parse_size_and_the_default_bound(monkeypatch):
    assert parse_size("16G") == 16 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size("1.5g") == int(1.5 * (1 << 30))
    for bad in ("", "lots", "-1G", "0", "nan", "1e9", "5 X"):
        with pytest.raises(ConfigError, match=ENV_VAR):
            parse_size(bad)
    monkeypatch.delenv(ENV_VAR, raising=False)
    limit, how = decode_limit()
    assert limit is not None and limit > 0 and how.startswith("half of the")
    monkeypatch.setenv(ENV_VAR, "3G")
    assert decode_limit() == (3 << 30, f"set by {ENV_VAR}")


def test_thumbnail_of_a_flat_slide_beyond_the_bound_is_refused_before_decoding(untiled_slide, monkeypatch):
    with SlideReader(untiled_slide, mpp=0.25) as reader:
        need = thumbnail_bytes(reader, 1024)
        assert need >= 12000 * 12000 * 3  # the whole strip is decoded for any thumbnail
        monkeypatch.setenv(ENV_VAR, "256M")
        with pytest.raises(SlideReadError) as err:
            detect_tissue(reader)
        msg = str(err.value)
        assert "\n" not in msg and "256 MiB bound (set by SLIDECHAT_MAX_DECODE_MEMORY)" in msg
        assert "1024-px thumbnail" in msg and "tiled pyramid" in msg and str(untiled_slide) in msg


def test_extract_of_a_flat_slide_beyond_the_bound_stops_with_one_line(untiled_slide, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "256M")
    out = tmp_path / "out"
    assert main(["extract", str(untiled_slide), "--mpp", "0.25", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "256 MiB bound" in line and "tiled pyramid" in line and "Traceback" not in err
    assert not out.exists()  # nothing written, not even the folder


def test_patch_size_whose_buffers_exceed_the_bound_is_refused_where_the_default_runs(synth_dataset, tmp_path,
                                                                                     capsys, monkeypatch):
    slide = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    monkeypatch.setenv(ENV_VAR, "200M")
    out = tmp_path / "out"
    assert main(["extract", str(slide), "--out", str(out), "--patch-size", "1024"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--patch-size 1024" in line and "200 MiB bound" in line and "smaller --patch-size" in line
    assert not out.exists()
    # the same bound lets the default settings through, and they extract
    assert main(["extract", str(slide), "--out", str(out), "--num-workers", "0", "--target-mpp", "1"]) == 0
    assert len(list(out.glob("*.h5"))) == 1
