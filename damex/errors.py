"""One exception type per package boundary (docs/design.md §10).

Every message names the file / key / line involved and says what was expected.
"""

from __future__ import annotations

__all__ = ["DamexError", "ConfigError", "DatasetError", "CheckpointError"]


class DamexError(Exception):
    """Base class of all damex errors."""


class ConfigError(DamexError, ValueError):
    """A configuration file or override is invalid (names the key and the file)."""


class DatasetError(DamexError, ValueError):
    """An annotation file or image is invalid (names the file and the record / line)."""


class CheckpointError(DamexError, RuntimeError):
    """A checkpoint cannot be written, read or does not match the model."""
