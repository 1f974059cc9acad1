"""Extraction benchmark: end-to-end patch features (read + encode + write) on the real extraction path,
against a sequential baseline, in the same run.

For each slide (a SynthSlide and CMU-1) one tissue mask and one patch grid are made; the first blocks of
the grid (in reading order) are then encoded by each encoder (the demo CNN, and a timm ViT-B/16 with
random weights) in two ways, in interleaved rounds:

  overlapped   slidechat.features.extract's own loop (``_encode_grid``): reader threads decode blocks
               while the main thread transforms and encodes the previous ones; then the .h5 write
  sequential   the same reader reads every patch first, then transform + encode in batches, then write

Where the time goes: ``read`` (seconds the reader threads spent decoding blocks; in the overlapped run it
overlaps the encoder), ``read_wait`` (overlapped only: main-thread time not spent in transform or
forward, i.e. waiting for blocks plus loop overhead), ``transform_batch``, ``forward`` (the encoder
module) and ``write`` (the .h5). Patches/s (wall) and patches per CPU-second (all threads) are medians
over ``--rounds``; ratios are named ``<x>_over_<y>``.

    python benchmarks/extraction.py --quick           # tiny SynthSlide + CMU-1, small patch counts (< 2 min)
    python benchmarks/extraction.py                   # small SynthSlide + CMU-1, 3 rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CMU_CANDIDATES = (ROOT.parent / "shared" / "slides" / "cmu-1-small-region.svs",
                  ROOT / "tests" / "data" / "cmu-1-small-region.svs")
METHODS = ("overlapped", "sequential")
STAGES = ("read", "read_wait", "transform_batch", "forward", "write")
ENCODERS = {"demo-cnn": "demo-cnn", "vit-b16": "timm:vit_base_patch16_224"}


class StageClock:
    """Adds up the seconds spent in the encoder's transform_batch and module forward, and in block reads
    (from any thread), while installed."""

    def __init__(self, encoder):
        import torch

        from slidechat.slide.tiling import PatchBlockDataset

        self.encoder, self.seconds = encoder, dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()
        self._dataset_cls = PatchBlockDataset
        self._orig_getitem = PatchBlockDataset.__getitem__
        self._orig_transform = encoder.transform_batch
        self._orig_model = encoder.model
        clock = self

        class TimedModule(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                t = time.perf_counter()
                out = self.inner(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                clock.add("forward", time.perf_counter() - t)
                return out

        self._timed_module = TimedModule(encoder.model)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def __enter__(self):
        orig_getitem, orig_transform = self._orig_getitem, self._orig_transform

        def getitem(dataset, i):
            t = time.perf_counter()
            item = orig_getitem(dataset, i)
            self.add("read", time.perf_counter() - t)
            return item

        def transform(patches):
            t = time.perf_counter()
            out = orig_transform(patches)
            self.add("transform_batch", time.perf_counter() - t)
            return out

        self._dataset_cls.__getitem__ = getitem
        self.encoder.transform_batch = transform
        self.encoder.model = self._timed_module
        return self

    def __exit__(self, *exc):
        self._dataset_cls.__getitem__ = self._orig_getitem
        del self.encoder.transform_batch  # back to the class's method
        self.encoder.model = self._orig_model


def _write(out_dir: Path, features: np.ndarray, grid) -> float:
    from slidechat.features.store import write_features_h5

    t = time.perf_counter()
    write_features_h5(out_dir / "bench.h5", features, grid.coords, {"encoder": "bench"})
    return time.perf_counter() - t


def run_overlapped(path: Path, grid, encoder, config, out_dir: Path) -> dict:
    from slidechat.features.extract import _encode_grid

    with StageClock(encoder) as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        features = _encode_grid(path, grid, encoder, config, lambda stage, done, total: None)
        encode_wall = time.perf_counter() - t0
        clock.seconds["write"] = _write(out_dir, features, grid)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = clock.seconds
    s["read_wait"] = max(0.0, encode_wall - s["transform_batch"] - s["forward"])
    return {"wall_s": wall, "cpu_s": cpu, "stages": dict(s), "features": features}


def run_sequential(path: Path, grid, encoder, config, out_dir: Path) -> dict:
    import torch

    from slidechat.slide.tiling import PatchBlockDataset, patch_loader

    with StageClock(encoder) as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        dataset = PatchBlockDataset(path, grid, mpp=config.mpp)
        try:
            items = list(patch_loader(dataset, num_workers=config.num_workers, mode=config.reader_mode))
        finally:
            dataset.close()
        idx = torch.cat([i for i, _ in items])
        patches = torch.cat([p for _, p in items])
        del items
        features = np.zeros((len(grid), encoder.embed_dim), dtype=np.float32)
        for s in range(0, len(idx), config.batch_size):
            emb = encoder(encoder.transform_batch(patches[s : s + config.batch_size]))
            features[idx[s : s + config.batch_size].numpy()] = emb.cpu().numpy()
        clock.seconds["write"] = _write(out_dir, features, grid)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "stages": dict(clock.seconds), "features": features}


def first_blocks_grid(path: Path, grid, max_patches: int):
    """The grid cut to its first ``max_patches`` patches in reading order (block by block)."""
    from slidechat.slide.tiling import PatchBlockDataset

    if not max_patches or max_patches >= len(grid):
        return grid
    blocks, n = [], 0
    for b in PatchBlockDataset(path, grid).blocks:
        blocks.append(b)
        n += len(b)
        if n >= max_patches:
            break
    keep = np.sort(np.concatenate(blocks)[:max_patches])
    return dataclasses.replace(grid, coords=grid.coords[keep], grid_index=grid.grid_index[keep])


def bench_slide(path: Path, encoders: dict, args) -> list[dict]:
    from slidechat.slide.config import ExtractionConfig
    from slidechat.slide.reader import SlideReader
    from slidechat.slide.tiling import make_tile_grid
    from slidechat.slide.tissue import detect_tissue

    config = ExtractionConfig(target_mpp=args.target_mpp, patch_size=args.patch_size, batch_size=args.batch_size,
                              num_workers=args.workers, reader_mode="threads")
    t0 = time.perf_counter()
    with SlideReader(path) as reader:
        tissue = detect_tissue(reader, config=config.tissue)
        grid = make_tile_grid(reader, tissue, config.target_mpp, config.patch_size,
                              min_tissue=config.tissue.min_tissue, keep_best=config.tissue.keep_best)
    setup_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        for label, encoder in encoders.items():
            sub = first_blocks_grid(path, grid, args.max_patches[label])
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for r in range(args.rounds):  # interleaved; the order alternates so neither always runs warm
                order = METHODS if r % 2 == 0 else METHODS[::-1]
                for m in order:
                    fn = run_overlapped if m == "overlapped" else run_sequential
                    runs[m].append(fn(path, sub, encoder, config, Path(tmp)))
            a, b = runs["overlapped"][0]["features"], runs["sequential"][0]["features"]
            same = bool(np.allclose(a, b, atol=1e-4))
            med = {}
            for m, rs in runs.items():
                wall = float(np.median([x["wall_s"] for x in rs]))
                cpu = float(np.median([x["cpu_s"] for x in rs]))
                stages = {s: float(np.median([x["stages"][s] for x in rs])) for s in STAGES}
                med[m] = {"patches_per_s": len(sub) / wall, "patches_per_cpu_s": len(sub) / max(cpu, 1e-9),
                          "wall_s": wall, "cpu_s": cpu, "stages_s": stages}
            o, s = med["overlapped"], med["sequential"]
            ratios = {"overlapped_over_sequential": {"wall": o["patches_per_s"] / s["patches_per_s"],
                                                     "cpu": o["patches_per_cpu_s"] / s["patches_per_cpu_s"]}}
            rows.append({"slide": str(path), "name": path.name, "encoder": label, "encoder_name": encoder.name,
                         "patches_on_slide": len(grid), "patches_timed": len(sub), "read_level": grid.level,
                         "setup_s": setup_s, "same_features": same, "median": med, "ratios": ratios,
                         "rounds": [{m: {k: v for k, v in x.items() if k != "features"} for m, x in
                                     zip(METHODS, pair)} for pair in zip(runs["overlapped"], runs["sequential"])]})
            print(f"  {path.name[:28]:<28} {label:<9} n={len(sub):<5} "
                  f"overlapped {o['patches_per_s']:7.1f}/s  sequential {s['patches_per_s']:7.1f}/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'slide':<28}{'encoder':>9}{'n':>6}{'method':>12}{'patch/s':>9}{'p/cpu-s':>9}"
            + "".join(f"{s:>16}" for s in STAGES))
    lines = [head, "-" * len(head)]
    for r in rows:
        for m in METHODS:
            x = r["median"][m]
            n = r["patches_timed"]
            cells = "".join(f"{1000 * x['stages_s'][s] / n:>13.1f} ms" if not (s == "read_wait" and m == "sequential")
                            else f"{'-':>16}" for s in STAGES)
            lines.append(f"{r['name'][:28]:<28}{r['encoder']:>9}{n:>6}{m:>12}{x['patches_per_s']:>9.1f}"
                         f"{x['patches_per_cpu_s']:>9.1f}{cells}")
    lines += ["(stage columns: ms per patch, summed over threads; read overlaps encoding in the overlapped run)", ""]
    head = f"{'ratio':<28}{'encoder':>9}{'overlapped_over_sequential (wall / cpu)':>44}{'same features':>15}"
    lines += [head, "-" * len(head)]
    for r in rows:
        q = r["ratios"]["overlapped_over_sequential"]
        lines.append(f"{r['name'][:28]:<28}{r['encoder']:>9}{q['wall']:>36.2f} / {q['cpu']:<5.2f}{str(r['same_features']):>15}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 + 0.55 * len(rows) * len(METHODS)))
    labels = [f"{r['name'][:18]} {r['encoder']} {m}" for r in rows for m in METHODS]
    ys = np.arange(len(labels))
    left = np.zeros(len(labels))
    for s in STAGES:
        vals = np.array([1000 * r["median"][m]["stages_s"][s] / r["patches_timed"]
                         for r in rows for m in METHODS])
        axes[0].barh(ys, vals, left=left, label=s)
        left += vals
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("ms per patch by stage (stacked; in 'overlapped' the read runs beside the encoder)", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right")
    speeds = [r["median"][m]["patches_per_s"] for r in rows for m in METHODS]
    colors = ["tab:green" if m == "overlapped" else "tab:gray" for _ in rows for m in METHODS]
    axes[1].barh(ys, speeds, color=colors)
    axes[1].set_yticks(ys, [""] * len(ys))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("patches/s (wall)", fontsize=8)
    for y, v in zip(ys, speeds):
        axes[1].text(v, y, f" {v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def ensure_synth(size: str, out: Path) -> Path:
    from slidechat.synth import generate_dataset

    slides = sorted((out / "slides").glob("*.tiff")) if (out / "slides").is_dir() else []
    if not slides:
        t0 = time.perf_counter()
        generate_dataset(out, n=1, seed=0, size=size)
        print(f"generated a {size} synthetic slide in {time.perf_counter() - t0:.0f}s", flush=True)
        slides = sorted((out / "slides").glob("*.tiff"))
    return slides[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="*", help="more slide paths to benchmark")
    p.add_argument("--quick", action="store_true", help="tiny SynthSlide, few patches, 2 rounds (< 2 min on 2 cores)")
    p.add_argument("--synth-size", default=None, help="SynthSlide size (default small; tiny with --quick)")
    p.add_argument("--synth-dir", default=str(ROOT / "outputs" / "bench"), help="where generated slides are cached")
    p.add_argument("--no-synth", action="store_true", help="only CMU-1 and the given slides")
    p.add_argument("--encoders", default="demo-cnn,vit-b16", help=f"comma list of {', '.join(ENCODERS)}")
    p.add_argument("--cnn-patches", type=int, default=None, help="patches timed with the demo CNN (0 = all)")
    p.add_argument("--vit-patches", type=int, default=None, help="patches timed with ViT-B/16 (0 = all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, medians reported (default 3; 2 quick)")
    p.add_argument("--workers", type=int, default=2, help="reader threads (the extraction default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: as the CLI)")
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (+ .png); default benchmarks/results/extraction[_quick].json")
    args = p.parse_args(argv)
    quick = args.quick
    args.synth_size = args.synth_size or ("tiny" if quick else "small")
    args.rounds = args.rounds or (2 if quick else 3)
    args.max_patches = {"demo-cnn": args.cnn_patches if args.cnn_patches is not None else (128 if quick else 1024),
                        "vit-b16": args.vit_patches if args.vit_patches is not None else (4 if quick else 64)}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"extraction{'_quick' if quick else ''}.json")

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `slidechat` sets it before torch loads
    import torch

    from slidechat.encoders import create_encoder

    # the same torch threads as `slidechat extract` (which leaves cores to the reader threads)
    torch.set_num_threads(args.torch_threads or max(1, min(torch.get_num_threads(), 2 if args.workers else 4)))
    labels = [e.strip() for e in args.encoders.split(",") if e.strip()]
    unknown = [e for e in labels if e not in ENCODERS]
    if unknown:
        p.error(f"unknown --encoders {unknown}; choose from {', '.join(ENCODERS)}")
    import logging

    logging.getLogger("slidechat.encoders.timm_encoder").setLevel(logging.ERROR)  # random init is intended here
    torch.manual_seed(0)
    encoders = {e: create_encoder(ENCODERS[e], device=args.device) for e in labels}

    slides = [Path(s) for s in args.slides]
    if not args.no_synth:
        slides.insert(0, ensure_synth(args.synth_size, Path(args.synth_dir) / args.synth_size))
    cmu = next((c for c in CMU_CANDIDATES if c.is_file()), None)
    if cmu is not None:
        slides.append(cmu)
    start = time.perf_counter()
    rows = [row for s in slides for row in bench_slide(s, encoders, args)]
    seconds = time.perf_counter() - start
    print(f"workers={args.workers} torch_threads={torch.get_num_threads()} batch={args.batch_size} "
          f"target_mpp={args.target_mpp} patch={args.patch_size} cpus={os.cpu_count()} device={args.device} "
          f"median of {args.rounds} interleaved rounds; {seconds:.0f}s")
    print(table(rows))
    from slidechat.utils.io import write_json_atomic

    meta = {"quick": quick, "workers": args.workers, "torch_threads": torch.get_num_threads(),
            "batch_size": args.batch_size, "target_mpp": args.target_mpp, "patch_size": args.patch_size,
            "rounds": args.rounds, "device": args.device, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"meta": meta, "results": rows}, indent=1)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
