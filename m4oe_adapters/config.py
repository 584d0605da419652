"""What to configure: the modality experts' rank, scaling, targets and routing.

One dataclass, every field documented with its default. It travels as JSON inside every adapter file's metadata, so
a file says exactly how its experts were built.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import ConfigError

ROUTING_MODES = ("hard", "soft")


@dataclass
class ExpertConfig:
    """How modality experts are built and routed.

    Attributes:
        rank: rank ``r`` of each expert's update ``ΔW_k = B_k A_k`` (default 8).
        alpha: the update is scaled by ``alpha / rank`` (default 16, i.e. scaling 2).
        target_pattern: regular expression matched (``re.fullmatch``) against each ``nn.Linear``'s name inside the
            backbone; ``None`` uses the backbone family's default (attention qkv/proj and MLP fc1/fc2 of every block).
        routing: ``"hard"`` (each sample's modality picks its expert; only that expert is computed) or ``"soft"``
            (a gate mixes all loaded experts per token). Overridable per call.
        top_k: with soft routing, keep only the ``top_k`` largest gate weights per token and renormalise
            (``None`` keeps all).
        gate_temperature: softmax temperature of the soft gate over squared distances between a normalised token
            and each expert's router key (default 0.05: distances differ by a few hundredths between modalities).
        init_std: std of the normal initialisation of ``A`` (``B`` starts at zero, so a new expert is the identity).
    """

    rank: int = 8
    alpha: float = 16.0
    target_pattern: str | None = None
    routing: str = "hard"
    top_k: int | None = None
    gate_temperature: float = 0.05
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to every expert's update."""
        return self.alpha / self.rank

    def validate(self) -> "ExpertConfig":
        if not isinstance(self.rank, int) or self.rank < 1 or self.rank > 4096:
            raise ConfigError(f"rank must be an integer in [1, 4096], got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not (0 < float(self.alpha) < 1e6):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if not isinstance(self.gate_temperature, (int, float)) or self.gate_temperature <= 0:
            raise ConfigError(f"gate_temperature must be > 0, got {self.gate_temperature!r}")
        if self.target_pattern is not None:
            try:
                re.compile(self.target_pattern)
            except (re.error, TypeError) as error:
                raise ConfigError(f"target_pattern is not a valid regular expression: {error}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ExpertConfig":
        return _from_dict(cls, values, "expert")


@dataclass
class DecoderConfig:
    """The per-modality convolutional decoder (see :mod:`m4oe_adapters.decoder`).

    Attributes:
        channels: width ``D`` of the pyramid (default 64).
        stem_channels: width of the full-resolution image stem that restores thin structures (default 16).
    """

    channels: int = 64
    stem_channels: int = 16

    def __post_init__(self) -> None:
        for name in ("channels", "stem_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or not (1 <= value <= 1024):
                raise ConfigError(f"decoder {name} must be an integer in [1, 1024], got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DecoderConfig":
        return _from_dict(cls, values, "decoder")


def _from_dict(cls, values, what: str):
    """Build a config dataclass from JSON, refusing non-mappings and unknown fields with :class:`ConfigError`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{what} config must be a mapping, got {type(values).__name__}")
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} config fields: {sorted(unknown)}")
    return cls(**values)


MODALITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def check_modality_name(name: str) -> str:
    """Modality names key tensors in files and modules: letters, digits, ``_`` and ``-``, at most 64 characters."""
    if not isinstance(name, str) or not MODALITY_NAME.fullmatch(name):
        raise ConfigError(
            f"invalid modality name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


__all__ = ["ExpertConfig", "DecoderConfig", "ROUTING_MODES", "check_modality_name"]
