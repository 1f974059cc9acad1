"""Slide ingestion: reading (``reader.SlideReader``), tissue detection (``tissue.detect_tissue``) and
tiling (``tiling.make_tile_grid``, ``tiling.PatchBlockDataset``, ``tiling.patch_loader``)."""

from slidechat.slide.reader import SlideReader

__all__ = ["SlideReader"]
