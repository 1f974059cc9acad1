"""Shared fixtures. Everything is offline; slides are generated on the fly or copied from tests/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(__file__).parent / "data"
# Screenshots, plots and other artefacts tests leave for humans to look at.
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """A real Aperio SVS region (CMU-1, 2220x2967, mpp 0.499, one level, JPEG tiles)."""
    return DATA_DIR / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    return TEST_OUTPUT


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """Four tiny SynthSlide slides (seed 0) with truth and text products; shared by the whole session."""
    from slidechat.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n=4, seed=0, size="tiny")
    return out
