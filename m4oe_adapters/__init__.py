"""m4oe-adapters: modality experts (LoRA mixture-of-experts) on one frozen Swin backbone.

The public API. Data flows one way::

    image → preprocessing (presets) → backbone features (experts inside) → per-modality decoder → head → mask
"""
from .adapter_file import inspect_adapter, load_adapter, model_from_adapter, read_adapter, save_adapter
from .backbones import Backbone, load_backbone
from .checkpointing import set_gradient_checkpointing
from .compilation import compile_model
from .config import DecoderConfig, ExpertConfig
from .errors import (
    AdapterError,
    AdapterFormatError,
    BackboneError,
    BackboneMismatchError,
    ConfigError,
    DataError,
    M4oEError,
)
from .experts import ModalityExpertLinear
from .model import ModalityInfo, SegmentationModel
from .peft_interop import export_peft, import_peft
from .routing import RoutingState
from .segmenter_file import LoadedSegmenter, load_segmenter, save_baseline

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterFormatError",
    "Backbone",
    "BackboneError",
    "BackboneMismatchError",
    "ConfigError",
    "DataError",
    "DecoderConfig",
    "ExpertConfig",
    "LoadedSegmenter",
    "M4oEError",
    "ModalityExpertLinear",
    "ModalityInfo",
    "RoutingState",
    "SegmentationModel",
    "compile_model",
    "export_peft",
    "import_peft",
    "inspect_adapter",
    "load_adapter",
    "load_backbone",
    "load_segmenter",
    "model_from_adapter",
    "read_adapter",
    "save_adapter",
    "save_baseline",
    "set_gradient_checkpointing",
]
