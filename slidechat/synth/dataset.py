"""SynthSlide dataset generation: slides, ground truth, masks, label maps and all text products.

Same ``seed`` -> byte-identical files. Each slide draws from its own ``np.random.default_rng([seed, i])``,
so slide i does not depend on how many slides are generated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from slidechat.errors import ConfigError
from slidechat.synth import text as T
from slidechat.synth.classes import LABEL_NAMES, QUADRANTS, TISSUE_CLASSES
from slidechat.synth.layout import make_layout, measure_truth
from slidechat.synth.render import LevelRenderer, level_dimensions, write_slide_tiff
from slidechat.utils.io import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class SynthSize:
    """Level-0 size of a slide and the level-0 px per label-map cell."""

    width: int
    height: int
    mask_downsample: int
    piece_scale: tuple[float, float] = (0.33, 0.42)


SIZES: dict[str, SynthSize] = {
    # at 0.5 mpp with 224 px patches: tiny ~200 tissue patches, small ~1.5k, medium ~10k, large ~100k+
    "tiny": SynthSize(4608, 3584, 8),
    "small": SynthSize(12288, 9216, 16),
    "medium": SynthSize(32768, 24576, 32),
    "large": SynthSize(98304, 81920, 32, piece_scale=(0.46, 0.5)),
}
MPP = 0.5
MAGNIFICATION = 20
CLOSED_VQA_COLUMNS = ["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer"]
# Beside SlideBench's ``Slide`` (a case's slides joined by ";"): their labels, in the same order and joined the same
# way, so that a question is asked of the case as its slides were named ("A1 H&E").
SLIDE_LABELS_COLUMN = "Slide Labels"


def slide_id_for(seed: int, index: int) -> str:
    return f"synth-s{seed}-{index:04d}"


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate_slide(out_dir: Path, seed: int, index: int, size: str = "tiny", quadrant: str | None = None,
                   lesion_probability: float = 0.75, workers: int = 1) -> dict:
    """Write one slide (+ mask and label map) under ``out_dir`` and return its truth record."""
    spec = SIZES[size]
    rng = np.random.default_rng([seed, index])
    slide_id = slide_id_for(seed, index)
    layout = make_layout(rng, spec.width, spec.height, spec.mask_downsample, quadrant=quadrant,
                         lesion_probability=lesion_probability, piece_scale=spec.piece_scale)
    truth = measure_truth(layout)
    renderer = LevelRenderer(layout, rng)
    rel_slide = f"slides/{slide_id}.tiff"
    rel_mask, rel_labels = f"masks/{slide_id}.png", f"labels/{slide_id}.png"
    write_slide_tiff(out_dir / rel_slide, layout, renderer, slide_id, MPP, MAGNIFICATION, workers=workers)
    _write_bytes_atomic(out_dir / rel_mask, _png_bytes(layout.lesion_mask.astype(np.uint8) * 255))
    _write_bytes_atomic(out_dir / rel_labels, _png_bytes(layout.labels))
    return {
        "slide_id": slide_id,
        "path": rel_slide,
        "width": spec.width,
        "height": spec.height,
        "mpp": MPP,
        "magnification": MAGNIFICATION,
        "level_count": len(level_dimensions(spec.width, spec.height)),
        **truth,
        "mask_path": rel_mask,
        "label_map_path": rel_labels,
        "mask_downsample": spec.mask_downsample,
        "label_names": list(LABEL_NAMES),
        "seed": seed,
        "index": index,
    }


def write_text_products(out_dir: Path, records: list[dict], seed: int) -> None:
    """captions.jsonl, reports.jsonl, instructions.json, closed_vqa.csv, open_vqa.jsonl from the truth."""
    captions, reports, convs, opens, closed = [], [], [], [], []
    for rec in records:
        rng = np.random.default_rng([seed, rec["index"], 7])
        cap = T.caption(rec, rng)
        captions.append({"slide_id": rec["slide_id"], "caption": cap})
        rtext, fields = T.report(rec)
        reports.append({"slide_id": rec["slide_id"], "report_text": rtext, "report": fields})
        convs.append({"id": f"{rec['slide_id']}-conv", "image": [f"{rec['slide_id']}.tiff"],
                      "conversations": T.conversation(rec, cap, rng)})
        for k, q in enumerate(T.open_questions(rec, rng)):
            opens.append({"id": f"{rec['slide_id']}-open{k}", "slide_id": rec["slide_id"], **q})
        closed += [{**q, "slide_id": rec["slide_id"]} for q in T.closed_questions(rec, rng)]
    closed = T.assign_letters(closed, np.random.default_rng([seed, 991]))

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)

    write_text_atomic(out_dir / "truth.jsonl", jsonl(records))
    write_text_atomic(out_dir / "captions.jsonl", jsonl(captions))
    write_text_atomic(out_dir / "reports.jsonl", jsonl(reports))
    write_json_atomic(out_dir / "instructions.json", convs)
    write_text_atomic(out_dir / "open_vqa.jsonl", jsonl(opens))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CLOSED_VQA_COLUMNS)
    for i, q in enumerate(closed):
        writer.writerow([i, q["slide_id"], "SYNTH", q["broad"], q["narrow"], q["question"], *q["options"], q["answer"]])
    write_text_atomic(out_dir / "closed_vqa.csv", buf.getvalue())


def prepare_dataset_folder(out_dir: str | os.PathLike, size: str, count: int, option: str) -> Path:
    """Check the size and the count (named ``option`` in the message) and make the dataset's sub-folders."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if count < 1:
        raise ConfigError(f"{option} must be at least 1")
    out = Path(out_dir)
    for sub in ("slides", "masks", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def generate_dataset(
    out_dir: str | os.PathLike, n: int, seed: int = 0, size: str = "tiny", *,
    lesion_probability: float = 0.75, workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Write ``n`` synthetic slides and their truth/text products to ``out_dir``; return the truth records."""
    out = prepare_dataset_folder(out_dir, size, n, "--n")
    # lesion quadrants balanced over the dataset
    quads = np.tile(np.arange(4), -(-n // 4))[:n][np.random.default_rng([seed, 555]).permutation(n)]
    records = []
    for i in range(n):
        records.append(generate_slide(out, seed, i, size, quadrant=QUADRANTS[int(quads[i])],
                                      lesion_probability=lesion_probability, workers=workers))
        if progress is not None:
            progress(i + 1, n)
    write_text_products(out, records, seed)
    write_json_atomic(out / "dataset.json", {
        "generator": "slidechat.synth", "seed": seed, "size": size, "n": n, "lesion_probability": lesion_probability,
        "mpp": MPP, "magnification": MAGNIFICATION, "tissue_classes": list(TISSUE_CLASSES), "label_names": list(LABEL_NAMES),
    })
    return records
