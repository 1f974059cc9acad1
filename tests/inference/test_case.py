"""Cases: several slides in one conversation (prompt layout, KV reuse, per-slide heatmaps, evidence and region
questions, the training forward), and the cases CSV, on the tiny random Q-Former model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidechat import prompts
from slidechat.errors import DataError, SlideChatError
from slidechat.features.store import SlideFeatures
from slidechat.inference.case import Case, as_case, read_cases_csv
from slidechat.model.processor import SLIDE_TOKEN_ID

pytestmark = pytest.mark.usefixtures("single_torch_thread")
PS = 256


def _slide(side: int, seed: int, dim: int = 32) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    gy, gx = np.divmod(np.arange(side * side), side)
    coords = np.stack([gx, gy], 1).astype(np.int64) * PS
    return SlideFeatures(features=rng.standard_normal((side * side, dim)).astype(np.float32), coords=coords,
                         attrs={"slide_id": f"s{seed}", "slide_sha256": f"case-{side}-{seed}", "patch_size_level0": PS,
                                "slide_width": side * PS, "slide_height": side * PS})


@pytest.fixture(scope="module")
def chat(tiny_qformer_chat):
    return tiny_qformer_chat


def test_case_prompt_holds_every_slide_behind_its_marker(chat):
    proc = chat.processor
    ids = proc.prompt_ids([{"role": "user", "content": "Which slide shows the lesion?"}], [3, 5],
                          slide_labels=["A1 H&E", None])
    assert ids.count(SLIDE_TOKEN_ID) == 8
    text = proc.decode([t for t in ids if t != SLIDE_TOKEN_ID])
    assert "Slide 1 (A1 H&E):" in text and "Slide 2:" in text and text.index("Slide 1") < text.index("Slide 2")
    # one slide: exactly the single-slide layout (placeholder first, no marker)
    one = proc.prompt_ids([{"role": "user", "content": "Describe."}], 4)
    same = proc.prompt_ids([{"role": "user", "content": prompts.SLIDE_PLACEHOLDER + "\nDescribe."}], [4])
    assert one == same and "Slide 1" not in proc.decode([t for t in one if t != SLIDE_TOKEN_ID])
    # placeholders the data placed itself are kept when they match the slide count
    placed = proc.prompt_ids([{"role": "user", "content": "<image> then <image>\nCompare."}], [2, 2])
    assert "then" in proc.decode([t for t in placed if t != SLIDE_TOKEN_ID]) and placed.count(SLIDE_TOKEN_ID) == 4


def test_case_conversation_reuses_its_cache_and_matches_a_fresh_one(chat):
    slides = [_slide(6, 1), _slide(5, 2)]
    conv = chat.chat(slides, labels=["A1", "B1"], max_new_tokens=6)
    assert conv.num_slides == 2 and [s.num_patches for s in conv.slides] == [36, 25]
    first = conv.ask("Is tumour present in any block?")
    t = sum(int(st.tokens.shape[0]) for st in conv.states)
    assert conv.last_prefill_tokens > t
    second = conv.ask("Which slide shows the lesion?")
    assert conv.last_prefill_tokens < 40  # only the new turn was fed
    fresh = chat.chat(slides, labels=["A1", "B1"], max_new_tokens=6, kv_reuse=False)
    assert [fresh.ask("Is tumour present in any block?"), fresh.ask("Which slide shows the lesion?")] == [first, second]


def test_slide_order_and_count_change_what_the_llm_reads(chat):
    a, b = _slide(6, 1), _slide(5, 2)
    msgs = [{"role": "user", "content": "Describe the case."}]
    ab, ba = chat.chat([a, b]), chat.chat([b, a])
    ids = ab.prompt_ids(msgs)
    emb_ab, emb_ba = ab._embed(ids, 0, ids), ba._embed(ba.prompt_ids(msgs), 0, ba.prompt_ids(msgs))
    assert emb_ab.shape == emb_ba.shape and not torch.allclose(emb_ab, emb_ba)
    spans = ab.slide_spans(ids)
    assert len(spans) == 2 and spans[0][1] < spans[1][0]  # the second marker sits between the slides
    assert torch.allclose(emb_ab[spans[1][0]:spans[1][1]], ab.states[1].tokens.to(emb_ab.dtype))
    single = chat.chat([a])
    assert single.prompt_ids(msgs) == chat.chat(a).prompt_ids(msgs)


def test_per_slide_heatmaps_evidence_and_regions(chat):
    conv = chat.chat(Case("C1", [_slide(6, 3), _slide(4, 4)], ["A1", "A2"]), max_new_tokens=4)
    conv.ask("In how many slides is necrosis present?")
    maps = [conv.heatmap("llm", slide=i) for i in range(2)]
    assert [len(m.scores) for m in maps] == [36, 16] and all(m.scores.max() == pytest.approx(1.0) for m in maps)
    ev = conv.evidence(k=4)
    assert len(ev) == 4 and [r.rank for r in ev] == [1, 2, 3, 4]
    assert all(r.slide in (0, 1) for r in ev) and ev == sorted(ev, key=lambda r: -r.score)
    assert {r.to_dict()["slide"] for r in ev} <= {0, 1}
    only_second = conv.evidence(k=2, slide=1)
    assert all(r.slide == 1 for r in only_second)
    with pytest.raises(SlideChatError, match="say which one"):
        conv.ask("What is here?", region=(0, 0, 2 * PS, 2 * PS))
    before = list(conv.messages)
    answer = conv.ask("What is here?", region=(0, 0, 2 * PS, 2 * PS), slide=1)
    assert isinstance(answer, str) and conv.messages == before
    sub = conv.region_conversation((0, 0, 2 * PS, 2 * PS), slide=1)
    assert sub.num_slides == 1 and sub.slide.num_patches == 4 and sub.slide.sha256.startswith("case-4-4@")
    with pytest.raises(SlideChatError, match="slide must be 0..1"):
        conv.heatmap(slide=2)


def test_training_forward_mixes_single_slides_and_cases(chat):
    model = chat.model
    a, b = _slide(6, 1), _slide(5, 2)
    fa, fb = (torch.from_numpy(s.features) for s in (a, b))
    ca, cb = (torch.from_numpy(s.coords) for s in (a, b))
    rows = [model.tokenize_conversation([{"role": "user", "content": "Describe."},
                                         {"role": "assistant", "content": "tissue"}]),
            model.tokenize_conversation([{"role": "user", "content": "Which slide?"},
                                         {"role": "assistant", "content": "slide 2"}], num_slides=2)]
    assert [int((r["input_ids"] == SLIDE_TOKEN_ID).sum()) for r in rows] == [1, 2]
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r["input_ids"], (0, n - len(r["input_ids"])), value=0) for r in rows])
    labels = torch.stack([torch.nn.functional.pad(r["labels"], (0, n - len(r["labels"])), value=-100) for r in rows])
    mask = torch.stack([(torch.arange(n) < len(r["input_ids"])).long() for r in rows])
    with torch.no_grad():
        out = model(ids, mask, labels, slide_features=[fa, [fa, fb]], slide_coords=[ca, [ca, cb]])
        alone = model(ids[1:], mask[1:], labels[1:], slide_features=[[fa, fb]], slide_coords=[[ca, cb]])
    assert torch.isfinite(out.loss) and torch.isfinite(alone.loss)
    with pytest.raises(DataError, match="2 <slide> placeholders but 1 slides"):
        model(ids[1:], mask[1:], labels[1:], slide_features=[fa], slide_coords=[ca])


def test_cases_csv_groups_rows_in_order(tmp_path):
    (tmp_path / "blocks").mkdir()
    p = tmp_path / "cases.csv"
    p.write_text("case_id,slide_path,label\nC2,blocks/b.svs,B1 H&E\nC1,/abs/a.svs,\nC2,blocks/c.svs,B2 IHC\n")
    cases = read_cases_csv(p)
    assert [c.case_id for c in cases] == ["C2", "C1"]
    assert cases[0].slides == [tmp_path / "blocks/b.svs", tmp_path / "blocks/c.svs"]
    assert cases[0].labels == ["B1 H&E", "B2 IHC"] and cases[1].labels == [None]
    assert cases[0].name(1) == "Slide 2 (B2 IHC)" and cases[1].name(0) == "Slide 1"


@pytest.mark.parametrize("text, message", [
    ("case,slide\nC1,a.svs\n", "case_id"),
    ("case_id,slide_path\n,a.svs\n", ":2: every row needs a case_id"),
    ("case_id,slide_path\nC1,a.svs\nC1,a.svs\n", ":3: .*listed twice"),
    ("case_id,slide_path\n", "lists no cases"),
])
def test_bad_cases_csv_is_a_clear_error(tmp_path, text, message):
    p = tmp_path / "cases.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=message):
        read_cases_csv(p)


def test_case_objects_check_their_slides():
    assert len(as_case("a.svs")) == 1 and len(as_case(["a", "b"], ["x"])) == 2
    assert as_case(["a", "b"], ["x"]).labels == ["x", None]
    with pytest.raises(DataError, match="no slides"):
        Case("C", [])
    with pytest.raises(DataError, match="3 labels for 2 slides"):
        Case("C", ["a", "b"], ["1", "2", "3"])
