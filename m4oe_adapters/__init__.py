"""m4oe-adapters: modality experts (LoRA mixture-of-experts) on one frozen Swin backbone.

The public API. Data flows one way::

    image → preprocessing (presets) → backbone features (experts inside) → per-modality decoder → head → mask

Each name below is imported from its module on first use (PEP 562), so ``import m4oe_adapters`` (and the commands
that only read files, ``m4oe inspect`` and ``m4oe zoo list``) start without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module (in this package) that defines it
    "AdapterError": "errors",
    "AdapterFormatError": "errors",
    "Backbone": "backbones",
    "BackboneError": "errors",
    "BackboneMismatchError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "DecoderConfig": "config",
    "ExpertConfig": "config",
    "LoadedSegmenter": "segmenter_file",
    "M4oEError": "errors",
    "ModalityExpertLinear": "experts",
    "ModalityInfo": "model",
    "RoutingState": "routing",
    "SegmentationModel": "model",
    "compile_model": "compilation",
    "export_peft": "peft_interop",
    "import_peft": "peft_interop",
    "inspect_adapter": "adapter_header",
    "load_adapter": "adapter_file",
    "load_backbone": "backbones",
    "load_segmenter": "segmenter_file",
    "model_from_adapter": "adapter_file",
    "read_adapter": "adapter_file",
    "save_adapter": "adapter_file",
    "save_baseline": "segmenter_file",
    "set_gradient_checkpointing": "checkpointing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (then the name is a plain module attribute)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
