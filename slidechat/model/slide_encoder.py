"""HierarchicalSlideEncoder: patch features [N, D] (+ coords) -> patch, region and slide tokens.

Levels (every one is exposed, each token keeps a level-0 coordinate):

1. **Patch tokens**: ``LayerNorm(Linear(D -> H))`` plus a 2-D sinusoidal encoding of the patch's position on
   the patch grid.
2. **Region tokens**: the patch grid is cut into ``k x k`` windows (``region_size``); each non-empty window
   gets one token (learned embedding + position of the window centre) that attends to the patches inside
   its window only (segment softmax via scatter ops, no per-window Python loop). Cost O(N).
3. **Slide tokens**: ``num_slide_tokens`` learned tokens and the region tokens exchange information through
   induced set attention (Lee et al., 2019, "Set Transformer"): slide tokens attend to [slide ∪ regions],
   then regions attend to the slide tokens. Cost O(S·R), so linear in N; no N x N (or R x R) attention anywhere.
4. **Layout tokens** (``layout_grid`` G > 0): the patch tokens are averaged onto a coarse G x G map laid over the
   tissue's bounding box (plus how much of each cell is tissue), a small CNN reads the map and emits
   ``num_layout_tokens`` more slide tokens. Attention pools are blind to shape; this map carries where things are
   relative to the specimen (which quadrant), how the tissue is split into pieces, and how compact a focus is.
   Positions are relative to the tissue extent, so it works the same for a biopsy and a resection. Cost O(N + G²).

**Patch grid.** With coords, grid index = ``(xy - min) / step`` where ``step`` is ``patch_size_level0`` when
known, else the smallest positive spacing between distinct coordinates. **Without coords** (SlideChat feature
CSVs) patches are laid out in reading order on a square-ish raster, ``width = ceil(sqrt(N))``, and token coords
are that raster in grid units (``has_coords=False``): the region/slide structure then follows the CSV's row order,
which for SlideChat/TRIDENT exports is a row-major scan of the tissue, so neighbours remain roughly neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.errors import DataError
from slidechat.model.config import SlideEncoderConfig

PATCH, REGION, SLIDE = 0, 1, 2


@dataclass
class SlideEncoderOutput:
    """All three levels of one slide. Coordinates are level-0 pixels (or grid units when ``has_coords`` is False)."""

    patch_tokens: torch.Tensor  # [N, H]
    region_tokens: torch.Tensor  # [R, H]
    slide_tokens: torch.Tensor  # [S, H]
    patch_coords: torch.Tensor  # [N, 2] float
    region_coords: torch.Tensor  # [R, 2] float (mean of member patches)
    slide_coords: torch.Tensor  # [S, 2] float (mean of all patches)
    patch_grid: torch.Tensor  # [N, 2] long (x, y) on the patch grid
    region_index: torch.Tensor  # [N] long: region of each patch
    region_sizes: torch.Tensor  # [R] long: patches per region
    has_coords: bool

    @property
    def num_patches(self) -> int:
        return int(self.patch_tokens.shape[0])

    @property
    def num_regions(self) -> int:
        return int(self.region_tokens.shape[0])

    def tokens(self) -> torch.Tensor:
        """All tokens concatenated: [N + R + S, H] (patches, then regions, then slide tokens)."""
        return torch.cat([self.patch_tokens, self.region_tokens, self.slide_tokens], dim=0)

    def levels(self) -> torch.Tensor:
        """Level id of each token of ``tokens()`` (0 patch, 1 region, 2 slide)."""
        n, r, s = self.num_patches, self.num_regions, int(self.slide_tokens.shape[0])
        dev = self.patch_tokens.device
        return torch.cat([torch.full((n,), PATCH, device=dev), torch.full((r,), REGION, device=dev),
                          torch.full((s,), SLIDE, device=dev)])

    def token_coords(self) -> torch.Tensor:
        return torch.cat([self.patch_coords, self.region_coords, self.slide_coords], dim=0)


def pad_and_stack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [L_i, H] tensors to [B, L_max, H]; return it with a bool mask [B, L_max] (True = real)."""
    lmax = max(int(t.shape[0]) for t in tensors)
    first = tensors[0]
    out = first.new_zeros((len(tensors), lmax, *first.shape[1:]))
    mask = torch.zeros((len(tensors), lmax), dtype=torch.bool, device=first.device)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def collate_levels(outputs: list[SlideEncoderOutput]) -> dict[str, torch.Tensor]:
    """Pad a batch of encoder outputs level by level: ``{patch, patch_mask, region, region_mask, slide, slide_mask,
    memory, memory_mask}`` where ``memory`` is the concatenation of all levels the projector attends to."""
    batch: dict[str, torch.Tensor] = {}
    for level in ("patch", "region", "slide"):
        batch[level], batch[f"{level}_mask"] = pad_and_stack([getattr(o, f"{level}_tokens") for o in outputs])
    batch["memory"], batch["memory_mask"] = pad_and_stack([o.tokens() for o in outputs])
    return batch


def patch_grid_from_coords(coords: torch.Tensor | None, n: int, patch_size_level0: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Integer grid positions [N, 2] (x, y) and float coords [N, 2] for the patches. See module docstring."""
    if coords is None:
        width = max(1, math.ceil(math.sqrt(n)))
        idx = torch.arange(n)
        grid = torch.stack([idx % width, idx // width], dim=1)
        return grid, grid.float(), False
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != n:
        raise DataError(f"coords must have shape [N, 2] matching {n} features, got {tuple(coords.shape)}")
    c = coords.long()
    origin = c.min(dim=0).values
    rel = c - origin
    if patch_size_level0 and patch_size_level0 > 0:
        step = float(patch_size_level0)
    else:
        steps = []
        for axis in range(2):
            u = torch.unique(rel[:, axis])
            d = torch.diff(u)
            d = d[d > 0]
            if d.numel():
                steps.append(int(d.min()))
        step = float(min(steps)) if steps else 1.0
    grid = torch.round(rel.double() / step).long()
    return grid, coords.float(), True


def sinusoidal_2d(grid: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """2-D sinusoidal position encoding [N, dim] of (x, y) grid positions (x in the first half, y in the second)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, device=grid.device, dtype=torch.float32) / quarter)
    parts = []
    for axis in range(2):
        angles = grid[:, axis : axis + 1].float() * freqs[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1)


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` [N, h] within groups given by ``index`` [N] (values < num_segments)."""
    h = scores.shape[1]
    idx = index[:, None].expand(-1, h)
    seg_max = scores.new_full((num_segments, h), float("-inf")).scatter_reduce(0, idx, scores, "amax", include_self=True)
    ex = torch.exp(scores - seg_max.gather(0, idx).detach())
    denom = scores.new_zeros((num_segments, h)).index_add(0, index, ex)
    return ex / denom.gather(0, idx).clamp_min(1e-30)


class MLP(nn.Module):
    def __init__(self, hidden: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden * mult)
        self.fc2 = nn.Linear(hidden * mult, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class _PreLNAttentionLayer(nn.Module):
    """Parameters shared by the attention layers below: pre-LN q/kv/mlp norms, q/k/v/o projections, an MLP."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.mlp = MLP(hidden, dropout=dropout)


class WindowAttentionPool(_PreLNAttentionLayer):
    """One pre-LN layer: each region token attends to the patch tokens of its own window (segment softmax)."""

    def forward(self, regions: torch.Tensor, patches: torch.Tensor, region_index: torch.Tensor) -> torch.Tensor:
        r, n = regions.shape[0], patches.shape[0]
        q = self.q(self.norm_q(regions)).view(r, self.heads, self.head_dim)
        kv_in = self.norm_kv(patches)
        k = self.k(kv_in).view(n, self.heads, self.head_dim)
        v = self.v(kv_in).view(n, self.heads, self.head_dim)
        scores = (k * q[region_index]).sum(-1) / math.sqrt(self.head_dim)  # [N, h]
        w = segment_softmax(scores, region_index, r)
        pooled = regions.new_zeros((r, self.heads, self.head_dim)).index_add(0, region_index, w[..., None] * v)
        regions = regions + self.o(pooled.reshape(r, -1))
        return regions + self.mlp(self.norm_mlp(regions))


class CrossAttentionBlock(_PreLNAttentionLayer):
    """Pre-LN attention of ``x`` to ``context`` (+ MLP). Uses F.scaled_dot_product_attention."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        lq, lk = x.shape[0], context.shape[0]
        q = self.q(self.norm_q(x)).view(lq, self.heads, self.head_dim).transpose(0, 1)
        c = self.norm_kv(context)
        k = self.k(c).view(lk, self.heads, self.head_dim).transpose(0, 1)
        v = self.v(c).view(lk, self.heads, self.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(lq, -1)
        x = x + self.o(out)
        return x + self.mlp(self.norm_mlp(x))


class LayoutMap(nn.Module):
    """Coarse map of the specimen: patch tokens averaged onto G x G cells over the tissue bounding box -> tokens."""

    def __init__(self, hidden: int, grid: int, channels: int, num_tokens: int) -> None:
        super().__init__()
        self.grid, self.num_tokens, self.hidden = grid, num_tokens, hidden
        self.reduce = nn.Linear(hidden, channels)
        width = 32
        self.cnn = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(4))
        self.out = nn.Linear(2 * width * 16, num_tokens * hidden)

    def cell_map(self, grid_xy: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Cell of each patch and each cell's capacity (grid positions it covers) on a map of at most G cells per
        side; a side shorter than G patches gets one cell per patch, so no empty in-between cells appear."""
        lo = grid_xy.min(dim=0).values
        ext = (grid_xy.max(dim=0).values - lo + 1).tolist()
        sides = [max(1, min(n_cells, int(e))) for e in ext]
        cells, capacity = [], []
        for axis in range(2):
            scale = sides[axis] / ext[axis]
            cells.append(((grid_xy[:, axis] - lo[axis]).float() * scale).long().clamp_max(sides[axis] - 1))
            all_pos = (torch.arange(ext[axis], device=grid_xy.device).float() * scale).long().clamp_max(sides[axis] - 1)
            capacity.append(torch.bincount(all_pos, minlength=sides[axis]).float())
        index = cells[1] * sides[0] + cells[0]
        cap = (capacity[1][:, None] * capacity[0][None, :]).flatten()
        return index, cap, sides

    def forward(self, x: torch.Tensor, grid_xy: torch.Tensor) -> torch.Tensor:
        g = self.grid
        index, cap, (sx, sy) = self.cell_map(grid_xy, g)
        feats = self.reduce(x)
        sums = feats.new_zeros((sx * sy, feats.shape[1])).index_add(0, index, feats)
        counts = torch.bincount(index, minlength=sx * sy).to(feats.dtype)
        mean = sums / counts.clamp_min(1.0)[:, None]
        occupancy = (counts / cap.to(feats.dtype)).clamp_max(1.0)
        m = torch.cat([mean, occupancy[:, None]], dim=1).T.reshape(1, -1, sy, sx)
        if (sx, sy) != (g, g):
            m = F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False)
        return self.out(self.cnn(m).flatten(1)).view(self.num_tokens, self.hidden)


class HierarchicalSlideEncoder(nn.Module):
    """Patch features -> patch / region / slide tokens (see module docstring). One slide per call."""

    def __init__(self, config: SlideEncoderConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.patch_proj = nn.Linear(config.feature_dim, h)
        self.patch_norm = nn.LayerNorm(h)
        self.region_query = nn.Parameter(torch.randn(h) * 0.02)
        self.region_layers = nn.ModuleList(
            WindowAttentionPool(h, config.num_heads, config.dropout) for _ in range(config.region_layers))
        self.slide_queries = nn.Parameter(torch.randn(config.num_slide_tokens, h) * 0.02)
        self.slide_from_regions = nn.ModuleList(
            CrossAttentionBlock(h, config.num_heads, config.dropout) for _ in range(config.slide_layers))
        self.regions_from_slide = nn.ModuleList(
            CrossAttentionBlock(h, config.num_heads, config.dropout) for _ in range(config.slide_layers))
        self.layout = (LayoutMap(h, config.layout_grid, config.layout_channels, config.num_layout_tokens)
                       if config.layout_grid else None)
        self.out_norm = nn.LayerNorm(h)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                patch_size_level0: float | None = None) -> SlideEncoderOutput:
        """Encode one slide: ``features`` [N, D], ``coords`` [N, 2] level-0 (x, y) or None."""
        cfg = self.config
        if features.ndim != 2 or features.shape[1] != cfg.feature_dim:
            raise DataError(f"slide features must be [N, {cfg.feature_dim}] for this model, got {tuple(features.shape)}; "
                            "were they extracted with the patch encoder this checkpoint expects?")
        n = features.shape[0]
        if n == 0:
            raise DataError("the slide has no patch features (empty feature file)")
        device = features.device
        grid, pcoords, has_coords = patch_grid_from_coords(None if coords is None else coords.cpu(), n, patch_size_level0)
        grid, pcoords = grid.to(device), pcoords.to(device)
        dtype = self.patch_proj.weight.dtype

        x = self.patch_norm(self.patch_proj(features.to(dtype)))
        x = self.dropout(x + sinusoidal_2d(grid, cfg.hidden_size, cfg.pos_max_period).to(dtype))

        # Regions: k x k windows on the patch grid (only non-empty windows get a token).
        rgrid = torch.div(grid, cfg.region_size, rounding_mode="floor")
        key = rgrid[:, 1] * (int(rgrid[:, 0].max()) + 1) + rgrid[:, 0]
        _, region_index = torch.unique(key, return_inverse=True)
        r = int(region_index.max()) + 1
        sizes = torch.bincount(region_index, minlength=r)
        inv = (1.0 / sizes.float())[:, None]
        rpos_grid = torch.zeros((r, 2), device=device).index_add(0, region_index, grid.float()) * inv
        rcoords = torch.zeros((r, 2), device=device).index_add(0, region_index, pcoords) * inv
        regions = self.region_query[None, :] + sinusoidal_2d(rpos_grid, cfg.hidden_size, cfg.pos_max_period).to(dtype)
        for layer in self.region_layers:
            regions = layer(regions, x, region_index)

        # Slide tokens <-> regions (induced set attention; linear in R).
        slide = self.slide_queries
        for to_slide, to_regions in zip(self.slide_from_regions, self.regions_from_slide):
            slide = to_slide(slide, torch.cat([slide, regions], dim=0))
            regions = to_regions(regions, slide)

        if self.layout is not None:
            slide = torch.cat([slide, self.layout(x, grid)], dim=0)
        slide_coords = pcoords.mean(dim=0, keepdim=True).expand(slide.shape[0], 2)
        return SlideEncoderOutput(
            patch_tokens=x, region_tokens=self.out_norm(regions), slide_tokens=self.out_norm(slide),
            patch_coords=pcoords, region_coords=rcoords, slide_coords=slide_coords, patch_grid=grid,
            region_index=region_index, region_sizes=sizes, has_coords=has_coords)
