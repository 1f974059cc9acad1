"""Quick quality measurement of a checkpoint on a FRESH SynthSlide set (a seed training never saw).

* closed VQA (``closed_vqa.csv``, SlideBench format): each question asked in a new conversation with the eval
  prompt format; answers parsed with ``evaluation.answer_parser.parse_choice``; accuracy overall and per category;
* pointing game: for slides with a lesion, is the heatmap's peak patch (centre) inside the lesion mask?
  (also reported: inside the lesion's bounding box).

Uses only the public API (``SlideAssistant.from_pretrained``, ``encode_slide``, ``chat``, ``ask``, ``heatmap``).
``python -m training.measure CHECKPOINT --out runs/eval --n 24 --seed 98765``
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from slidechat.utils.io import read_jsonl, write_json_atomic
from slidechat.training.synth_data import format_mcq

log = logging.getLogger("training")


def _parse_choice(text: str, options: dict[str, str]) -> str | None:
    try:
        from slidechat.evaluation.answer_parser import parse_choice
    except ImportError:  # evaluation package not installed: first standalone capital letter
        import re

        m = re.search(r"\(([A-D])\)|\b([A-D])\b", text)
        return (m.group(1) or m.group(2)) if m else None
    return parse_choice(text, options)


def pointing_hit(heatmap, truth: dict, synth_dir: Path) -> tuple[bool, bool]:
    """(peak patch centre inside the lesion mask, inside the lesion bbox)."""
    from PIL import Image

    i = int(np.argmax(heatmap.scores))
    cx, cy = heatmap.coords[i] + heatmap.patch_size_level0 / 2.0
    x0, y0, x1, y1 = truth["lesion"]["bbox_level0"]
    in_box = bool(x0 <= cx < x1 and y0 <= cy < y1)
    mask = np.asarray(Image.open(synth_dir / truth["mask_path"])) > 0
    ds = float(truth["mask_downsample"])
    r, c = int(cy // ds), int(cx // ds)
    in_mask = bool(0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c])
    return in_mask, in_box


def measure_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, n: int = 24, seed: int = 98765,
                       size: str = "tiny", max_new_tokens: int = 16, assistant=None,
                       synth_dir: str | Path | None = None) -> dict:
    """Generate (or reuse) a fresh SynthSlide set and score ``checkpoint`` on it; writes ``<out>/measure.json``."""
    from slidechat.model.assistant import SlideAssistant
    from slidechat.synth import generate_dataset

    out = Path(out_dir)
    sd = Path(synth_dir) if synth_dir else out / f"synth-seed{seed}"
    if not (sd / "dataset.json").exists():
        generate_dataset(sd, n, seed=seed, size=size)
    if assistant is None:
        assistant = SlideAssistant.from_pretrained(checkpoint, device="cpu")
    assistant.eval()
    truths = {t["slide_id"]: t for t in read_jsonl(sd / "truth.jsonl")}
    t0 = time.perf_counter()
    encoded = {sid: assistant.encode_slide(sd / t["path"], cache_dir=out / "feature-cache") for sid, t in truths.items()}
    t_encode = time.perf_counter() - t0

    records = []
    with open(sd / "closed_vqa.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    t1 = time.perf_counter()
    for row in rows:
        options = {k: row[k] for k in "ABCD" if row.get(k)}
        conv = assistant.chat(encoded[row["Slide"]])
        output = conv.ask(format_mcq(row["Question"], [row[k] for k in "ABCD"]), max_new_tokens=max_new_tokens)
        parsed = _parse_choice(output, options)
        records.append({"id": row["ID"], "slide": row["Slide"], "category": row["Narrow Category"],
                        "broad": row["Broad Category"], "answer": row["Answer"], "output": output, "parsed": parsed,
                        "correct": parsed == row["Answer"]})
    t_vqa = time.perf_counter() - t1
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r["correct"])
    hits_mask, hits_box = [], []
    for sid, t in truths.items():
        if not t.get("lesion"):
            continue
        conv = assistant.chat(encoded[sid])
        if assistant.config.projector != "qformer":  # the linear projector's heatmap is weighted by the LLM's attention
            conv.ask("Is there a focal lesion, and where is it?", max_new_tokens=8)
        hm = conv.heatmap()
        m, b = pointing_hit(hm, t, sd)
        hits_mask.append(m)
        hits_box.append(b)
    summary = {
        "checkpoint": str(checkpoint), "eval_seed": seed, "slides": len(truths), "questions": len(records),
        "closed_vqa_accuracy": round(float(np.mean([r["correct"] for r in records])), 4) if records else None,
        "per_category": {c: {"accuracy": round(float(np.mean(v)), 4), "n": len(v)} for c, v in sorted(by_cat.items())},
        "unparseable": sum(r["parsed"] is None for r in records),
        "pointing_game_mask": round(float(np.mean(hits_mask)), 4) if hits_mask else None,
        "pointing_game_bbox": round(float(np.mean(hits_box)), 4) if hits_box else None,
        "lesion_slides": len(hits_mask),
        "encode_s": round(t_encode, 1), "vqa_s": round(t_vqa, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "measure.json", {"summary": summary, "records": records})
    log.info("[measure] %s", json.dumps(summary))
    return {"summary": summary, "records": records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.measure", description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--out", default="runs/measure")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=98765)
    p.add_argument("--size", default="tiny")
    p.add_argument("--synth-dir", default=None, help="reuse an existing SynthSlide folder")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = measure_checkpoint(a.checkpoint, a.out, n=a.n, seed=a.seed, size=a.size, synth_dir=a.synth_dir)
    print(json.dumps(res["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
