"""Each bad input: a clear one-line error, exit code 2, the good slide in the same run still extracted,
and no partial .h5 left behind."""

import struct

import numpy as np
import pytest
import tifffile

from slidechat.cli import main
from slidechat.errors import MissingMppError, NoTissueError, SlideReadError
from slidechat.features.store import is_complete_features_h5
from slidechat.slide.reader import SlideReader
from slidechat.slide.tissue import detect_tissue
from slidechat.utils.io import read_jsonl


@pytest.fixture(scope="module")
def tissue_rgb(synth_dataset):
    """A 1024 x 1024 RGB crop of tissue from a SynthSlide slide."""
    rec = read_jsonl(synth_dataset / "truth.jsonl")[1]
    x0, y0, x1, y1 = rec["tissue_bbox_level0"]
    with SlideReader(synth_dataset / rec["path"]) as r:
        return r.read_region(((x0 + x1) // 2 - 512, (y0 + y1) // 2 - 512), 0, (1024, 1024))


def _write_tiff(path, rgb, mpp=0.5):
    kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None, **kw)
    return path


@pytest.fixture(scope="module")
def good_slide(tissue_rgb, tmp_path_factory):
    return _write_tiff(tmp_path_factory.mktemp("good") / "good.tif", tissue_rgb)


def _bomb_tiff(path, width=100_000, height=100_000):
    """A tiny file whose header claims a 10-gigapixel single-strip image (decompression-bomb shape)."""
    import zlib

    blob = zlib.compress(b"\0" * 1024)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, len(blob))]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        value = data_offset if tag == 273 else value
        fmt = "<HHIHH" if typ == 3 else "<HHII"
        out += struct.pack(fmt, tag, typ, count, value, 0) if typ == 3 else struct.pack(fmt, tag, typ, count, value)
    out += struct.pack("<I", 0) + blob
    path.write_bytes(bytes(out))
    return path


def _run(bad, good, out, capsys, *extra):
    rc = main(["extract", str(bad), str(good), "--out", str(out), "--num-workers", "0", *extra])
    err = capsys.readouterr()
    errors = [ln for ln in err.err.splitlines() if ln.startswith("error:")]
    assert rc == 2
    assert len(errors) == 1 and str(bad) in errors[0], err.err
    assert "Traceback" not in err.err
    assert "1 extracted" in err.out and "1 failed" in err.out
    assert is_complete_features_h5(out / "good.h5")
    assert sorted(p.name for p in out.iterdir()) == ["good.h5"]  # no partial or temp files
    return errors[0]


def test_not_an_image(tmp_path, good_slide, capsys):
    bad = tmp_path / "random.svs"
    bad.write_bytes(np.random.default_rng(0).integers(128, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a TIFF-based whole-slide image" in _run(bad, good_slide, tmp_path / "o", capsys)


def test_png_renamed_to_svs(tmp_path, good_slide, capsys):
    from PIL import Image

    bad = tmp_path / "photo.svs"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(bad, format="PNG")
    assert "is a PNG image" in _run(bad, good_slide, tmp_path / "o", capsys)


def test_renamed_text_file(tmp_path, good_slide, capsys):
    bad = tmp_path / "notes.svs"
    bad.write_text("patient notes, not a slide\n" * 20)
    assert "is a text file" in _run(bad, good_slide, tmp_path / "o", capsys)


def test_truncated_tiff(tmp_path, synth_dataset, good_slide, capsys):
    src = (synth_dataset / "slides").iterdir().__next__().read_bytes()
    bad = tmp_path / "cut.tiff"
    bad.write_bytes(src[: len(src) // 2])
    msg = _run(bad, good_slide, tmp_path / "o", capsys)
    assert "truncated" in msg or "corrupt" in msg
    with pytest.raises(SlideReadError):
        SlideReader(bad)


def test_truncated_tile_data_is_caught_while_reading(tmp_path, tissue_rgb, good_slide, capsys):
    """Offsets inside the file but garbage tile bytes: the worker's decode error becomes one line."""
    path = _write_tiff(tmp_path / "corrupt.tif", tissue_rgb)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, cnt = page.dataoffsets[5], page.databytecounts[5]
    data = bytearray(path.read_bytes())
    data[off + 2 : off + cnt] = b"\x00" * (cnt - 2)  # keep SOI, destroy the rest of one JPEG tile
    path.write_bytes(bytes(data))
    rc = main(["extract", str(path), str(good_slide), "--out", str(tmp_path / "o"), "--num-workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "corrupt.tif" in lines[0]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good.h5"]


def test_decompression_bomb_checked_before_decoding(tmp_path, good_slide, capsys):
    bad = _bomb_tiff(tmp_path / "huge.tif")
    assert bad.stat().st_size < 500
    assert "too large to decode safely" in _run(bad, good_slide, tmp_path / "o", capsys)


def test_no_tissue(tmp_path, good_slide, capsys):
    bad = _write_tiff(tmp_path / "blank.tif", np.full((1024, 1024, 3), 242, np.uint8))
    with SlideReader(bad) as r, pytest.raises(NoTissueError):
        detect_tissue(r)
    assert "no tissue found" in _run(bad, good_slide, tmp_path / "o", capsys)


def test_no_mpp_then_mpp_option(tmp_path, tissue_rgb, good_slide, capsys):
    bad = _write_tiff(tmp_path / "nompp.tif", tissue_rgb, mpp=None)
    with SlideReader(bad) as r, pytest.raises(MissingMppError):
        _ = r.mpp
    assert "--mpp" in _run(bad, good_slide, tmp_path / "o", capsys)
    assert main(["extract", str(bad), "--mpp", "0.5", "--out", str(tmp_path / "o2"), "--num-workers", "0"]) == 0
    assert is_complete_features_h5(tmp_path / "o2" / "nompp.h5")


def test_unreadable_path(tmp_path, good_slide, capsys):
    assert "file not found" in _run(tmp_path / "missing.svs", good_slide, tmp_path / "o", capsys)


def test_empty_folder(tmp_path, good_slide, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["extract", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no slides found") and len(err.strip().splitlines()) == 1
    # next to a good slide: the folder is reported, the slide is extracted
    _run(empty, good_slide, tmp_path / "o", capsys)
