"""Tiling at a target resolution and fast batched patch reading.

Patches lie on a level-0 grid with stride ``patch_size_level0`` (so coords are exact level-0 pixels).
Reading groups patches into blocks of k x k grid cells (k chosen so a block spans whole file tiles).
When the best pyramid level already has the target resolution, every stored JPEG tile that the block's
patches touch is decoded once and copied straight into those patches (written into shared memory when
running in a DataLoader worker); otherwise the block region is read once, resized once and cut into
patches by a reshape. There is no per-patch read_region anywhere on this path.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from slidechat.errors import ConfigError, NoTissueError
from slidechat.slide.config import DEFAULT_MIN_TISSUE, DEFAULT_PATCH_SIZE, DEFAULT_TARGET_MPP
from slidechat.slide.reader import SlideReader
from slidechat.slide.tissue import TissueMask

log = logging.getLogger(__name__)

MAX_BLOCK_PX = 4096
# A grid holds coords, indices and a tissue fraction per cell (~40 B) and features per kept patch:
# 4M cells is ~30x the grid of a 40x TCGA slide at 0.5 µm/px and still fits a laptop.
MAX_GRID_CELLS = 4_000_000


@dataclass
class TileGrid:
    """Patches kept over tissue. ``coords`` are level-0 (x, y) of each patch's top-left corner."""

    coords: np.ndarray  # [N, 2] int64
    grid_index: np.ndarray  # [N, 2] int64 (row, col) on the level-0 grid
    patch_size: int  # output px
    patch_size_level0: int
    patch_size_level: int  # px read at ``level`` per patch
    level: int
    level_downsample: float
    target_mpp: float
    slide_mpp: float
    block_cells: int  # k: a block is k x k grid cells

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def needs_resize(self) -> bool:
        return self.patch_size_level != self.patch_size


def choose_block_cells(patch_level: int, tile: int) -> int:
    """Cells per block side: the smallest k with k*patch a multiple of the file tile (tile-aligned reads)."""
    if tile > 0:
        k = tile // math.gcd(patch_level, tile)
        if k * patch_level <= MAX_BLOCK_PX:
            while k * patch_level * 2 <= 1800:  # not too small either
                k *= 2
            return k
    return max(1, 1792 // max(1, patch_level))


def grid_shape(reader: SlideReader, target_mpp: float, patch_size: int) -> tuple[int, int, int]:
    """(level-0 px per patch, columns, rows) of the full patch grid; ConfigError when it would exceed
    MAX_GRID_CELLS (checked from the slide's size and mpp alone, before any pixel is read)."""
    patch0 = max(1, int(round(patch_size * target_mpp / reader.mpp)))
    w0, h0 = reader.dimensions
    cols, rows = w0 // patch0, h0 // patch0
    if cols * rows > MAX_GRID_CELLS:
        raise ConfigError(
            f"{reader.path}: --target-mpp {target_mpp:g} with --patch-size {patch_size} tiles this {w0} x {h0} px "
            f"slide ({reader.mpp:g} µm/px) into {cols * rows:,} patches, more than the {MAX_GRID_CELLS:,} "
            "one run may hold in memory; use a larger --target-mpp or --patch-size"
        )
    return patch0, cols, rows


def read_plan(reader: SlideReader, patch0: int, patch_size: int) -> tuple[int, float, int, int]:
    """(level read, its downsample, level px per patch, cells per block side) for patches of ``patch0``
    level-0 px resized to ``patch_size``."""
    level = reader.best_level_for_downsample(patch0 / patch_size)
    ds = reader.level_downsamples[level]
    patch_level = max(1, int(round(patch0 / ds)))
    # the block must also stay tile-aligned in level-0 terms: level px per block = k * patch_level
    return level, ds, patch_level, choose_block_cells(patch_level, reader.level_tile_size(level)[0])


def read_memory_bytes(reader: SlideReader, target_mpp: float, patch_size: int, num_workers: int,
                      prefetch: int = 4) -> int:
    """Peak bytes the block readers hold at once: ``num_workers`` block reads in flight (the level region
    decoded, resized, cut into patches) and the patches of the blocks waiting to be encoded."""
    from slidechat.slide.memory import read_region_bytes

    patch0 = max(1, int(round(patch_size * target_mpp / reader.mpp)))
    level, ds, patch_level, k = read_plan(reader, patch0, patch_size)
    patches = k * k * patch_size * patch_size * 3
    tiles = reader.tile_layout(level)
    if patch_level == patch_size and tiles is not None:  # stored tiles copied straight into the patches
        per_read = patches + tiles[0] * tiles[1] * 4
    else:
        lw, lh = reader.level_dimensions[level]
        side = int(round(k * patch0 / ds))
        resized = (k * patch_size) ** 2 * 3 if patch_level != patch_size else 0
        per_read = read_region_bytes(reader, level, 0, 0, min(side, lw), min(side, lh)) + resized + patches
    readers = max(1, int(num_workers))
    return readers * per_read + prefetch * readers * patches


def make_tile_grid(
    reader: SlideReader, tissue: TissueMask, target_mpp: float = DEFAULT_TARGET_MPP,
    patch_size: int = DEFAULT_PATCH_SIZE, min_tissue: float = DEFAULT_MIN_TISSUE, keep_best: bool = True,
) -> TileGrid:
    """Grid of ``patch_size`` px patches at ``target_mpp`` whose tissue fraction is >= ``min_tissue``.

    When tissue exists but no patch reaches ``min_tissue`` and ``keep_best`` is set, the best-covered
    patches are kept instead (every patch with at least half the best patch's fraction), with a log line.
    """
    mpp = reader.mpp
    patch0, cols, rows = grid_shape(reader, target_mpp, patch_size)
    level, ds, patch_level, k = read_plan(reader, patch0, patch_size)
    w0, h0 = reader.dimensions
    if cols == 0 or rows == 0:
        raise NoTissueError(f"{reader.path}: slide ({w0}x{h0} px) is smaller than one {patch0}-px patch")
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)
    xy = grid[:, ::-1] * patch0
    frac = tissue.fraction_in_boxes(xy, patch0)
    keep = frac >= min_tissue
    if not keep.any():
        best = float(frac.max()) if frac.size else 0.0
        if not keep_best or best <= 0.0:
            raise NoTissueError(
                f"{reader.path}: tissue found but no {patch_size}-px patch at {target_mpp:g} mpp is >= "
                f"{min_tissue:.0%} tissue; lower --min-tissue or use a smaller --patch-size"
            )
        keep = frac >= best / 2
        log.info("%s: no %d-px patch at %g mpp is >= %.0f%% tissue; keeping the %d best-covered patches "
                 "(>= %.1f%% tissue)", reader.path.name, patch_size, target_mpp, 100 * min_tissue,
                 int(keep.sum()), 100 * best / 2)
    return TileGrid(
        coords=xy[keep].astype(np.int64), grid_index=grid[keep], patch_size=patch_size, patch_size_level0=patch0,
        patch_size_level=patch_level, level=level, level_downsample=float(ds), target_mpp=target_mpp,
        slide_mpp=mpp, block_cells=k,
    )


def cut_patches(region: np.ndarray, cells_rc: np.ndarray, patch: int) -> np.ndarray:
    """Patches [n, patch, patch, 3] at block-local (row, col) cells of a region, by one reshape + gather."""
    kr, kc = region.shape[0] // patch, region.shape[1] // patch
    blocks = region[: kr * patch, : kc * patch].reshape(kr, patch, kc, patch, 3).swapaxes(1, 2)
    return np.ascontiguousarray(blocks[cells_rc[:, 0], cells_rc[:, 1]])


class PatchBlockDataset:
    """Map-style dataset of blocks: item i -> (patch indices int64 [n], patches uint8 [n, P, P, 3]
    as a numpy array or a torch tensor).

    Picklable (holds only the path and the grid); each DataLoader worker opens its own SlideReader.
    """

    def __init__(self, slide_path: str | os.PathLike, grid: TileGrid, mpp: float | None = None):
        self.slide_path = str(slide_path)
        self.mpp = mpp
        self.grid = grid
        k = grid.block_cells
        block_rc = grid.grid_index // k
        order = np.lexsort((block_rc[:, 1], block_rc[:, 0]))
        keys = block_rc[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)])
        self.blocks = [order[s:e] for s, e in zip(starts, np.r_[starts[1:], len(order)])]
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def reader(self) -> SlideReader:
        if self._reader is None:
            self._reader = SlideReader(self.slide_path, mpp=self.mpp)
        return self._reader

    def close(self) -> None:
        """Close this process's reader (workers' readers close with the workers)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def prepare(self) -> None:
        """Open the reader, its tile index and file descriptor now (before threads share them)."""
        reader = self.reader()
        if reader.tile_layout(self.grid.level) is not None:
            reader.decode_tile(self.grid.level, 0, 0)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.grid
        idx = self.blocks[i]
        rc = g.grid_index[idx]
        k = g.block_cells
        origin = (rc[0] // k) * k  # block's top-left cell
        local = rc - origin
        n_rows, n_cols = int(local[:, 0].max()) + 1, int(local[:, 1].max()) + 1
        p0, pl = g.patch_size_level0, g.patch_size_level
        loc = (int(origin[1] * p0), int(origin[0] * p0))
        # read exactly the level pixels covering the used cells (level px of a cell = p0 / ds)
        lw = int(round(n_cols * p0 / g.level_downsample))
        lh = int(round(n_rows * p0 / g.level_downsample))
        reader = self.reader()
        x0_level, y0_level = int(loc[0] / g.level_downsample), int(loc[1] / g.level_downsample)
        tiles = reader.tile_layout(g.level)
        if not g.needs_resize and tiles is not None and abs(p0 / g.level_downsample - pl) < 1e-6:
            out = _patch_buffer(len(idx), g.patch_size)
            scatter_tiles_to_patches(reader, g.level, tiles, (x0_level, y0_level), local, pl, out.numpy())
            return idx.astype(np.int64), out
        region = reader.read_region(loc, g.level, (lw, lh))
        out_w, out_h = n_cols * g.patch_size, n_rows * g.patch_size
        if region.shape[1] != out_w or region.shape[0] != out_h:
            region = np.asarray(Image.fromarray(region).resize((out_w, out_h), Image.Resampling.BILINEAR))
        return idx.astype(np.int64), cut_patches(region, local, g.patch_size)


def _patch_buffer(n: int, size: int):
    """Output array for a block's patches; in a DataLoader worker it lives in shared memory so handing it
    to the main process costs no copy."""
    import torch
    from torch.utils.data import get_worker_info

    shape = (n, size, size, 3)
    if get_worker_info() is not None:
        try:  # allocate straight in shared memory (share_memory_() would allocate, then copy)
            storage = torch.UntypedStorage._new_shared(n * size * size * 3)
            return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        except (AttributeError, RuntimeError):
            return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(shape, dtype=torch.uint8)


def scatter_tiles_to_patches(
    reader: SlideReader, level: int, tile_wh: tuple[int, int], origin: tuple[int, int], cells_rc: np.ndarray,
    patch: int, out: np.ndarray,
) -> None:
    """Decode each stored tile the patches need once and copy its pixels straight into the patches.

    ``origin`` is the level-px (x, y) of cell (0, 0); patch i covers cell ``cells_rc[i]``. One copy per
    pixel (tile -> patch), no intermediate region. The loop runs over tiles (and the <= 4 patches each
    tile overlaps when patch <= tile), not over patch reads.
    """
    tw, th = tile_wh
    x0, y0 = origin
    n_rows, n_cols = int(cells_rc[:, 0].max()) + 1, int(cells_rc[:, 1].max()) + 1
    cell_to_out = np.full((n_rows, n_cols), -1, dtype=np.int64)
    cell_to_out[cells_rc[:, 0], cells_rc[:, 1]] = np.arange(len(cells_rc))
    # tiles touched by kept patches (vectorised), in file order
    px0 = x0 + cells_rc[:, 1] * patch
    py0 = y0 + cells_rc[:, 0] * patch
    span_x = np.stack([px0 // tw, (px0 + patch - 1) // tw], 1)
    span_y = np.stack([py0 // th, (py0 + patch - 1) // th], 1)
    wanted = set()
    for (ax, bx), (ay, by) in zip(span_x.tolist(), span_y.tolist()):
        for ty in range(ay, by + 1):
            for tx in range(ax, bx + 1):
                wanted.add((ty, tx))
    for ty, tx in sorted(wanted):
        tile = reader.decode_tile(level, tx, ty)
        tx_px, ty_px = tx * tw, ty * th
        c_lo = max(0, (tx_px - x0 - patch) // patch + 1)
        c_hi = min(n_cols - 1, -((tx_px + tw - x0) // -patch) - 1)
        r_lo = max(0, (ty_px - y0 - patch) // patch + 1)
        r_hi = min(n_rows - 1, -((ty_px + th - y0) // -patch) - 1)
        for r in range(r_lo, r_hi + 1):
            for c in range(c_lo, c_hi + 1):
                o = cell_to_out[r, c]
                if o < 0:
                    continue
                ax0, ay0 = x0 + c * patch, y0 + r * patch  # patch origin (level px)
                sx0, sy0 = max(ax0, tx_px), max(ay0, ty_px)
                sx1, sy1 = min(ax0 + patch, tx_px + tw), min(ay0 + patch, ty_px + th)
                out[o, sy0 - ay0 : sy1 - ay0, sx0 - ax0 : sx1 - ax0] = tile[
                    sy0 - ty_px : sy1 - ty_px, sx0 - tx_px : sx1 - tx_px, :3
                ]


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


class ThreadedBlockLoader:
    """Blocks read by a pool of threads in this process (in order, at most ``window`` blocks ahead).

    JPEG decoding releases the GIL, so threads decode in parallel and the patches land directly in this
    process's memory (no inter-process transfer). Yields the same (indices, patches) tensors as the
    DataLoader path.
    """

    def __init__(self, dataset, num_threads: int = 2, window: int = 8):
        self.dataset = dataset
        self.num_threads = max(1, int(num_threads))
        self.window = max(self.num_threads, int(window))

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        base = self.dataset.dataset if hasattr(self.dataset, "indices") else self.dataset
        base.prepare()  # open the reader and its tile index once, before threads share it
        with ThreadPoolExecutor(self.num_threads) as pool:
            pending: deque = deque()
            it = iter(range(len(self.dataset)))
            for i in it:
                pending.append(pool.submit(self.dataset.__getitem__, i))
                if len(pending) >= self.window:
                    break
            while pending:
                item = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self.dataset.__getitem__, nxt))
                yield _to_tensors(item)


def patch_loader(dataset, num_workers: int = 2, prefetch: int = 4, mode: str = "threads"):
    """Iterate (indices, patches) per block: a thread pool in this process (``mode="threads"``, default: the
    decoders release the GIL, and no patch crosses a process boundary) or a torch DataLoader with ``num_workers``
    worker processes (``mode="processes"``)."""
    import torch
    from torch.utils.data import DataLoader

    if mode == "threads":
        return ThreadedBlockLoader(dataset, num_threads=max(1, num_workers), window=prefetch * max(1, num_workers))
    if mode != "processes":
        raise ValueError(f"unknown reader mode {mode!r}; use 'processes' or 'threads'")
    num_workers = max(0, int(num_workers))
    kwargs = dict(batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_to_tensors)
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch, worker_init_fn=_worker_init, persistent_workers=False)
    del torch
    return DataLoader(dataset, **kwargs)


def _to_tensors(item):
    import torch

    idx, patches = item
    return torch.from_numpy(idx), torch.as_tensor(patches)  # shares memory: no copy
