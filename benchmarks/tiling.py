"""Tiling benchmark: how fast patches come off a slide, against a naive loop and the JPEG-decode limit.

For each slide (a large SynthSlide by default, plus any slide paths given) and the same set of tissue
patches it measures patches/s of

  (a) our extractor's read path: PatchBlockDataset + DataLoader with ``--workers`` processes
      (each needed JPEG tile decoded once and copied straight into its patches in shared memory;
      one resize per block when the level differs) -- and the same with ``--workers`` threads;
  (b) a naive loop calling ``tiffslide.TiffSlide.read_region`` once per patch (one process);
  (c) the limit: decoding only the JPEG tiles those patches need, with ``--workers`` threads
      (tile bytes read beforehand; the imagecodecs decoder releases the GIL),

and prints tables with the ratios a/b and a/c (same run, same machine), writes JSON and a bar plot.
Two views: wall-clock patches/s, and patches per ``workers`` CPU-seconds (CPU time of all processes and
threads involved) which stays meaningful when other jobs share the cores. Best of ``--rounds``
interleaved rounds.

    python benchmarks/tiling.py                      # large synthetic slide (generated once, cached)
    python benchmarks/tiling.py tests/data/cmu-1-small-region.svs --no-synth
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def select_blocks(dataset, max_patches: int) -> list[int]:
    """The first blocks (in reading order) holding at least ``max_patches`` patches (all when 0)."""
    chosen, n = [], 0
    for i, idx in enumerate(dataset.blocks):
        chosen.append(i)
        n += len(idx)
        if max_patches and n >= max_patches:
            break
    return chosen


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_ours(dataset, blocks: list[int], workers: int, mode: str = "processes") -> dict:
    """Our DataLoader path. Wall rate is timed from the first block received (worker start-up excluded);
    the CPU rate counts all CPU seconds of the main process and the workers, spread over ``workers`` cores."""
    import gc

    from torch.utils.data import Subset

    from slidechat.slide.tiling import patch_loader

    cpu0, child0 = time.process_time(), _children_cpu()
    loader = patch_loader(Subset(dataset, blocks), num_workers=workers, mode=mode)
    n, t0, first = 0, None, 0
    it = iter(loader)
    for idx, patches in it:
        if t0 is None:
            t0, first = time.perf_counter(), len(idx)
            continue
        n += len(idx)
        assert patches.shape[1] == dataset.grid.patch_size
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    del it, loader
    gc.collect()
    cpu = (time.process_time() - cpu0) + (_children_cpu() - child0)
    total = n + first
    return {"wall": n / elapsed if elapsed > 0 else float("nan"), "cpu": total / (cpu / max(1, workers)),
            "n": total}


def bench_naive(path: Path, grid, indices: np.ndarray) -> dict:
    """One tiffslide.read_region per patch (+ resize when the level differs), one process."""
    import tiffslide
    from PIL import Image

    size = grid.patch_size
    with tiffslide.TiffSlide(path) as slide:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in indices:
            x, y = grid.coords[i]
            img = slide.read_region((int(x), int(y)), grid.level, (grid.patch_size_level, grid.patch_size_level))
            img = img.convert("RGB")
            if grid.needs_resize:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            np.asarray(img)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": len(indices) / elapsed, "cpu": len(indices) / cpu, "n": len(indices)}


def needed_tiles(grid, dataset, blocks: list[int], tile_w: int, tile_h: int) -> set[tuple[int, int]]:
    """(tile_x, tile_y) at the read level that the blocks' patches touch (what our path decodes)."""
    tiles: set[tuple[int, int]] = set()
    ds = grid.level_downsample
    for b in blocks:
        xy = grid.coords[dataset.blocks[b]] / ds
        size = grid.patch_size_level0 / ds
        x0, y0 = (xy[:, 0] // tile_w).astype(int), (xy[:, 1] // tile_h).astype(int)
        x1, y1 = (np.ceil((xy[:, 0] + size) / tile_w) - 1).astype(int), (np.ceil((xy[:, 1] + size) / tile_h) - 1).astype(int)
        for a, bb, c, d in zip(x0, x1, y0, y1):
            for ty in range(c, d + 1):
                for tx in range(a, bb + 1):
                    tiles.add((tx, ty))
    return tiles


def bench_decode_limit(path: Path, grid, dataset, blocks: list[int], n_patches: int, workers: int) -> dict:
    """patches/s if producing the patches cost only decoding their JPEG tiles (``workers`` threads)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[grid.level].keyframe
        if not page.is_tiled:
            return {"wall": float("nan"), "cpu": float("nan"), "tiles": 0, "note": "level is not tiled"}
        tw, th = page.tilewidth, page.tilelength
        n_x = -(-page.imagewidth // tw)
        tiles = sorted(needed_tiles(grid, dataset, blocks, tw, th))
        offsets, counts = page.dataoffsets, page.databytecounts
        fh = tf.filehandle
        raw = []
        for tx, ty in tiles:
            j = ty * n_x + tx
            fh.seek(offsets[j])
            raw.append((fh.read(counts[j]), j))
        jpegtables = page.jpegtables
        decode = page.decode

        def work(item):
            data, j = item
            return decode(data, j, jpegtables=jpegtables)[0].shape

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(work, raw[: min(8, len(raw))]))  # warm up
            t0, c0 = time.perf_counter(), time.process_time()
            list(pool.map(work, raw, chunksize=8))
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": n_patches / elapsed, "cpu": n_patches / (cpu / max(1, workers)), "tiles": len(tiles),
            "tiles_per_s": len(tiles) / elapsed, "tile_size": [tw, th]}


def bench_slide(path: Path, args) -> dict:
    from slidechat.slide.reader import SlideReader
    from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid
    from slidechat.slide.tissue import detect_tissue

    with SlideReader(path, mpp=args.mpp) as reader:
        info = reader.info()
        grid = make_tile_grid(reader, detect_tissue(reader), target_mpp=args.target_mpp, patch_size=args.patch_size)
    dataset = PatchBlockDataset(path, grid, mpp=args.mpp)
    blocks = select_blocks(dataset, args.max_patches)
    indices = np.concatenate([dataset.blocks[b] for b in blocks])
    # a small slide is read several times over so that (a) is timed in steady state
    repeat = max(1, -(-args.min_timed_patches // len(indices)))
    rounds = []
    for _ in range(args.rounds):  # interleaved rounds; best of each (the machine may be shared)
        a = bench_ours(dataset, blocks * repeat, args.workers)
        at = bench_ours(dataset, blocks * repeat, args.workers, mode="threads")
        naive_idx = indices[: args.naive_patches] if args.naive_patches else indices
        b = bench_naive(path, grid, naive_idx)
        c = bench_decode_limit(path, grid, dataset, blocks, len(indices), args.workers)
        rounds.append({"a": a, "a_threads": at, "b": b, "c": c})
    best = {k: {m: max(r[k][m] for r in rounds) for m in ("wall", "cpu")} for k in ("a", "a_threads", "b", "c")}
    return {
        "slide": str(path), "info": info, "patches_on_slide": len(grid), "patches_timed": int(rounds[0]["a"]["n"]),
        "naive_patches_timed": int(rounds[0]["b"]["n"]), "tiles_decoded": rounds[0]["c"]["tiles"],
        "repeat": repeat, "level": grid.level, "patch_size": grid.patch_size,
        "patch_size_level": grid.patch_size_level, "block_cells": grid.block_cells, "rounds": rounds,
        "a_ours": best["a"], "a_ours_threads": best["a_threads"], "b_naive": best["b"], "c_decode_limit": best["c"],
        "a_over_b": {m: best["a"][m] / best["b"][m] for m in ("wall", "cpu")},
        "a_over_c": {m: best["a"][m] / best["c"][m] for m in ("wall", "cpu")},
        "a_threads_over_b": {m: best["a_threads"][m] / best["b"][m] for m in ("wall", "cpu")},
        "a_threads_over_c": {m: best["a_threads"][m] / best["c"][m] for m in ("wall", "cpu")},
    }


def ensure_synth(size: str, out: Path) -> Path:
    from slidechat.synth import generate_dataset

    slides = sorted((out / "slides").glob("*.tiff")) if (out / "slides").is_dir() else []
    if not slides or not (out / "truth.jsonl").is_file():
        t0 = time.perf_counter()
        generate_dataset(out, n=1, seed=0, size=size)
        print(f"generated {size} synthetic slide in {time.perf_counter() - t0:.0f}s")
        slides = sorted((out / "slides").glob("*.tiff"))
    return slides[0]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.2
    xs = np.arange(len(results))
    for ax, metric, title in zip(axes, ("wall", "cpu"), ("wall clock", "per 2 CPU-seconds (load-independent)")):
        for k, (key, label) in enumerate([("a_ours", "(a) ours, processes"), ("a_ours_threads", "(a) ours, threads"),
                                          ("b_naive", "(b) naive read_region"),
                                          ("c_decode_limit", "(c) JPEG decode limit")]):
            ax.bar(xs + (k - 1.5) * width, [r[key][metric] for r in results], width, label=label)
        ax.set_xticks(xs, [Path(r["slide"]).name[:24] for r in results], fontsize=8)
        ax.set_ylabel("patches / s")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="*", help="extra slide paths to benchmark")
    p.add_argument("--synth-size", default="large", help="SynthSlide size to generate and benchmark (default large)")
    p.add_argument("--no-synth", action="store_true", help="only the given slides")
    p.add_argument("--synth-dir", default=str(ROOT / "outputs" / "bench"), help="where the synthetic slide is cached")
    p.add_argument("--workers", type=int, default=2, help="reader processes for (a), decode threads for (c)")
    p.add_argument("--max-patches", type=int, default=6000, help="patches timed per slide (0 = all)")
    p.add_argument("--naive-patches", type=int, default=600, help="patches timed for the naive loop (0 = same)")
    p.add_argument("--min-timed-patches", type=int, default=2000, help="re-read small slides up to this many")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (best of each is kept)")
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiling.json"), help="JSON results path (+ .png)")
    args = p.parse_args(argv)

    slides = [Path(s) for s in args.slides]
    if not args.no_synth:
        slides.insert(0, ensure_synth(args.synth_size, Path(args.synth_dir) / args.synth_size))
    results = [bench_slide(s, args) for s in slides]
    print(f"workers={args.workers}  target_mpp={args.target_mpp}  patch={args.patch_size}  cpus={os.cpu_count()}  "
          f"best of {args.rounds} rounds")
    for metric, title in (("wall", "wall-clock patches/s"), ("cpu", "patches per 2 CPU-seconds (load-independent)")):
        header = (f"{title:<46} {'patches':>8} {'(a) procs':>10} {'(a) thrds':>10} {'(b) naive':>10} "
                  f"{'(c) limit':>10} {'a/b':>6} {'a/c':>6} {'at/b':>6} {'at/c':>6}")
        print(header)
        print("-" * len(header))
        for r in results:
            print(f"{Path(r['slide']).name[:46]:<46} {r['patches_timed']:>8} {r['a_ours'][metric]:>10.0f} "
                  f"{r['a_ours_threads'][metric]:>10.0f} {r['b_naive'][metric]:>10.0f} "
                  f"{r['c_decode_limit'][metric]:>10.0f} {r['a_over_b'][metric]:>6.2f} {r['a_over_c'][metric]:>6.2f} "
                  f"{r['a_threads_over_b'][metric]:>6.2f} {r['a_threads_over_c'][metric]:>6.2f}")
        print()
    print("(a) procs: DataLoader worker processes (extract default); (a) thrds: --reader threads; "
          "at = (a) thrds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"workers": args.workers, "target_mpp": args.target_mpp, "patch_size": args.patch_size,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
