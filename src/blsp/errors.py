"""User-facing errors: the CLI prints their message without a traceback."""

from __future__ import annotations


class BlspError(Exception):
    """An error caused by the user's input (a file, a field, a model reference), not by a bug."""


class ConfigError(BlspError):
    """A configuration key or value is wrong."""


class ModelLoadError(BlspError):
    """A model reference cannot be resolved or loaded."""


class AudioError(BlspError):
    """An audio file or array cannot be used."""
