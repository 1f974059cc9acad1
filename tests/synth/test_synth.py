import csv
import json
from collections import Counter

import numpy as np
import pytest
import tiffslide
from PIL import Image

from slidechat.cli import main
from slidechat.synth import TISSUE_CLASSES, generate_dataset
from slidechat.synth.classes import CLASS_INDEX, QUADRANTS
from slidechat.synth.text import assign_letters
from slidechat.utils.io import read_jsonl


def test_tiffslide_reads_pyramid_mpp_and_magnification(synth_dataset):
    truth = read_jsonl(synth_dataset / "truth.jsonl")
    assert len(truth) == 4
    rec = truth[0]
    with tiffslide.TiffSlide(synth_dataset / rec["path"]) as s:
        assert s.dimensions == (rec["width"], rec["height"])
        assert s.level_count >= 3
        assert s.level_downsamples[:3] == pytest.approx((1.0, 4.0, 16.0))
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["tiffslide.objective-power"]) == 20
        assert s.properties["tiffslide.level[0].tile-width"] == 256
        region = np.asarray(s.read_region((0, 0), 0, (512, 512)).convert("RGB"))
    assert region.shape == (512, 512, 3)


def test_truth_matches_label_map_and_pixels(synth_dataset):
    for rec in read_jsonl(synth_dataset / "truth.jsonl"):
        labels = np.asarray(Image.open(synth_dataset / rec["label_map_path"]))
        ds = rec["mask_downsample"]
        assert labels.shape == (-(-rec["height"] // ds), -(-rec["width"] // ds))
        tissue = labels > 0
        for name, frac in rec["area_fractions"].items():
            assert (labels[tissue] == CLASS_INDEX[name]).mean() == pytest.approx(frac, abs=1e-3)
        assert sum(rec["area_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
        assert set(rec["classes_present"]) <= set(TISSUE_CLASSES)
        assert rec["tumor_fraction"] == rec["area_fractions"].get("tumor", 0.0)
        mask = np.asarray(Image.open(synth_dataset / rec["mask_path"])) > 0
        if rec["lesion"] is None:
            assert not mask.any()
            continue
        les = rec["lesion"]
        assert les["quadrant"] in QUADRANTS and les["side"] in ("left", "right")
        assert (labels[mask] == CLASS_INDEX[les["class"]]).all()
        x0, y0, x1, y1 = les["bbox_level0"]
        ys, xs = np.nonzero(mask)
        assert x0 == xs.min() * ds and y0 == ys.min() * ds
        # the lesion's pixels really look like its class: compare colour inside the bbox to glass
        with tiffslide.TiffSlide(synth_dataset / rec["path"]) as s:
            cy, cx = int(ys.mean()) * ds, int(xs.mean()) * ds
            if mask[int(ys.mean()), int(xs.mean())]:
                patch = np.asarray(s.read_region((cx - 32, cy - 32), 0, (64, 64)).convert("RGB"))
                assert patch.mean() < 235  # stained tissue, not glass


def test_classes_have_distinct_colour(synth_dataset):
    """Mean colour per class (measured on the slide through the label map) differs between classes."""
    rec = read_jsonl(synth_dataset / "truth.jsonl")[0]
    labels = np.asarray(Image.open(synth_dataset / rec["label_map_path"]))
    with tiffslide.TiffSlide(synth_dataset / rec["path"]) as s:
        img = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    ds = rec["mask_downsample"] // 4  # label cells per level-1 px
    lab = np.kron(labels, np.ones((ds, ds), dtype=labels.dtype))[: img.shape[0], : img.shape[1]]
    means = {c: img[lab == CLASS_INDEX[c]].mean(0) for c in rec["classes_present"] if (lab == CLASS_INDEX[c]).sum() > 500}
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(means[names[i]] - means[names[j]]).max() > 8, (names[i], names[j])


def test_text_products_consistent_with_truth(synth_dataset):
    truth = {r["slide_id"]: r for r in read_jsonl(synth_dataset / "truth.jsonl")}
    caps = read_jsonl(synth_dataset / "captions.jsonl")
    assert {c["slide_id"] for c in caps} == set(truth)
    reports = read_jsonl(synth_dataset / "reports.jsonl")
    for r in reports:
        t = truth[r["slide_id"]]
        assert r["report"]["lesion_present"] == (t["lesion"] is not None)
        assert r["report"]["tumor_present"] == (t["tumor_fraction"] > 0)
        assert "DIAGNOSIS" in r["report_text"]
    inst = json.loads((synth_dataset / "instructions.json").read_text())
    assert len(inst) == 4
    for item in inst:
        conv = item["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 6
        assert item["image"][0].removesuffix(".tiff") in truth
    with open(synth_dataset / "closed_vqa.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question",
                             "A", "B", "C", "D", "Answer"]
    for row in rows:
        t = truth[row["Slide"]]
        answer_text = row[row["Answer"]]
        if row["Narrow Category"] == "Lesion location":
            assert answer_text == t["lesion"]["quadrant"]
        if row["Narrow Category"] == "Fragment count":
            assert int(answer_text) == t["n_fragments"]
        assert len({row[k] for k in "ABCD"}) == 4
    opens = read_jsonl(synth_dataset / "open_vqa.jsonl")
    assert all(o["slide_id"] in truth and o["answer"] for o in opens)


def test_answer_letters_balanced():
    qs = [{"correct": "x", "distractors": ["a", "b", "c"]} for _ in range(400)]
    counts = Counter(q["answer"] for q in assign_letters(qs, np.random.default_rng(0)))
    assert counts == {"A": 100, "B": 100, "C": 100, "D": 100}


def test_same_seed_identical_files_and_cli(tmp_path, synth_dataset):
    out = tmp_path / "again"
    assert main(["synth", "--n", "4", "--seed", "0", "--out", str(out)]) == 0
    for p in sorted(synth_dataset.rglob("*")):
        if p.is_file():
            assert (out / p.relative_to(synth_dataset)).read_bytes() == p.read_bytes(), p.name
    other = generate_dataset(tmp_path / "other", n=1, seed=1)
    assert other[0]["slide_id"] != read_jsonl(synth_dataset / "truth.jsonl")[0]["slide_id"]


def test_bad_size_is_user_error(tmp_path, capsys):
    assert main(["synth", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_patch_labels_from_label_map(synth_dataset):
    from slidechat.synth.patch_labels import load_label_map, patch_labels

    rec = read_jsonl(synth_dataset / "truth.jsonl")[0]
    lm = load_label_map(synth_dataset, rec)
    ds = rec["mask_downsample"]
    ys, xs = np.nonzero(lm == lm.max())
    coords = np.array([[xs[0] * ds, ys[0] * ds], [0, 0]])
    labels, purity = patch_labels(lm, ds, coords, ds)  # a patch of one label cell is pure
    assert labels[0] == lm.max() and purity[0] == 1.0 and labels[1] == lm[0, 0]
    labels, _ = patch_labels(lm, ds, coords, 224, min_purity=1.01)
    assert (labels == -1).all()


def test_save_overview_for_humans(synth_dataset, test_output):
    """Thumbnail | label map | lesion mask of one slide, for a person to look at (test-output/)."""
    rec = read_jsonl(synth_dataset / "truth.jsonl")[0]
    with tiffslide.TiffSlide(synth_dataset / rec["path"]) as s:
        thumb = s.get_thumbnail((512, 512)).convert("RGB")
    palette = np.array([[255, 255, 255], [233, 150, 190], [120, 200, 120], [200, 40, 40], [150, 150, 150],
                        [60, 60, 200], [250, 230, 120]], np.uint8)
    labels = Image.fromarray(palette[np.asarray(Image.open(synth_dataset / rec["label_map_path"]))]).resize(thumb.size)
    mask = Image.open(synth_dataset / rec["mask_path"]).convert("RGB").resize(thumb.size)
    sheet = Image.new("RGB", (thumb.width * 3, thumb.height), "white")
    for i, im in enumerate((thumb, labels, mask)):
        sheet.paste(im, (i * thumb.width, 0))
    out = test_output / "synthslide_overview.png"
    sheet.save(out)
    assert out.stat().st_size > 1000
