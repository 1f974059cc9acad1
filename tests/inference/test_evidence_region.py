"""Evidence regions (top-k attended boxes), crops, region questions and their CLI, on the tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slidechat.errors import SlideChatError
from slidechat.features.store import SlideFeatures, write_features_h5
from slidechat.inference.evidence import crop_region, top_regions
from slidechat.inference.heatmap import Heatmap

pytestmark = pytest.mark.usefixtures("single_torch_thread")
PS = 256


def _grid_slide(side: int = 10, dim: int = 32, seed: int = 0) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    gy, gx = np.divmod(np.arange(side * side), side)
    coords = np.stack([gx, gy], 1).astype(np.int64) * PS + 1000
    return SlideFeatures(features=rng.standard_normal((side * side, dim)).astype(np.float32), coords=coords,
                         attrs={"slide_id": "g", "slide_sha256": f"grid-{side}-{seed}", "patch_size_level0": PS,
                                "slide_width": 1000 + side * PS + 500, "slide_height": 1000 + side * PS + 500})


@pytest.fixture(scope="module")
def chat(tiny_qformer_chat):
    return tiny_qformer_chat


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_top_regions_merge_neighbours_and_never_overlap():
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(6), indexing="xy"), -1).reshape(-1, 2) * 100
    scores = np.zeros(36, dtype=np.float32)
    scores[[7, 8, 13]] = [1.0, 0.9, 0.8]  # one blob of three neighbours
    scores[35] = 0.7  # a lone hot patch far away
    scores[20] = 0.6
    regions = top_regions(Heatmap(scores=scores, coords=coords, patch_size_level0=100), k=3)
    assert [r.rank for r in regions] == [1, 2, 3]
    assert regions[0].box == (100, 100, 200, 200) and regions[0].patches == [7, 8, 13] and regions[0].score == 1.0
    assert regions[1].box == (500, 500, 100, 100) and regions[1].score == pytest.approx(0.7)
    assert all(not _boxes_overlap(a.box, b.box) for i, a in enumerate(regions) for b in regions[i + 1:])
    assert json.loads(json.dumps(regions[0].to_dict()))["box"] == [100, 100, 200, 200]
    assert len(top_regions(Heatmap(scores=scores[:2], coords=coords[:2], patch_size_level0=100), k=4)) == 2


def test_conversation_evidence_before_and_after_answers(chat):
    conv = chat.chat(_grid_slide())
    for _ in range(2):
        regions = conv.evidence(k=4)
        assert 1 <= len(regions) <= 4 and regions[0].score == 1.0
        assert all(not _boxes_overlap(a.box, b.box) for i, a in enumerate(regions) for b in regions[i + 1:])
        for r in regions:  # every box is patch-aligned and covers its patches
            x, y, w, h = r.box
            assert (x - 1000) % PS == 0 and w % PS == 0 and h % PS == 0
        conv.ask("Which tissue types are present?", max_new_tokens=3)


def test_region_question_uses_the_region_patches_and_leaves_the_slide_conversation_alone(chat):
    slide = _grid_slide()
    conv = chat.chat(slide)
    conv.ask("Which tissue types are present?", max_new_tokens=4)
    fed, messages, cache_len = list(conv._fed), list(conv.messages), conv._cache.get_seq_length()
    region = (1000, 1000, 3 * PS, 2 * PS)  # 3 x 2 patches
    answer = conv.ask("Is there a focal lesion?", region=region, max_new_tokens=4)
    sub = conv.region_conversation(region)
    assert isinstance(answer, str) and sub.slide.num_patches == 6 and sub.messages[-1]["content"] == answer.strip()
    assert conv._fed == fed and conv.messages == messages and conv._cache.get_seq_length() == cache_len
    # the same as a conversation about exactly those patches
    keep = [0, 1, 2, 10, 11, 12]
    alone = SlideFeatures(features=slide.features[keep], coords=slide.coords[keep], attrs={"patch_size_level0": PS})
    assert chat.chat(alone).ask("Is there a focal lesion?", max_new_tokens=4) == answer
    assert "".join(conv.ask("Anything else?", region=region, stream=True, max_new_tokens=3)) is not None
    assert len(sub.messages) == 4  # follow-ups about the same region continue its conversation


@pytest.mark.parametrize("region,message", [((0, 0, 500, 500), "no tissue patches"),
                                            ((99999, 0, 100, 100), "outside the slide"),
                                            ((0, 0, 0, 10), "positive"), ("1,2,3", "four numbers")])
def test_bad_regions_are_clear_errors(chat, region, message):
    conv = chat.chat(_grid_slide())
    with pytest.raises(SlideChatError, match=message):
        conv.ask("Is there tumour?", region=region)
    assert conv.messages == []


def test_region_needs_coordinates(chat):
    f = _grid_slide()
    no_coords = SlideFeatures(features=f.features, coords=None, attrs={"slide_sha256": "nocoords"})
    with pytest.raises(SlideChatError, match="no coordinates"):
        chat.chat(no_coords).ask("Is there tumour?", region=(0, 0, 10, 10))


def test_report_carries_evidence_in_dict_and_markdown(chat):
    report = chat.report(_grid_slide(seed=1), max_new_tokens=3, summary_max_new_tokens=3)
    assert 1 <= len(report.evidence) <= 4 and report.evidence_error is None
    row = json.loads(json.dumps(report.to_dict()))["evidence"][0]
    assert row["rank"] == 1 and len(row["box"]) == 4 and row["score"] == 1.0
    x, y, w, h = row["box"]
    assert f"| 1 | {x} | {y} | {w} | {h} |" in report.to_markdown()


def test_crop_region_from_the_slide_file(cmu_slide):
    image = crop_region(cmu_slide, (100, 200, 800, 400), max_size=256)
    assert image.size == (256, 128) and image.mode == "RGB"
    assert np.asarray(image).std() > 5  # real pixels, not a blank
    with pytest.raises(SlideChatError, match="outside the slide"):
        crop_region(cmu_slide, (2000, 2900, 500, 500))


def test_cli_region_question_and_evidence(chat, tmp_path, capsys):
    from slidechat.cli import main

    ck = chat.save_pretrained(tmp_path / "ck")
    f = _grid_slide()
    h5 = tmp_path / "g.h5"
    write_features_h5(h5, f.features, f.coords, {**f.attrs, "patch_size": PS, "target_mpp": 0.5, "encoder": "x"})
    rc = main(["chat", "--checkpoint", str(ck), "--slide", str(h5), "-q", "Is there tumour?", "--max-new-tokens", "3",
               "--region", f"1000,1000,{2 * PS},{2 * PS}", "--evidence", "2", "--heatmap", str(tmp_path / "h.json")])
    err = capsys.readouterr().err
    assert rc == 0 and "region (1000, 1000, 512, 512): 4 patches" in err and "evidence 1: x=" in err
    heat = json.loads((tmp_path / "h.json").read_text())
    assert len(heat["scores"]) == 4 and heat["evidence"][0]["rank"] == 1
    rc = main(["chat", "--checkpoint", str(ck), "--slide", str(h5), "-q", "Is there tumour?", "--region", "0,0,10,10"])
    assert rc == 2 and "no tissue patches" in capsys.readouterr().err
