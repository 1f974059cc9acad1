"""Slide -> features: tissue detection, tiling, batched reading (threads or worker processes), encoding, .h5 output."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from slidechat.encoders.base import PatchEncoder
from slidechat.errors import SlideChatError, SlideReadError
from slidechat.features.store import SlideFeatures, is_complete_features_h5, write_features_h5
from slidechat.slide.config import ExtractionConfig, check_option
from slidechat.slide.reader import SlideReader
from slidechat.slide.memory import check_decode
from slidechat.slide.tiling import (PatchBlockDataset, TileGrid, grid_shape, make_tile_grid, patch_loader, read_memory_bytes,
                                    read_plan)
from slidechat.slide.tissue import TissueMask, detect_tissue
from slidechat.utils.io import remove_stale_temp_files, sha256_file, write_json_atomic
from slidechat.utils.locks import DEFAULT_STALE_AFTER_S, LOCK_SUFFIX, LockFolder, safe_file_name

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".vms", ".vmu", ".mrxs", ".qptiff", ".svslide")
Progress = Callable[[str, int, int], None]
LOCK_DIR = ".locks"  # per-slide claims of the workers sharing an output folder
FAILED_SUFFIX = ".failed"


class OutputWriteError(SlideChatError):
    """A feature file could not be written (disk full, read-only or missing folder): stops a run of many slides."""


@dataclass
class ExtractSummary:
    """Outcome of extract_many: written, skipped (already complete), busy (another worker's) and failed slides."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)  # inputs another live worker was extracting
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line reason)
    results: list["ExtractionResult"] = field(default_factory=list)  # one per written slide
    n_patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_second(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        busy = f", {len(self.busy)} being extracted by other workers" if self.busy else ""
        return (
            f"slides: {len(self.written)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed{busy}; "
            f"patches: {self.n_patches}; {self.seconds:.1f}s ({self.patches_per_second:.1f} patches/s)"
        )


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id used for file names: the file name without its (last) extension."""
    return Path(path).name.rsplit(".", 1)[0] if "." in Path(path).name else Path(path).name


_ANNOUNCED: set[Path] = set()  # dataset folders whose slides/ subfolder was already named to the user


def _slide_files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS)


def _slides_in_folder(folder: Path) -> list[Path]:
    """Slide files in ``folder``; a folder without any whose ``slides/`` subfolder has them (the layout
    ``slidechat synth`` writes) gives those."""
    found = _slide_files(folder)
    if not found and (folder / "slides").is_dir():
        found = _slide_files(folder / "slides")
        if found and folder not in _ANNOUNCED:
            _ANNOUNCED.add(folder)
            log.info("%s: using the %d slides in %s", folder, len(found), folder / "slides")
    return found


def _subfolders_with_slides(folder: Path, limit: int = 3) -> list[Path]:
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and _slide_files(d)][:limit]


def expand_slide_inputs(inputs: Iterable[str], on_empty: Callable[[str], None] | None = None) -> list[Path]:
    """Files, folders (slide files inside, or in their ``slides/``), globs, or CSVs with a ``slide_path``
    column -> slide paths.

    A named file is kept even when it does not exist (it is reported as a failed slide later).
    Folders/globs/CSVs that yield nothing are passed to ``on_empty``; an empty overall result raises, naming
    subfolders that do hold slides.
    """
    out: list[Path] = []
    inputs = list(inputs)
    hints: list[Path] = []
    for item in inputs:
        p = Path(item)
        found: list[Path]
        if p.is_dir():
            found = _slides_in_folder(p)
            if not found:
                hints += _subfolders_with_slides(p)
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
        where = f" (subfolders with slides: {', '.join(map(str, hints))}; pass those)" if hints else ""
        raise SlideChatError(
            f"no slides found in {', '.join(map(str, inputs)) or 'the input'}{where}; give slide files, folders, "
            f"globs, or a CSV with a slide_path column (slide extensions: {', '.join(SLIDE_EXTENSIONS)})"
        )
    return unique


def _paths_from_csv(path: Path) -> list[Path]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "slide_path" not in reader.fieldnames:
            raise SlideChatError(f"{path}: CSV needs a 'slide_path' column (has {reader.fieldnames})")
        rows = [r["slide_path"].strip() for r in reader if r.get("slide_path", "").strip()]
    return [Path(r) if Path(r).is_absolute() else (path.parent / r) for r in rows]


def _attrs(slide_path: Path, reader: SlideReader, encoder: PatchEncoder, grid: TileGrid, sha: str,
           tissue: TissueMask, config: ExtractionConfig) -> dict:
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
        "tissue_threshold": float(tissue.threshold),
        "tissue_method": config.tissue.method,
        "min_tissue": float(config.tissue.min_tissue),
        "patch_level": 0,
    }


@dataclass
class ExtractionResult:
    """What one extraction produced: the .h5 path, the features and coords written to it, the slide's
    sha256, the tissue mask and the patch grid (so no caller reads or hashes the slide again).

    ``os.fspath(result)`` is the .h5 path.
    """

    h5_path: Path
    slide_path: Path
    sha256: str
    features: np.ndarray
    coords: np.ndarray
    attrs: dict
    tissue: TissueMask
    grid: TileGrid
    config: ExtractionConfig
    seconds: float = 0.0

    def __fspath__(self) -> str:
        return str(self.h5_path)

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    def as_slide_features(self) -> SlideFeatures:
        """The written features as ``SlideFeatures`` (same arrays, no re-read of the .h5)."""
        return SlideFeatures(features=self.features, coords=self.coords, attrs=dict(self.attrs), path=self.h5_path)


def _check_config(config: ExtractionConfig | None) -> ExtractionConfig:
    if config is None:
        return ExtractionConfig()
    if not isinstance(config, ExtractionConfig):
        raise TypeError(f"config must be an ExtractionConfig, got {type(config).__name__}")
    return config


def extract_slide(
    slide_path: str | os.PathLike,
    encoder: PatchEncoder,
    out_path: str | os.PathLike,
    config: ExtractionConfig | None = None,
    *,
    sha256: str | None = None,
    tissue: TissueMask | None = None,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Tile ``slide_path`` over tissue as ``config`` says, encode every patch, write the .h5 atomically.

    ``sha256`` (the slide file's, when the caller already has it) and ``tissue`` (a mask already detected
    on this slide) are used as given instead of being computed again.
    """
    config = _check_config(config)
    slide_path = Path(slide_path)
    progress = progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    with SlideReader(slide_path, mpp=config.mpp) as reader:
        _, cols, rows = grid_shape(reader, config.target_mpp, config.patch_size)  # mpp and grid-size errors first
        check_extraction_memory(reader, encoder, config, cols * rows)
        progress("tissue", 0, 1)
        if tissue is None:
            tissue = detect_tissue(reader, config=config.tissue)
        progress("tissue", 1, 1)
        grid = make_tile_grid(reader, tissue, config.target_mpp, config.patch_size,
                              min_tissue=config.tissue.min_tissue, keep_best=config.tissue.keep_best)
        progress("tiling", 1, 1)
        features = _encode_grid(slide_path, grid, encoder, config, progress)
        sha = sha256 or sha256_file(slide_path)
        attrs = _attrs(slide_path, reader, encoder, grid, sha, tissue, config)
    try:
        h5 = write_features_h5(out_path, features, grid.coords, attrs)
    except OSError as exc:
        raise OutputWriteError(f"{out_path}: cannot write the features ({exc.strerror or exc}); fix that and run "
                               "again (slides already written are kept)") from exc
    return ExtractionResult(h5_path=h5, slide_path=slide_path, sha256=sha, features=features, coords=grid.coords,
                            attrs=attrs, tissue=tissue, grid=grid, config=config,
                            seconds=time.perf_counter() - start)


def check_extraction_memory(reader: SlideReader, encoder: PatchEncoder, config: ExtractionConfig,
                            n_cells: int) -> None:
    """ConfigError before any pixel is decoded when reading and encoding this slide's patches (at most
    ``n_cells``) as ``config`` says would hold more memory than the decode bound (``slidechat.slide.memory``)."""
    p, bs = config.patch_size, min(config.batch_size, max(1, n_cells))
    k = read_plan(reader, max(1, int(round(p * config.target_mpp / reader.mpp))), p)[3]
    waiting = 2 * (bs + k * k) * p * p * 3  # uint8 patches gathered for a batch, and their concatenation
    size = int(getattr(encoder, "input_size", p) or p)
    batch = bs * 3 * 4 * (p * p + size * size)  # the float batch, before and after resizing to the encoder
    need = read_memory_bytes(reader, config.target_mpp, p, config.num_workers) + waiting + batch
    advice = "use a smaller --patch-size, --batch-size or --num-workers"
    if reader.level_count == 1 and reader.tile_layout(0) is None:
        advice = "convert the slide to a tiled pyramid (e.g. `vips tiffsave in out.tiff --tile --pyramid`), or " + advice
    elif reader.level_count == 1:
        advice += ", or give the slide a pyramid (e.g. `vips tiffsave in out.tiff --tile --pyramid`)"
    check_decode(f"{reader.path}: reading --patch-size {p} patches at --target-mpp {config.target_mpp:g} "
                 f"(--batch-size {config.batch_size}, --num-workers {config.num_workers})", need, advice)


def _encode_grid(slide_path: Path, grid: TileGrid, encoder: PatchEncoder, config: ExtractionConfig,
                 progress: Progress) -> np.ndarray:
    """Features [N, D] of every grid patch: blocks read by the configured readers, encoded in batches."""
    n, batch_size = len(grid), config.batch_size
    dataset = PatchBlockDataset(slide_path, grid, mpp=config.mpp)
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
        for idx, patches in patch_loader(dataset, num_workers=config.num_workers, mode=config.reader_mode):
            pending_idx.append(idx)
            pending.append(patches)
            n_pending += len(idx)
            if n_pending >= batch_size:
                flush()
        flush()
    except SlideChatError:
        raise
    except Exception as exc:  # errors from DataLoader workers arrive wrapped with a traceback
        raise SlideReadError(f"{slide_path}: failed while reading patches ({_last_line(exc)})") from exc
    finally:
        dataset.close()
    if done != n:
        raise SlideReadError(f"{slide_path}: read {done} of {n} patches")
    return features


def extract_many(
    inputs: Iterable[str | os.PathLike],
    encoder: PatchEncoder,
    out_dir: str | os.PathLike,
    config: ExtractionConfig | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
    on_slide: Callable[[Path, str, str], None] | None = None,
    lock_stale_s: float = DEFAULT_STALE_AFTER_S,
) -> ExtractSummary:
    """Extract every slide in ``inputs`` into ``out_dir/<slide_id>.h5``; bad slides are recorded, not fatal.

    Several workers (processes, or machines on a shared filesystem) may run this on the same ``out_dir``: each
    claims a slide with a lock file in ``out_dir/.locks`` first, so every slide is extracted by one worker. A
    slide another live worker holds is skipped ("busy"); a lock whose holder died (on this host) or stopped
    refreshing it for ``lock_stale_s`` seconds is taken over. A slide that failed in a worker running at the
    same time is not tried again by the others.

    ``on_slide(path, status, message)`` is called per slide with status "ok", "skipped", "busy" or "failed".
    """
    config = _check_config(config)
    lock_stale_s = check_option("lock_stale_after", lock_stale_s)
    out_dir = Path(out_dir)
    summary = ExtractSummary()
    on_slide = on_slide or (lambda p, s, m: None)
    empty: list[str] = []
    slides = expand_slide_inputs([str(i) for i in inputs], on_empty=empty.append)  # out_dir is made by the first write
    for item in empty:
        summary.failed.append((item, f"{item}: no slides found there"))
        on_slide(Path(item), "failed", f"{item}: no slides found there")
    start = time.perf_counter()
    expected = {"encoder": encoder.name, "patch_size": config.patch_size, "target_mpp": float(config.target_mpp)}
    slides = _drop_same_ids(slides, out_dir, summary, on_slide)
    _check_out_dir(out_dir)
    try:
        claims = _SlideClaims(out_dir, [out_dir / f"{slide_id_of(s)}.h5" for s in slides], expected, resume,
                              lock_stale_s)
    except OSError as exc:
        raise SlideChatError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from exc
    busy: list[Path] = []
    try:
        for slide in slides:
            if _extract_claimed(slide, claims, encoder, config, summary, on_slide, progress) == "busy":
                busy.append(slide)
        for slide in busy:  # once more: a holder that died meanwhile left its slide to us
            if _extract_claimed(slide, claims, encoder, config, summary, on_slide, progress, last_try=True) == "busy":
                summary.busy.append(slide)
    finally:
        claims.finish()
    summary.seconds = time.perf_counter() - start
    return summary


def _drop_same_ids(slides: list[Path], out_dir: Path, summary: ExtractSummary,
                   on_slide: Callable[[Path, str, str], None]) -> list[Path]:
    """The slides without those whose id (file name without extension) an earlier input already has: both
    would write the same .h5, and the second would be taken for done."""
    first: dict[str, Path] = {}
    kept = []
    for slide in slides:
        sid = slide_id_of(slide)
        if sid in first:
            msg = (f"{slide}: same slide id {sid!r} as {first[sid]} (both would be {out_dir / (sid + '.h5')}); "
                   "rename one, or extract them into separate --out folders")
            summary.failed.append((str(slide), msg))
            on_slide(slide, "failed", msg)
            continue
        first[sid] = slide
        kept.append(slide)
    return kept


def _check_out_dir(out_dir: Path) -> None:
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise SlideChatError(f"--out {out_dir}: {folder} is a file, not a folder; choose another --out")
            return


def _extract_claimed(slide: Path, claims: "_SlideClaims", encoder: PatchEncoder, config: ExtractionConfig,
                     summary: ExtractSummary, on_slide: Callable[[Path, str, str], None],
                     progress: Progress | None, last_try: bool = False) -> str:
    """Claim ``slide``, extract it and record the outcome in ``summary``; the status."""
    out_path = claims.out_dir / f"{slide_id_of(slide)}.h5"
    if claims.done(out_path):
        summary.skipped.append(out_path)
        on_slide(slide, "skipped", f"{out_path} already complete")
        return "skipped"
    lock = claims.locks.try_acquire(out_path.name)
    if lock is None:
        holder = claims.locks.holder(out_path.name)
        who = f"{holder.host}:{holder.pid}" if holder is not None and holder.pid is not None else "another worker"
        if last_try:
            on_slide(slide, "busy", f"{slide}: being extracted by {who} (lock {claims.locks.path_for(out_path.name)})")
        return "busy"
    with lock:
        if claims.done(out_path):  # finished (and released) by another worker just before we took the lock
            summary.skipped.append(out_path)
            on_slide(slide, "skipped", f"{out_path} already complete")
            return "skipped"
        failed_elsewhere = claims.failure_of(out_path)
        if failed_elsewhere is not None:
            summary.failed.append((str(slide), failed_elsewhere))
            on_slide(slide, "failed", failed_elsewhere)
            return "failed"
        try:
            result = extract_slide(slide, encoder, out_path, config, progress=progress)
        except OutputWriteError:
            raise  # the output folder, not the slide: every further slide would fail the same way
        except SlideChatError as exc:
            claims.record_failure(out_path, str(exc))
            summary.failed.append((str(slide), str(exc)))
            on_slide(slide, "failed", str(exc))
            return "failed"
        claims.clear_failure(out_path)
    summary.written.append(out_path)
    summary.results.append(result)
    summary.n_patches += result.num_patches
    on_slide(slide, "ok", f"{out_path} ({result.num_patches} patches)")
    return "ok"


class _SlideClaims:
    """The lock folder of one ``extract_many`` worker and what it knows about the slides' outputs.

    The worker itself holds ``worker-<host>-<pid>.lock`` while it runs. Without ``resume`` an existing .h5 is
    extracted again, but only once: one that changed after this worker first looked at it was written by another
    worker meanwhile. A slide that fails leaves ``<slide_id>.h5.failed`` (the error) in the lock folder: workers
    running at the same time skip that slide, a later run tries it again; the last worker to finish removes the
    notes and the folder.
    """

    def __init__(self, out_dir: Path, outputs: list[Path], expected: dict, resume: bool,
                 stale_after_s: float) -> None:
        self.out_dir, self.expected, self.resume = out_dir, expected, resume
        self._out_existed = out_dir.exists()
        self.locks = LockFolder(out_dir / LOCK_DIR, stale_after_s=stale_after_s)
        self._seen = {p: self._stamp(p) for p in outputs}  # the outputs as this worker found them
        self._worker = self.locks.try_acquire(f"worker-{socket.gethostname()}-{os.getpid()}")
        # by the lock folder's own clock: on a shared filesystem its server stamps the mtimes
        self.started_ns = self._worker.path.stat().st_mtime_ns if self._worker is not None else time.time_ns()

    def _stamp(self, path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def done(self, out_path: Path) -> bool:
        """Whether ``out_path`` needs no extraction (by this worker)."""
        stamp = self._stamp(out_path)
        if not self.resume and (stamp is None or stamp == self._seen.get(out_path)):
            return False
        return is_complete_features_h5(out_path, self.expected)

    def _failure_path(self, out_path: Path) -> Path:
        return self.locks.folder / f"{safe_file_name(out_path.name)}{FAILED_SUFFIX}"

    def failure_of(self, out_path: Path) -> str | None:
        """The error of a worker running at the same time that failed on this slide, or None."""
        path = self._failure_path(out_path)
        try:
            if path.stat().st_mtime_ns < self.started_ns:
                return None  # from an earlier run: try again
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("expected") != self.expected:
            return None
        return f"{data.get('error', 'failed')} (in worker {data.get('worker', '?')})"

    def record_failure(self, out_path: Path, error: str) -> None:
        with contextlib.suppress(OSError):
            write_json_atomic(self._failure_path(out_path), {
                "error": error, "expected": self.expected, "worker": f"{socket.gethostname()}:{os.getpid()}"})

    def clear_failure(self, out_path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._failure_path(out_path).unlink()

    def finish(self) -> None:
        """Release this worker; the last one out clears the lock folder (stale locks of killed workers and
        the failure notes with it), and the output folder when this run made it and wrote nothing there."""
        if self._worker is not None:
            self._worker.release()
        folder = self.locks.folder
        with contextlib.suppress(OSError):
            live = 0
            for path in folder.glob(f"*{LOCK_SUFFIX}"):
                key = path.name[: -len(LOCK_SUFFIX)]
                stale = self.locks.holder(key) is None and self.locks.try_acquire(key)
                if stale:
                    stale.release()
                else:
                    live += 1
            if not live:
                for note in folder.glob(f"*{FAILED_SUFFIX}"):
                    note.unlink()
                remove_stale_temp_files(folder)
        self.locks.remove_folder_if_empty()
        if self.out_dir.is_dir():
            remove_stale_temp_files(self.out_dir)  # left by workers killed mid-write
        if not self._out_existed:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()


def _last_line(exc: BaseException) -> str:
    """The informative last line of an exception that may carry a worker's traceback."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1]
    for prefix in ("slidechat.errors.SlideReadError: ", "SlideReadError: "):
        text = text.removeprefix(prefix)
    return text[:300]
