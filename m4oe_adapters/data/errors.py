"""Data errors: every one names the file and the problem."""
from __future__ import annotations

from ..errors import DataError


class ImageReadError(DataError):
    """An image or volume cannot be read (missing, truncated, unsupported, too large, NaN/Inf)."""


class MaskError(DataError):
    """A mask is unreadable, has unexpected values, or does not match its image's size."""


class ManifestError(DataError):
    """A manifest CSV lacks columns or names files that do not exist."""
