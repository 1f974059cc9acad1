"""Tissue detection benchmark: Dice against known masks on faint H&E, IHC DAB/haematoxylin, pen marks, debris.

Each stain scene (``slidechat.synth.stains``) is written as an Aperio-layout JPEG slide and read back through
``SlideReader.thumbnail`` (the path extraction uses). On the same thumbnail it compares

  ours          the combined detector (saturation or optical density, pen ink and debris removed; default)
  saturation    the detector before it (saturation Otsu + hysteresis; ``TissueConfig(method="saturation")``)
  otsu          Otsu on the median-filtered grey level (the classic TRIDENT/CLAM-style baseline)
  hs2p_hsv      hs2p's default HSV thresholds (``hs2p.segmentation``, when hs2p is installed)
  hs2p_otsu     hs2p's Otsu on median-filtered saturation (CLAM's), when hs2p is installed

and reports per palette the median Dice over the seeds, the share of pen ink and of debris kept out of
the mask, as a table, JSON and a bar plot in benchmarks/results/.

    python benchmarks/tissue.py                 # 4 palettes x 2 seeds, ~1-2 min on 2 cores
    python benchmarks/tissue.py --seeds 3 --size 4096x3072
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _hs2p(method: str):
    try:
        from hs2p.configs import SegmentationConfig
        from hs2p.segmentation import segment_tissue_image
    except ImportError:
        return None
    cfg = SegmentationConfig(method=method)
    return lambda thumb: segment_tissue_image(thumb, config=cfg) > 0


def detectors() -> dict:
    from slidechat.slide.config import TissueConfig
    from slidechat.slide.tissue import tissue_mask_from_rgb

    out = {name: (lambda thumb, m=method: tissue_mask_from_rgb(thumb, TissueConfig(method=m))[0])
           for name, method in [("ours", "combined"), ("saturation", "saturation"), ("otsu", "otsu")]}
    for name, method in [("hs2p_hsv", "hsv"), ("hs2p_otsu", "otsu")]:
        fn = _hs2p(method)
        if fn is not None:
            out[name] = fn
    return out


def _at(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A level-0 mask at thumbnail ``shape`` (area average > 0.5)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.BOX)
    return np.asarray(img) > 127


def score(pred: np.ndarray, scene) -> dict:
    truth, pen, debris = (_at(m, pred.shape) for m in (scene.tissue, scene.pen, scene.debris))
    dice = 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())
    return {"dice": float(dice), "pen_excluded": float(1 - (pred & pen).sum() / max(1, pen.sum())),
            "debris_excluded": float(1 - (pred & debris).sum() / max(1, debris.sum()))}


def run(palettes: list[str], seeds: int, size: tuple[int, int], work: Path) -> dict:
    from slidechat.slide.reader import SlideReader
    from slidechat.synth.pyramid import write_pyramid
    from slidechat.synth.stains import render_stain_scene

    methods = detectors()
    rows: dict = {p: {m: [] for m in methods} for p in palettes}
    seconds: dict = {m: [] for m in methods}
    for seed in range(seeds):
        for palette in palettes:
            scene = render_stain_scene(seed, palette, width=size[0], height=size[1])
            path = write_pyramid(work / f"{palette}-{seed}.svs", scene.rgb, mpp=0.5, compression="jpeg")
            with SlideReader(path) as reader:
                thumb = np.asarray(reader.thumbnail(1024).convert("RGB"))
            for name, fn in methods.items():
                t0 = time.perf_counter()
                pred = np.asarray(fn(thumb), dtype=bool)
                seconds[name].append(time.perf_counter() - t0)
                rows[palette][name].append(score(pred, scene))
    summary = {p: {m: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for m, rs in ms.items()}
               for p, ms in rows.items()}
    return {"summary": summary, "runs": rows, "seconds_per_thumbnail": {m: float(np.median(s)) for m, s in seconds.items()}}


def table(result: dict) -> str:
    summary = result["summary"]
    methods = list(next(iter(summary.values())))
    lines = ["palette     " + "".join(f"{m:>22}" for m in methods), " " * 12 + "   dice / pen / debris" * len(methods)]
    for palette, ms in summary.items():
        cells = "".join(f"{v['dice']:>10.3f} {v['pen_excluded']:>5.2f} {v['debris_excluded']:>5.2f}" for v in ms.values())
        lines.append(f"{palette:<12}{cells}")
    lines.append("s/thumbnail " + "".join(f"{result['seconds_per_thumbnail'][m]:>22.3f}" for m in methods))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    palettes, methods = list(summary), list(next(iter(summary.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(methods)
    for ax, key, title in [(axes[0], "dice", "Dice vs known tissue mask"), (axes[1], "pen_excluded", "pen ink excluded")]:
        for i, m in enumerate(methods):
            ax.bar(np.arange(len(palettes)) + i * width, [summary[p][m][key] for p in palettes], width, label=m)
        ax.set_xticks(np.arange(len(palettes)) + 0.4 - width / 2, palettes)
        ax.axhline(0.95, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from slidechat.synth.stains import PALETTES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--size", default="3072x2304", help="level-0 WxH of each scene")
    ap.add_argument("--palettes", nargs="*", default=list(PALETTES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.palettes, args.seeds, (w, h), Path(tmp))
    result["config"] = {"seeds": args.seeds, "size": [w, h], "thumbnail": 1024, "machine": platform.platform(),
                        "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tissue.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "tissue.png")
    print(table(result))
    print(f"wrote {out / 'tissue.json'} and {out / 'tissue.png'} ({result['config']['seconds']}s)")


if __name__ == "__main__":
    main()
