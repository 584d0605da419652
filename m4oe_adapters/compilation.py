"""``torch.compile`` of a model with modality experts, without a recompilation at every modality switch.

Hard routing normally picks each layer's expert by name (``lora_A["CT"]``), which ``torch.compile`` traces as a Python
constant: a switch to another modality would fail the guards and compile the backbone again. :func:`compile_model`
compiles the backbone (where almost all the time goes) and switches the model to *index routing*: every loaded expert
is stacked in each layer and each sample's choice is an index tensor (the mixed-batch path), so the compiled graph is
the same for every modality and every mix of modalities. As PEFT's hotswapping does, replacing a modality's adapter
with another of the same rank (``load_adapter(..., replace=True)``) copies new values into tensors of the same shapes
and needs no recompilation either. A new batch size or image size compiles once more (static shapes), as does
loading or removing a modality (the stacks change size). Decoders run eagerly: they are small, and each modality has
its own.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


def compile_model(model, **options: Any):
    """Compile ``model.backbone`` in place with ``torch.compile(**options)`` and route by index; returns ``model``.

    Args:
        model: a :class:`~m4oe_adapters.model.SegmentationModel` (unmerged, hard routing).
        options: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).
    """
    if model.merged_modality is not None:
        raise ConfigError("compile a merged model as a plain module: torch.compile(model); or unmerge() first")
    model.route_by_index = True
    model.backbone.compile(**options)
    return model


def recompile_count() -> int:
    """Frames dynamo has compiled in this process so far (``torch._dynamo`` counters): a rise after warm-up is a
    recompilation."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


__all__ = ["compile_model", "recompile_count"]
