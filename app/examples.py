"""Bundled example slides: a few tiny SynthSlide slides generated once into the app's cache folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_MARKER = "examples.json"


def example_slides(examples_dir: str | Path, n: int = 2, seed: int = 7, size: str = "tiny") -> dict[str, Path]:
    """``{label: slide path}`` of ``n`` synthetic example slides, generating them on first use.

    Labels say what the slide holds (e.g. "synthetic 1: tumour focus, upper-left") so a user can check the
    answers. Generation is skipped when the folder already holds a matching set; returns {} (and logs) when
    the generator is unavailable, so the app still starts.
    """
    out = Path(examples_dir)
    marker = out / _MARKER
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
            paths = {k: out / v for k, v in saved.items()}
            if len(paths) >= n and all(p.is_file() for p in paths.values()):
                return dict(list(paths.items())[:n])
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    try:
        from slidechat.synth import generate_dataset
        from slidechat.utils.io import write_json_atomic
    except ImportError as exc:  # pragma: no cover - synth is part of the package
        log.warning("no example slides: %s", exc)
        return {}
    log.info("generating %d example slides in %s (first start only)", n, out)
    records = generate_dataset(out, n=n, seed=seed, size=size)
    labels: dict[str, str] = {}
    for i, rec in enumerate(records, start=1):
        lesion = rec.get("lesion")
        what = f"{lesion['class'].replace('_', ' ')} focus, {lesion['quadrant']}" if lesion else "no focal lesion"
        labels[f"Synthetic example {i} ({what})"] = str(rec["path"])
    write_json_atomic(marker, labels)
    return {k: out / v for k, v in labels.items()}
