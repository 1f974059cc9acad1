"""Slide ingestion: reading (SlideReader), tissue detection and tiling."""
