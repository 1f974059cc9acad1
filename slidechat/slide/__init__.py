"""Slide ingestion: settings (``config.ExtractionConfig``), reading (``reader.SlideReader``), tissue detection
(``tissue.detect_tissue``) and tiling (``tiling.make_tile_grid``, ``tiling.PatchBlockDataset``,
``tiling.patch_loader``)."""

from slidechat.slide.config import ExtractionConfig, TissueConfig
from slidechat.slide.reader import SlideReader

__all__ = ["ExtractionConfig", "SlideReader", "TissueConfig"]
