"""Tiling benchmark: every reader on the same slides, the same tissue mask and patch grid, the same workers.

For each slide (a SynthSlide, its region re-written as Aperio JPEG 2000 (33003), LZW and uncompressed
pyramidal TIFFs, and CMU-1) one tissue mask and one patch grid are made; the same patches (the first
blocks of the grid, in reading order) are then produced by

  ours_threads     PatchBlockDataset + patch_loader(mode="threads")   (the extraction default)
  ours_processes   PatchBlockDataset + patch_loader(mode="processes") (DataLoader worker processes)
  hs2p             hs2p's tifffile backend with supertile reads (``iter_tile_arrays_from_result``), the
                   patch list split over ``--workers`` threads, one reader each (hs2p runs one per process)
  openslide        one OpenSlide ``read_region`` per patch, ``--workers`` threads with a handle each
  trident          one tiffslide ``read_region`` per patch (TRIDENT's loop), ``--workers`` threads
  decode_limit     only decoding the stored tiles those patches need, ``--workers`` threads

in interleaved rounds; the table shows medians of wall-clock patches/s and patches per CPU-second (CPU time
of every thread and worker process involved, which stays meaningful when others share the cores), and
ratios named ``<x>_over_<y>`` (``ours`` = the default reader mode) with ``wall`` and ``cpu`` values.
hs2p, openslide-python and openslide-bin are benchmark peers, not dependencies (``pip install hs2p
openslide-python openslide-bin``); a peer that is not installed is skipped.

    python benchmarks/tiling.py                  # SynthSlide medium + formats + CMU-1, ~2-3 min on 2 cores
    python benchmarks/tiling.py --synth-size large --rounds 5
    python benchmarks/tiling.py --j2k-decoders       # the JPEG 2000 decoding options, tiles per CPU-second
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CMU = ROOT / "tests" / "data" / "cmu-1-small-region.svs"
METHODS = ("ours_threads", "ours_processes", "hs2p", "openslide", "trident", "decode_limit")


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


def _timed(fn, n: int) -> dict:
    """Run ``fn`` (producing ``n`` patches); wall and CPU seconds of this process and its children."""
    import gc

    gc.collect()
    c0, k0, t0 = time.process_time(), _children_cpu(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    cpu = (time.process_time() - c0) + (_children_cpu() - k0)
    return {"wall": n / wall, "cpu": n / max(cpu, 1e-9), "wall_s": wall, "cpu_s": cpu, "n": n}


def bench_ours(dataset, blocks: list[int], workers: int, mode: str) -> dict:
    from torch.utils.data import Subset

    from slidechat.slide.tiling import patch_loader

    n = sum(len(dataset.blocks[b]) for b in blocks)

    def run():
        for idx, patches in patch_loader(Subset(dataset, blocks), num_workers=workers, mode=mode):
            assert patches.shape[1] == dataset.grid.patch_size

    return _timed(run, n)


def _threaded_per_patch(open_handle, read, coords: np.ndarray, workers: int) -> None:
    """Per-patch reads spread over ``workers`` threads, each with its own slide handle."""
    local = threading.local()

    def work(xy):
        if not hasattr(local, "h"):
            local.h = open_handle()
        return read(local.h, int(xy[0]), int(xy[1])).shape

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(work, coords, chunksize=16))


def bench_trident(path: Path, grid, coords: np.ndarray, workers: int) -> dict:
    """TRIDENT's loop: one tiffslide read_region per patch (+ resize when the level differs)."""
    import tiffslide
    from PIL import Image

    size, pl = grid.patch_size, grid.patch_size_level

    def read(slide, x, y):
        img = slide.read_region((x, y), grid.level, (pl, pl)).convert("RGB")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR) if grid.needs_resize else img)

    return _timed(lambda: _threaded_per_patch(lambda: tiffslide.TiffSlide(path), read, coords, workers), len(coords))


def bench_openslide(path: Path, grid, coords: np.ndarray, workers: int) -> dict | None:
    try:
        import openslide
    except ImportError:
        return None
    from PIL import Image

    size, pl = grid.patch_size, grid.patch_size_level
    try:
        openslide.OpenSlide(str(path)).close()
    except Exception as exc:  # e.g. a generic TIFF layout OpenSlide does not read
        return {"wall": float("nan"), "cpu": float("nan"), "note": f"{type(exc).__name__}: {exc}"[:200]}

    def read(slide, x, y):
        img = slide.read_region((x, y), grid.level, (pl, pl)).convert("RGB")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR) if grid.needs_resize else img)

    return _timed(lambda: _threaded_per_patch(lambda: openslide.OpenSlide(str(path)), read, coords, workers),
                  len(coords))


def bench_hs2p(path: Path, grid, coords: np.ndarray, level_downsamples, workers: int) -> dict | None:
    try:
        from hs2p.wsi.streaming.stream import iter_tile_arrays_from_result
    except ImportError:
        return None
    import warnings

    shards = np.array_split(coords, max(1, workers))

    def result(part):
        return SimpleNamespace(
            image_path=str(path), backend="tifffile", base_spacing_um=grid.slide_mpp, read_level=grid.level,
            read_tile_size_px=grid.patch_size_level, tile_size_lv0=grid.patch_size_level0, overlap=0.0,
            step_px_lv0=grid.patch_size_level0, x=part[:, 0], y=part[:, 1], level_downsamples=level_downsamples)

    def shard(part):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hs2p warns that our mpp overrides the TIFF resolution tag
            return sum(1 for _ in iter_tile_arrays_from_result(result=result(part)))

    def run():
        with ThreadPoolExecutor(max(1, workers)) as pool:
            assert sum(pool.map(shard, shards)) == len(coords)

    return _timed(run, len(coords))


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


def bench_decode_limit(path: Path, grid, dataset, blocks: list[int], n_patches: int, workers: int,
                       repeat: int = 1) -> dict:
    """patches/s if producing the patches cost only decoding their stored tiles (``workers`` threads)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[grid.level].keyframe
        if not page.is_tiled:
            return {"wall": float("nan"), "cpu": float("nan"), "tiles": 0, "note": "level is not tiled"}
        tw, th = page.tilewidth, page.tilelength
        n_x = -(-page.imagewidth // tw)
        tiles = sorted(needed_tiles(grid, dataset, sorted(set(blocks)), tw, th)) * repeat  # as often as ours reads them
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
    return {"wall": n_patches / elapsed, "cpu": n_patches / max(cpu, 1e-9), "tiles": len(tiles),
            "tiles_per_s": len(tiles) / elapsed, "tile_size": [tw, th]}


J2K_COMPRESSIONS = (33003, 33004, 33005, 34712)


def bench_j2k_decoders(path: Path, rounds: int = 3, max_tiles: int = 120) -> dict | None:
    """Tiles per CPU-second of the JPEG 2000 decoding options on level 0's stored tiles (one thread each):
    tifffile's decode (what the reader uses), imagecodecs with 1 / 2 codec threads, OpenSlide reading the
    same tiles, and for a level finer than the target: full decode + 2x resize against Pillow's
    half-resolution decode (``reduce=1``; imagecodecs has no resolution-level option)."""
    import io

    import imagecodecs
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        if int(page.compression) not in J2K_COMPRESSIONS or not page.is_tiled:
            return None
        tw, th = page.tilewidth, page.tilelength
        n_x, n_y = page.imagewidth // tw, page.imagelength // th  # whole tiles only
        picks = [(tx, ty) for ty in range(n_y) for tx in range(n_x)][:max_tiles]
        fh = tf.filehandle
        raw = []
        for tx, ty in picks:
            j = ty * -(-page.imagewidth // tw) + tx
            fh.seek(page.dataoffsets[j])
            raw.append((fh.read(page.databytecounts[j]), j))

        def pil_reduced(data):
            im = Image.open(io.BytesIO(data))
            im.reduce = 1
            im.load()
            return np.asarray(im)

        def full_then_resize(data):
            tile = imagecodecs.jpeg2k_decode(data, numthreads=1)
            return np.asarray(Image.fromarray(tile).resize((tw // 2, th // 2), Image.Resampling.BILINEAR))

        options = {
            "tifffile": lambda: [page.decode(d, j) for d, j in raw],
            "imagecodecs_1_thread": lambda: [imagecodecs.jpeg2k_decode(d, numthreads=1) for d, _ in raw],
            "imagecodecs_2_threads": lambda: [imagecodecs.jpeg2k_decode(d, numthreads=2) for d, _ in raw],
            "half_res_full_then_resize": lambda: [full_then_resize(d) for d, _ in raw],
            "half_res_pillow_reduce": lambda: [pil_reduced(d) for d, _ in raw],
        }
        try:
            import openslide

            def read_openslide():
                with openslide.OpenSlide(str(path)) as slide:  # a new handle: its tile cache starts empty
                    for tx, ty in picks:
                        slide.read_region((tx * tw, ty * th), 0, (tw, th))

            options["openslide"] = read_openslide
        except ImportError:
            pass
        runs: dict[str, list[float]] = {k: [] for k in options}
        for _ in range(rounds):
            for name, fn in options.items():
                c0 = time.process_time()
                fn()
                runs[name].append(len(raw) / max(time.process_time() - c0, 1e-9))
        diff = float(np.abs(full_then_resize(raw[0][0]).astype(int) - pil_reduced(raw[0][0]).astype(int)).mean())
    med = {k: float(np.median(v)) for k, v in runs.items()}
    ratios = {f"{k}_over_tifffile": v / med["tifffile"] for k, v in med.items() if k != "tifffile"}
    ratios["half_res_pillow_reduce_over_half_res_full_then_resize"] = (
        med["half_res_pillow_reduce"] / med["half_res_full_then_resize"])
    return {"slide": str(path), "tiles": len(raw), "tile_size": [tw, th], "tiles_per_cpu_s": med, "ratios": ratios,
            "half_res_mean_abs_diff": diff}


def bench_slide(path: Path, args) -> dict:
    from slidechat.slide.reader import SlideReader
    from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid
    from slidechat.slide.tissue import detect_tissue

    with SlideReader(path) as reader:
        info = reader.info()
        info["compression"] = _compression(path)
        grid = make_tile_grid(reader, detect_tissue(reader), target_mpp=args.target_mpp, patch_size=args.patch_size)
        level_downsamples = reader.level_downsamples
    dataset = PatchBlockDataset(path, grid)
    blocks = select_blocks(dataset, args.max_patches)
    indices = np.concatenate([dataset.blocks[b] for b in blocks])
    repeat = max(1, -(-args.min_timed_patches // len(indices)))  # a small slide is read several times over
    blocks, indices = blocks * repeat, np.tile(indices, repeat)
    coords = grid.coords[indices]
    per_patch = coords[: args.per_patch_patches] if args.per_patch_patches else coords
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):  # interleaved: a burst of load from others hits every method alike
        runs["ours_threads"].append(bench_ours(dataset, blocks, args.workers, "threads"))
        runs["ours_processes"].append(bench_ours(dataset, blocks, args.workers, "processes"))
        for name, fn in [("hs2p", lambda: bench_hs2p(path, grid, coords, level_downsamples, args.workers)),
                         ("openslide", lambda: bench_openslide(path, grid, per_patch, args.workers)),
                         ("trident", lambda: bench_trident(path, grid, per_patch, args.workers)),
                         ("decode_limit", lambda: bench_decode_limit(path, grid, dataset, blocks, len(indices),
                                                                     args.workers, repeat))]:
            r = fn()
            if r is not None:
                runs[name].append(r)
    med = {m: {k: float(np.median([r[k] for r in rs])) for k in ("wall", "cpu")} for m, rs in runs.items() if rs}
    ours = "ours_threads"
    ratios = {f"ours_over_{m}": {k: med[ours][k] / med[m][k] for k in ("wall", "cpu")}
              for m in med if m != ours and m != "ours_processes"}
    ratios["ours_threads_over_ours_processes"] = {k: med[ours][k] / med["ours_processes"][k] for k in ("wall", "cpu")}
    return {"slide": str(path), "name": path.name, "info": info, "patches_on_slide": len(grid),
            "patches_timed": len(indices), "repeat": repeat, "per_patch_timed": len(per_patch), "level": grid.level,
            "patch_size_level": grid.patch_size_level, "median": med, "ratios": ratios, "rounds": runs}


def _compression(path: Path) -> str:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return str(tf.pages[0].compression.name if hasattr(tf.pages[0].compression, "name") else tf.pages[0].compression)


def ensure_synth(size: str, out: Path) -> Path:
    from slidechat.synth import generate_dataset

    slides = sorted((out / "slides").glob("*.tiff")) if (out / "slides").is_dir() else []
    if not slides:
        t0 = time.perf_counter()
        generate_dataset(out, n=1, seed=0, size=size)
        print(f"generated {size} synthetic slide in {time.perf_counter() - t0:.0f}s")
        slides = sorted((out / "slides").glob("*.tiff"))
    return slides[0]


def ensure_formats(synth: Path, out: Path, side: int) -> list[Path]:
    """The synthetic slide's central ``side`` x ``side * 3/4`` region as J2K (Aperio), LZW and raw TIFFs."""
    from slidechat.slide.reader import SlideReader
    from slidechat.synth.pyramid import write_pyramid

    specs = [("j2k", "aperio", "svs"), ("lzw", "generic", "tif"), ("none", "generic", "tif")]
    paths = [out / f"{synth.stem}-{c}.{ext}" for c, _, ext in specs]
    if all(p.is_file() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    with SlideReader(synth) as r:
        w0, h0 = r.dimensions
        w, h = min(side, w0), min(side * 3 // 4, h0)
        region = r.read_region(((w0 - w) // 2, (h0 - h) // 2), 0, (w, h))
        mpp = r.mpp
    for (c, layout, _), p in zip(specs, paths):
        if not p.is_file():
            write_pyramid(p, region, mpp, c, layout)
    return paths


def table(results: list[dict]) -> str:
    lines = []
    for metric, title in (("wall", "wall-clock patches/s"), ("cpu", "patches per CPU-second")):
        head = f"{title:<34}{'comp':>9}{'n':>6}" + "".join(f"{m:>15}" for m in METHODS)
        lines += [head, "-" * len(head)]
        for r in results:
            cells = "".join(f"{r['median'][m][metric]:>15.0f}" if m in r["median"] else f"{'-':>15}" for m in METHODS)
            lines.append(f"{r['name'][:34]:<34}{r['info']['compression'][:9]:>9}{r['patches_timed']:>6}{cells}")
        lines.append("")
    names = sorted({k for r in results for k in r["ratios"]})
    head = f"{'ratio (wall / cpu)':<34}" + "".join(f"{n.replace('ours_over_', 'ours/').replace('ours_threads_over_', 'threads/'):>20}" for n in names)
    lines += [head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{r['ratios'][n]['wall']:>12.2f} /{r['ratios'][n]['cpu']:>5.2f}" if n in r["ratios"]
                        else f"{'-':>20}" for n in names)
        lines.append(f"{r['name'][:34]:<34}{cells}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / len(METHODS)
    xs = np.arange(len(results))
    for ax, metric, title in zip(axes, ("wall", "cpu"), ("wall-clock patches/s", "patches per CPU-second")):
        for k, m in enumerate(METHODS):
            vals = [r["median"].get(m, {}).get(metric, np.nan) for r in results]
            ax.bar(xs + k * width, vals, width, label=m)
        ax.set_xticks(xs + 0.4 - width / 2, [r["name"][:22] for r in results], fontsize=7, rotation=12)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="*", help="more slide paths to benchmark")
    p.add_argument("--synth-size", default="medium", help="SynthSlide size to generate and benchmark (default medium)")
    p.add_argument("--synth-dir", default=str(ROOT / "outputs" / "bench"), help="where generated slides are cached")
    p.add_argument("--format-side", type=int, default=6144, help="width of the region re-written as J2K/LZW/raw")
    p.add_argument("--no-synth", action="store_true", help="only CMU-1 and the given slides")
    p.add_argument("--workers", type=int, default=2, help="readers (threads or processes) for every method")
    p.add_argument("--max-patches", type=int, default=1500, help="patches timed per slide (0 = all)")
    p.add_argument("--per-patch-patches", type=int, default=200, help="patches timed for the per-patch loops")
    p.add_argument("--min-timed-patches", type=int, default=240, help="re-read small slides up to this many")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiling.json"), help="JSON path (+ .png)")
    p.add_argument("--j2k-decoders", action="store_true",
                   help="only compare the JPEG 2000 decoding options on the J2K slides (tiles per CPU-second)")
    args = p.parse_args(argv)

    slides = [Path(s) for s in args.slides]
    if not args.no_synth:
        synth = ensure_synth(args.synth_size, Path(args.synth_dir) / args.synth_size)
        slides = [synth, *ensure_formats(synth, Path(args.synth_dir) / "formats", args.format_side), *slides]
    slides.append(CMU)
    if args.j2k_decoders:
        found = [r for r in (bench_j2k_decoders(s, args.rounds) for s in slides) if r is not None]
        for r in found:
            print(f"{Path(r['slide']).name}: {r['tiles']} tiles of {r['tile_size'][0]}x{r['tile_size'][1]}, "
                  f"tiles per CPU-second (median of {args.rounds})")
            for k, v in r["tiles_per_cpu_s"].items():
                print(f"  {k:<28}{v:8.1f}")
            for k, v in r["ratios"].items():
                print(f"  {k:<56}{v:6.2f}")
            print(f"  half-resolution pixels, Pillow reduce vs resize: mean |diff| {r['half_res_mean_abs_diff']:.2f}")
        out = Path(args.out).with_name(Path(args.out).stem + "_j2k_decoders.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": found, "cpu_count": os.cpu_count()}, indent=1))
        print(f"wrote {out}")
        return 0
    start = time.perf_counter()
    results = [bench_slide(s, args) for s in slides]
    print(f"workers={args.workers} target_mpp={args.target_mpp} patch={args.patch_size} cpus={os.cpu_count()} "
          f"median of {args.rounds} interleaved rounds; {time.perf_counter() - start:.0f}s")
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"workers": args.workers, "target_mpp": args.target_mpp, "patch_size": args.patch_size,
            "rounds": args.rounds, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - start, 1)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
