"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class SlideChatError(Exception):
    """Base class: a problem with the user's input or set-up, with a message that says what to do."""

    exit_code = 2


class SlideReadError(SlideChatError):
    """The file is missing, unreadable, not a slide, truncated, or too large to decode safely."""


class MissingMppError(SlideChatError):
    """The slide has no microns-per-pixel in its metadata and none was given (`--mpp`)."""


class NoTissueError(SlideChatError):
    """Tissue detection found nothing to tile."""


class CheckpointError(SlideChatError):
    """A checkpoint folder is missing files, corrupt, or does not match the model."""


class ConfigError(SlideChatError):
    """A config, recipe or option is invalid."""


class DataError(SlideChatError):
    """An input data file (features, conversations, benchmark CSV) is malformed."""


class DependencyError(SlideChatError):
    """An optional dependency or hardware feature (CUDA, bitsandbytes, openslide) is not available."""
