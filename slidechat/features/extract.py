"""Slide -> features: tissue detection, tiling, batched reading in worker processes, encoding, .h5 output."""

from __future__ import annotations

import csv
import glob
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from slidechat.encoders.base import PatchEncoder
from slidechat.errors import SlideChatError, SlideReadError
from slidechat.features.store import is_complete_features_h5, write_features_h5
from slidechat.slide.reader import SlideReader
from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid, patch_loader
from slidechat.slide.tissue import detect_tissue
from slidechat.utils.io import sha256_file

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".mrxs", ".qptiff", ".svslide")
Progress = Callable[[str, int, int], None]


@dataclass
class ExtractSummary:
    """Outcome of extract_many: written, skipped (already complete) and failed slides."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line reason)
    n_patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_second(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"slides: {len(self.written)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed; "
            f"patches: {self.n_patches}; {self.seconds:.1f}s ({self.patches_per_second:.1f} patches/s)"
        )


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id used for file names: the file name without its (last) extension."""
    return Path(path).name.rsplit(".", 1)[0] if "." in Path(path).name else Path(path).name


def expand_slide_inputs(inputs: Iterable[str], on_empty: Callable[[str], None] | None = None) -> list[Path]:
    """Files, folders (slide files inside), globs, or CSVs with a ``slide_path`` column -> slide paths.

    A named file is kept even when it does not exist (it is reported as a failed slide later).
    Folders/globs/CSVs that yield nothing are passed to ``on_empty``; an empty overall result raises.
    """
    out: list[Path] = []
    inputs = list(inputs)
    for item in inputs:
        p = Path(item)
        found: list[Path]
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS)
        elif p.suffix.lower() == ".csv" and p.is_file():
            found = _paths_from_csv(p)
        elif not p.exists() and glob.has_magic(item):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
        else:
            found = [p]
        if not found and on_empty is not None:
            on_empty(item)
        out += found
    seen: set[Path] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    if not unique:
        raise SlideChatError(
            f"no slides found in {', '.join(map(str, inputs)) or 'the input'}; give slide files, folders, globs, "
            f"or a CSV with a slide_path column (slide extensions: {', '.join(SLIDE_EXTENSIONS)})"
        )
    return unique


def _paths_from_csv(path: Path) -> list[Path]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "slide_path" not in reader.fieldnames:
            raise SlideChatError(f"{path}: CSV needs a 'slide_path' column (has {reader.fieldnames})")
        rows = [r["slide_path"].strip() for r in reader if r.get("slide_path", "").strip()]
    return [Path(r) if Path(r).is_absolute() else (path.parent / r) for r in rows]


def _attrs(slide_path: Path, reader: SlideReader, encoder: PatchEncoder, grid, sha: str, threshold) -> dict:
    return {
        "patch_size": grid.patch_size,
        "patch_size_level0": grid.patch_size_level0,
        "target_mpp": float(grid.target_mpp),
        "target_magnification": round(10.0 / grid.target_mpp, 2),
        "encoder": encoder.name,
        "embed_dim": encoder.embed_dim,
        "slide_id": slide_id_of(slide_path),
        "slide_sha256": sha,
        "slide_path": str(slide_path),
        "slide_mpp": float(grid.slide_mpp),
        "slide_width": reader.dimensions[0],
        "slide_height": reader.dimensions[1],
        "read_level": grid.level,
        "level0_magnification": reader.magnification or 0.0,
        "tissue_threshold": float(threshold),
        "patch_level": 0,
    }


def extract_slide(
    slide_path: str | os.PathLike,
    encoder: PatchEncoder,
    out_path: str | os.PathLike,
    *,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 2,
    mpp: float | None = None,
    tissue_threshold: float | None = None,
    progress: Progress | None = None,
    reader_mode: str = "processes",
) -> Path:
    """Tile ``slide_path`` over tissue at ``target_mpp``, encode every patch, write the .h5 atomically.

    Patches are read by ``num_workers`` DataLoader worker processes (``reader_mode="threads"``: a thread
    pool in this process instead, which avoids moving patches between processes)."""
    slide_path = Path(slide_path)
    progress = progress or (lambda stage, done, total: None)
    with SlideReader(slide_path, mpp=mpp) as reader:
        _ = reader.mpp  # MissingMppError before any work
        progress("tissue", 0, 1)
        tissue = detect_tissue(reader, threshold=tissue_threshold)
        progress("tissue", 1, 1)
        grid = make_tile_grid(reader, tissue, target_mpp=target_mpp, patch_size=patch_size)
        progress("tiling", 1, 1)
        n = len(grid)
        dataset = PatchBlockDataset(slide_path, grid, mpp=mpp)
        features = np.zeros((n, encoder.embed_dim), dtype=np.float32)
        done = 0
        pending_idx: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        n_pending = 0

        def flush() -> None:
            nonlocal done, n_pending
            if not pending:
                return
            idx = torch.cat(pending_idx)
            batch = torch.cat(pending)
            pending_idx.clear()
            pending.clear()
            n_pending = 0
            for s in range(0, len(idx), batch_size):
                emb = encoder(encoder.transform_batch(batch[s : s + batch_size]))
                features[idx[s : s + batch_size].numpy()] = emb.cpu().numpy()
            done += len(idx)
            progress("encoding", done, n)

        progress("encoding", 0, n)
        try:
            for idx, patches in patch_loader(dataset, num_workers=num_workers, mode=reader_mode):
                pending_idx.append(idx)
                pending.append(patches)
                n_pending += len(idx)
                if n_pending >= batch_size:
                    flush()
            flush()
        except Exception as exc:  # errors from DataLoader workers arrive wrapped with a traceback
            raise SlideReadError(f"{slide_path}: failed while reading patches ({_last_line(exc)})") from exc
        if done != n:
            raise SlideReadError(f"{slide_path}: read {done} of {n} patches")
        attrs = _attrs(slide_path, reader, encoder, grid, sha256_file(slide_path), tissue.threshold)
    return write_features_h5(out_path, features, grid.coords, attrs)


def extract_many(
    inputs: Iterable[str | os.PathLike],
    encoder: PatchEncoder,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    target_mpp: float = 0.5,
    patch_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 2,
    mpp: float | None = None,
    tissue_threshold: float | None = None,
    progress: Progress | None = None,
    on_slide: Callable[[Path, str, str], None] | None = None,
    reader_mode: str = "processes",
) -> ExtractSummary:
    """Extract every slide in ``inputs`` into ``out_dir/<slide_id>.h5``; bad slides are recorded, not fatal.

    ``on_slide(path, status, message)`` is called per slide with status "ok", "skipped" or "failed".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ExtractSummary()
    on_slide = on_slide or (lambda p, s, m: None)
    empty: list[str] = []
    slides = expand_slide_inputs([str(i) for i in inputs], on_empty=empty.append)
    for item in empty:
        summary.failed.append((item, f"{item}: no slides found there"))
        on_slide(Path(item), "failed", f"{item}: no slides found there")
    start = time.perf_counter()
    expected = {"encoder": encoder.name, "patch_size": patch_size, "target_mpp": float(target_mpp)}
    for slide in slides:
        out_path = out_dir / f"{slide_id_of(slide)}.h5"
        if resume and is_complete_features_h5(out_path, expected):
            summary.skipped.append(out_path)
            on_slide(slide, "skipped", f"{out_path} already complete")
            continue
        try:
            extract_slide(slide, encoder, out_path, target_mpp=target_mpp, patch_size=patch_size,
                          batch_size=batch_size, num_workers=num_workers, mpp=mpp,
                          tissue_threshold=tissue_threshold, progress=progress, reader_mode=reader_mode)
        except SlideChatError as exc:
            summary.failed.append((str(slide), str(exc)))
            on_slide(slide, "failed", str(exc))
            continue
        n = int(_count(out_path))
        summary.written.append(out_path)
        summary.n_patches += n
        on_slide(slide, "ok", f"{out_path} ({n} patches)")
    summary.seconds = time.perf_counter() - start
    return summary


def _last_line(exc: BaseException) -> str:
    """The informative last line of an exception that may carry a worker's traceback."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1]
    for prefix in ("slidechat.errors.SlideReadError: ", "SlideReadError: "):
        text = text.removeprefix(prefix)
    return text[:300]


def _count(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as fh:
        return int(fh["features"].shape[0])
