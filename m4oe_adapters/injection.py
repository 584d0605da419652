"""Where experts go in a model: find the target ``nn.Linear`` layers by name and swap in expert layers.

Like PEFT's ``model.py``, this file knows nothing of the layer math (:mod:`~m4oe_adapters.experts`) or of routing
(:mod:`~m4oe_adapters.routing`); it only walks module names.
"""
from __future__ import annotations

import re

import torch.nn as nn

from .errors import ConfigError
from .experts import ModalityExpertLinear


def find_target_linears(module: nn.Module, pattern: str) -> list[str]:
    """Names of every ``nn.Linear`` under ``module`` whose dotted name fully matches ``pattern``."""
    regex = re.compile(pattern)
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and not isinstance(child, ModalityExpertLinear) and regex.fullmatch(name)
    ]


def inject_experts(module: nn.Module, pattern: str, rank: int, alpha: float) -> dict[str, ModalityExpertLinear]:
    """Replace every target linear of ``module`` with a :class:`ModalityExpertLinear` wrapping it.

    Returns:
        ``{layer name: expert layer}`` in module order. The names are those of the original linears, so they are
        stable file keys (``base_layer`` is an implementation detail of the wrapper).
    """
    names = find_target_linears(module, pattern)
    if not names:
        raise ConfigError(f"target pattern {pattern!r} matches no nn.Linear layer of the backbone")
    layers: dict[str, ModalityExpertLinear] = {}
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        expert_layer = ModalityExpertLinear(getattr(parent, child_name), rank=rank, alpha=alpha, name=name)
        setattr(parent, child_name, expert_layer)
        layers[name] = expert_layer
    return layers

