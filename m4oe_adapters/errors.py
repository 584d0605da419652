"""One small hierarchy of typed errors.

Every error a user can trigger with a bad file or input derives from :class:`M4oEError`, so a deployment can catch
one type. Messages name the file (when there is one) and say what to do.
"""
from __future__ import annotations

from pathlib import Path


class M4oEError(Exception):
    """Base class of every error raised on purpose by m4oe-adapters."""


class AdapterError(M4oEError):
    """An adapter file cannot be written, read or attached."""


class AdapterFormatError(AdapterError):
    """The file is not a valid m4oe adapter (not safetensors, truncated, corrupt, unknown version, bad metadata)."""


class BackboneMismatchError(AdapterError):
    """The adapter was made for another backbone (fingerprint, channels, layer set or tensor shapes differ)."""


class BackboneError(M4oEError):
    """A backbone cannot be built or its checkpoint cannot be read."""


class ConfigError(M4oEError):
    """A configuration value is invalid (routing mode, rank, modality name...)."""


class DataError(M4oEError):
    """An image, mask, volume or manifest cannot be read or is not usable."""


def describe(path: str | Path | None) -> str:
    """A path as it appears in error messages ("<memory>" when there is none)."""
    return "<memory>" if path is None else str(path)


class UnknownImageError(DataError):
    """An image fits none of the loaded adapters (image-level routing refused it).

    Attributes:
        decisions: the :class:`~m4oe_adapters.routing.RoutingDecision` of every image of the call.
    """

    def __init__(self, message: str, decisions=None) -> None:
        super().__init__(message)
        self.decisions = decisions or []
