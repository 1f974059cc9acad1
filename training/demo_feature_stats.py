"""Feature statistics of the shipped demo checkpoint, and how well its out-of-distribution warning works.

    python -m slidechat.training.demo_feature_stats write            # -> slidechat/assets/demo/feature_stats.*
    python -m slidechat.training.demo_feature_stats check            # false alarms and scores on unseen slides

``write`` regenerates the first ``--n`` slides of the demo recipe's training set (same seed and size: slide i
depends only on (seed, i)), extracts them with the checkpoint's own patch encoder and extraction settings, and
writes the statistics with the function training uses (``training.checkpoint.write_feature_stats``).

``check`` scores SynthSlides from a fresh seed (should pass), the real scanner slide in tests/data (should be
flagged) and SynthSlides re-stained with a foreign palette (IHC: haematoxylin + DAB instead of eosin; should be
flagged), and prints the scores and the false-alarm rate as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "training" / "recipes" / "demo.yaml"
DEMO_DIR = REPO / "slidechat" / "assets" / "demo"
REAL_SLIDE = REPO / "tests" / "data" / "cmu-1-small-region.svs"


class RestainedRenderer:
    """A SynthSlide renderer in another palette of ``slidechat.synth.stains`` (same tissue, other stain): colour
    deconvolution into haematoxylin + eosin, then re-mixing with the palette's haematoxylin strength and second
    stain (patchy where the palette says so, e.g. DAB marking some regions and not others)."""

    CELL = 64  # level-0 px per cell of the patchiness field

    def __init__(self, inner, palette: str = "ihc_dab", seed: int = 0) -> None:
        from slidechat.synth.stains import PALETTES
        from slidechat.synth.textures import EOSIN, GLASS_RGB, HEMATOXYLIN, smooth_noise

        he, other = PALETTES["he"], PALETTES[palette]
        self.inner = inner
        self.glass = GLASS_RGB
        self.unmix = np.linalg.pinv(np.stack([HEMATOXYLIN, EOSIN]))  # [3, 2]: OD -> (h, e)
        self.mix = np.stack([HEMATOXYLIN * other[1] / he[1], other[2] * other[3] / he[3]])  # [2, 3]
        self.patchy = other[4]
        self.field = smooth_noise(np.random.default_rng(seed), 64, 4.0)

    def render(self, downsample: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        from scipy import ndimage

        rgb = self.inner.render(downsample, x0, y0, w, h).astype(np.float32)
        od = -np.log(np.clip(rgb, 1.0, None) / self.glass)
        conc = np.clip(od @ self.unmix, 0.0, None)
        if self.patchy:
            ys = (np.arange(y0, y0 + h) + 0.5) * downsample / self.CELL
            xs = (np.arange(x0, x0 + w) + 0.5) * downsample / self.CELL
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            low = ndimage.map_coordinates(self.field, [yy.ravel(), xx.ravel()], order=1, mode="grid-wrap")
            conc[..., 1] *= np.clip(1.6 * low.reshape(h, w) + 0.3, 0.0, 2.0)
        return np.clip(self.glass * np.exp(-(conc @ self.mix)), 0, 255).astype(np.uint8)


def write_restained_slide(out_dir: str | Path, seed: int, index: int, size: str = "tiny",
                          palette: str = "ihc_dab") -> Path:
    """Slide ``index`` of SynthSlide seed ``seed`` (same tissue layout), stained with ``palette``."""
    from slidechat.synth.dataset import MAGNIFICATION, MPP, SIZES, slide_id_for
    from slidechat.synth.layout import make_layout
    from slidechat.synth.render import LevelRenderer, write_slide_tiff

    spec = SIZES[size]
    rng = np.random.default_rng([seed, index])
    layout = make_layout(rng, spec.width, spec.height, spec.mask_downsample, piece_scale=spec.piece_scale)
    slide_id = f"{slide_id_for(seed, index)}-{palette}"
    path = Path(out_dir) / f"{slide_id}.tiff"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_slide_tiff(path, layout, RestainedRenderer(LevelRenderer(layout, rng), palette, seed=index), slide_id, MPP,
                     MAGNIFICATION)
    return path


def _demo_settings():
    from slidechat.training.recipe import load_recipe

    recipe = load_recipe(DEMO_RECIPE)
    return recipe.synth, recipe.extract


def _demo_encoder(checkpoint: Path):
    from slidechat.encoders import load_encoder

    return load_encoder("demo-cnn", weights=str(checkpoint / "patch_encoder.safetensors"))


def _extract(slides_dir: Path, features_dir: Path, checkpoint: Path) -> list[Path]:
    from slidechat.features.extract import extract_many

    _, extract = _demo_settings()
    summary = extract_many([str(slides_dir)], _demo_encoder(checkpoint), features_dir, extract)
    if summary.failed:
        raise SystemExit(f"extraction failed for {summary.failed} slides in {slides_dir}")
    return sorted(features_dir.glob("*.h5"))


def write_demo_stats(n: int, work: Path, out: Path) -> dict:
    """Regenerate ``n`` demo training slides, extract them, write ``feature_stats.*`` into ``out``."""
    from slidechat.synth import generate_dataset
    from slidechat.training.checkpoint import write_feature_stats

    synth, _ = _demo_settings()
    t = time.perf_counter()
    synth_dir = work / f"synth-seed{synth.seed}-n{n}"
    if not (synth_dir / "dataset.json").exists():
        generate_dataset(synth_dir, n, seed=synth.seed, size=synth.size)
    features = work / f"features-seed{synth.seed}-n{n}"
    _extract(synth_dir / "slides", features, out)
    write_feature_stats(out, features)
    meta = json.loads((out / "feature_stats.json").read_text())
    return {"slides": n, "seed": synth.seed, "size": synth.size, "threshold": meta["threshold"],
            "calibration": meta["calibration"], "wall_time_s": round(time.perf_counter() - t, 1)}


def _scores(model, paths: list[Path], cache_dir: Path) -> list[dict]:
    out = []
    for p in paths:
        enc = model.encode_slide(p, cache_dir=cache_dir)
        r = enc.ood
        out.append({"slide": p.name, "score": r.score, "flagged": r.flagged, "mean_distance": r.mean_distance,
                    "outlier_fraction": r.outlier_fraction, "stain_distance": r.stain_distance,
                    "patches": enc.num_patches})
    return out


def check_demo_stats(work: Path, checkpoint: Path, n: int, seed: int, n_restained: int) -> dict:
    """Scores of fresh-seed SynthSlides, the real scanner slide and re-stained SynthSlides under ``checkpoint``."""
    import slidechat
    from slidechat.synth import generate_dataset

    model = slidechat.load(str(checkpoint), device="cpu")
    cache = work / "feature-cache"
    fresh = work / f"synth-seed{seed}-n{n}"
    if not (fresh / "dataset.json").exists():
        generate_dataset(fresh, n, seed=seed, size="tiny")
    restained = []
    for i in range(n_restained):
        path = work / "restained" / f"synth-s{seed}-{i:04d}-ihc_dab.tiff"
        restained.append(path if path.exists() else write_restained_slide(work / "restained", seed, i))
    fresh_scores = _scores(model, sorted((fresh / "slides").glob("*.tiff")), cache)
    real = _scores(model, [REAL_SLIDE], cache)
    stained = _scores(model, restained, cache)
    stats = model.encode_slide(REAL_SLIDE, cache_dir=cache).ood

    def summary(rows):
        s = np.array([r["score"] for r in rows])
        return {"n": len(rows), "flagged": int(sum(r["flagged"] for r in rows)),
                "flagged_rate": round(float(np.mean([r["flagged"] for r in rows])), 4),
                "score_min": round(float(s.min()), 3), "score_median": round(float(np.median(s)), 3),
                "score_max": round(float(s.max()), 3)}

    return {"threshold": stats.threshold, "threshold_rule": stats.threshold_rule,
            "fresh_seed": {"seed": seed, **summary(fresh_scores)}, "real_slide": real[0],
            "restained_ihc_dab": summary(stained), "restained_slides": stained,
            "real_slide_message": stats.message}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slidechat.training.demo_feature_stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("--work", default="runs/demo-feature-stats", help="slides and features go here")
    parser.add_argument("--checkpoint", default=str(DEMO_DIR), help="checkpoint folder (default: the demo)")
    parser.add_argument("--n", type=int, default=None, help="slides (write: 96 training slides; check: 40 fresh)")
    parser.add_argument("--seed", type=int, default=9999, help="check: the fresh SynthSlide seed")
    parser.add_argument("--restained", type=int, default=8, help="check: re-stained (IHC/DAB) SynthSlides")
    args = parser.parse_args(argv)
    work, ckpt = Path(args.work), Path(args.checkpoint)
    if args.command == "write":
        result = write_demo_stats(args.n or 96, work, ckpt)
    else:
        result = check_demo_stats(work, ckpt, args.n or 40, args.seed, args.restained)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
