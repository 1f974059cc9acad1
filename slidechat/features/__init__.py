"""Patch features: extraction from slides and the per-slide .h5 feature store."""
