"""Several slides opened as one case in the app's service, on the tiny random model with a real encoder: one
conversation over both, the viewer switches slide (its layers and heatmap follow), evidence and region questions
name the slide they are on; opening a single slide afterwards leaves the case."""

from __future__ import annotations

import numpy as np
import pytest

from slidechat.app.config import AppConfig
from slidechat.app.service import ChatService
from slidechat.app.session import SessionRegistry
from slidechat.errors import SlideChatError
from slidechat.utils.io import read_jsonl


def test_case_of_two_slides_switches_viewer_and_names_slides(tiny_slide_assistant, synth_dataset, tmp_path):
    records = read_jsonl(synth_dataset / "truth.jsonl")
    paths = [synth_dataset / records[i]["path"] for i in (0, 3)]
    service = ChatService(tiny_slide_assistant, AppConfig(cache_dir=tmp_path / "cache", n_examples=0,
                                                          max_new_tokens=4),
                          SessionRegistry(tmp_path / "sessions"))
    try:
        session = service.registry.get("case")
        with pytest.raises(SlideChatError, match="2 to"):
            service.open_case(session, paths[:1])
        summary = service.open_case(session, paths, names=["A1 H&E", "B2 H&E"])
        assert [m.name for m in session.case] == ["Slide 1 (A1 H&E)", "Slide 2 (B2 H&E)"]
        assert summary.num_patches == sum(m.encoded.num_patches for m in session.case)
        assert service.tiles.for_session("case").path == paths[0].resolve() and session.active == 0
        first_dzi = service.viewer_state(session)["dzi"]

        list(service.ask(session, "Which slide shows a lesion?"))
        assert len(session.case_heatmaps) == 2
        for i, hm in enumerate(session.case_heatmaps):
            assert hm.scores.shape == (session.case[i].encoded.num_patches,)
        assert session.evidence and all(e["slide_name"] == session.case[e["slide"]].name for e in session.evidence)
        assert all(e["crop"] is not None for e in session.evidence)
        shown = service.viewer_state(session)["evidence"]
        assert len(shown) == sum(e["slide"] == 0 for e in session.evidence)  # the viewer boxes of slide 1 only

        service.select_slide(session, 1)
        state = service.viewer_state(session)
        assert service.tiles.for_session("case").path == paths[1].resolve() and state["dzi"] != first_dzi
        assert {"tissue", "grid", "heatmap"} <= set(state["overlays"])
        assert session.heatmap is session.case_heatmaps[1] and session.level0_size == session.case[1].tiled.level0
        assert len(state["evidence"]) == sum(e["slide"] == 1 for e in session.evidence)
        with pytest.raises(SlideChatError, match="slides 1 to 2"):
            service.select_slide(session, 2)

        w, h = session.level0_size
        box = (0, 0, w // 2 + 1, h)
        list(service.ask(session, "What is here?", region=box))
        assert session.transcript[-2]["content"] == (f"[Slide 2 (B2 H&E) region 0,0 {box[2]}×{box[3]} px] "
                                                     "What is here?")
        assert session.evidence and {e["slide"] for e in session.evidence} == {1}
        coords = np.asarray(session.heatmap.coords)
        assert (coords[:, 0] < box[2]).all()  # the region's own patches, on slide 2

        markdown, json_path, html_path = service.make_report(session)  # the case as a whole
        assert session.report is not None and markdown.strip() and json_path.is_file() and html_path.is_file()
        assert "data:image/" in html_path.read_text()  # the evidence crops, cut from their own slides

        service.open_slide(session, paths[0])  # a single slide again: the case is closed
        assert session.case == [] and session.conversation.num_slides == 1
    finally:
        service.registry.close_all()


@pytest.mark.usefixtures("single_torch_thread")
def test_demo_case_of_a_scanner_slide_and_a_synthslide(cmu_slide, synth_dataset, tmp_path):
    """The shipped checkpoint in the app's service: a real scanner slide and a SynthSlide as one case; the notice
    names the scanner slide (unlike the training slides), the SynthSlide passes, the answer, heatmaps, evidence and
    the case report cover both."""
    import json

    import slidechat

    synth = sorted((synth_dataset / "slides").glob("*.tiff"))[0]
    service = ChatService(slidechat.load("demo", device="cpu"),
                          AppConfig(cache_dir=tmp_path / "cache", n_examples=0, max_new_tokens=32,
                                    report_max_new_tokens=8, report_summary_tokens=16),
                          SessionRegistry(tmp_path / "sessions"))
    try:
        session = service.registry.get("mixed")
        summary = service.open_case(session, [cmu_slide, synth], names=["skin H&E", "synthetic H&E"])
        assert summary.notice and summary.notice.startswith("Slide 1 (skin H&E): This slide is unlike the slides")
        assert "Slide 2" not in summary.notice
        assert "like training slides: no" in session.info["Slide 1 (skin H&E)"]
        assert "like training slides: yes" in session.info["Slide 2 (synthetic H&E)"]

        answer = list(service.ask(session, "Which slide shows the focal lesion?"))[-1]
        assert answer.strip() and session.transcript[-1]["content"] == answer
        assert [len(h.scores) for h in session.case_heatmaps] == [m.encoded.num_patches for m in session.case]
        assert session.evidence and {e["slide"] for e in session.evidence} <= {0, 1}
        service.select_slide(session, 1)
        assert service.tiles.for_session("mixed").path == synth.resolve()

        markdown, json_path, _ = service.make_report(session)
        record = json.loads(json_path.read_text())
        assert markdown.strip() and record["fields"] and record["evidence"]
        assert "like training slides: no" in record["slide"]["Slide 1 (skin H&E)"]
        assert all(e["slide_name"] == f"Slide {e['slide'] + 1} ({('skin', 'synthetic')[e['slide']]} H&E)"
                   for e in record["evidence"])
    finally:
        service.registry.close_all()
