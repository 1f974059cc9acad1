"""extract_slide with DataLoader worker processes leaves no process-wide state behind that could slow the
generation that follows in the same process (`slidechat report` without prefetch): the intra-op thread
count is unchanged and no worker process outlives the call."""

import multiprocessing as mp

import torch

from slidechat.encoders import load_encoder
from slidechat.features.extract import extract_slide
from slidechat.features.store import load_features
from slidechat.slide.config import ExtractionConfig
from slidechat.utils.io import read_jsonl


def test_worker_process_extraction_leaves_no_state_behind(synth_dataset, tmp_path):
    torch.set_num_threads(2)
    rec = read_jsonl(synth_dataset / "truth.jsonl")[0]
    out = extract_slide(synth_dataset / rec["path"], load_encoder("demo-cnn"), tmp_path / "s.h5",
                        ExtractionConfig(target_mpp=2.0, num_workers=2, reader_mode="processes"))
    assert load_features(out).features.shape[0] > 0
    assert torch.get_num_threads() == 2  # the workers' set_num_threads(1) stays in the workers
    assert mp.active_children() == []  # DataLoader workers are gone (not persistent, not left spinning)
