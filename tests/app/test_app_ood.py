"""The out-of-distribution notice after opening a slide: shown in the status area (and the facts) when the slide's
features are unlike the checkpoint's training statistics, absent when they are alike or when there are none."""

from __future__ import annotations

import numpy as np

from slidechat.app.config import AppConfig
from slidechat.app.service import ChatService
from slidechat.app.session import SessionRegistry
from slidechat.inference.ood import score_features
from slidechat.model.feature_stats import compute_feature_stats
from slidechat.utils.io import read_jsonl


class _WithTrainingStats:
    """The real tiny assistant, scoring each encoded slide against ``stats`` as a checkpoint with them would."""

    def __init__(self, assistant):
        self._assistant, self.stats = assistant, None

    def encode_slide(self, path, **kw):
        slide = self._assistant.encode_slide(path, **kw)
        slide.ood = None if self.stats is None else score_features(self.stats, np.asarray(slide.features.features))
        return slide

    def __getattr__(self, name):
        return getattr(self._assistant, name)


def test_ood_notice_in_status_only_for_unlike_slides(tiny_slide_assistant, synth_dataset, tmp_path):
    from slidechat.app.ui import Handlers

    slide = synth_dataset / read_jsonl(synth_dataset / "truth.jsonl")[1]["path"]
    assistant = _WithTrainingStats(tiny_slide_assistant)
    service = ChatService(assistant, AppConfig(cache_dir=tmp_path / "cache", n_examples=0, max_new_tokens=4),
                          SessionRegistry(tmp_path / "sessions"))
    handlers = Handlers(service, {})

    def open_status(sid: str) -> tuple[str, dict]:
        session = service.registry.get(sid)
        *_, (last, done) = handlers._open(session, slide, "case", None, False, 0.5, lambda *a, **k: None)
        assert done and "Opened case" in last[0]
        return last[0], session.info

    try:
        status, facts = open_status("no-stats")  # a checkpoint without statistics: no notice, nothing breaks
        assert "sc-warn" not in status and "like training slides" not in facts

        feats = np.asarray(service.registry.get("no-stats").slide.features.features, dtype=np.float32)
        rng = np.random.default_rng(0)
        half = max(8, len(feats) // 2)
        alike = [feats[rng.permutation(len(feats))[:half]] + rng.normal(0, 0.01, (1, feats.shape[1])) for _ in range(10)]
        assistant.stats = compute_feature_stats(alike, rank=8, folds=5)
        status, facts = open_status("alike")
        assert "sc-warn" not in status and facts["like training slides"].startswith("yes")

        far = [a + 25.0 * feats.std() + 10.0 for a in alike]  # training slides nothing like this one
        assistant.stats = compute_feature_stats(far, rank=8, folds=5)
        status, facts = open_status("unlike")
        assert "sc-warn" in status and "unlike the slides this model was trained on" in status
        assert facts["like training slides"].startswith("no")

        # the reminder stays beside every answer about an unlike slide, and only there
        for sid, unlike in (("unlike", True), ("alike", False)):
            session = service.registry.get(sid)
            list(service.ask(session, "Is there tumour in this slide?"))
            answered = handlers._answered(session, False, 0.5)[3]
            assert "Answered from the whole slide" in answered
            assert ("This slide is unlike the slides this model was trained on" in answered) == unlike
    finally:
        service.registry.close_all()
