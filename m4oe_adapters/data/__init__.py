"""Data in: readers (MONAI, orientation as PIL shows it), mask encodings, manifests, training datasets."""
from .datasets import SegmentationDataset, convert_channels, normalise
from .errors import ImageReadError, ManifestError, MaskError
from .manifest import (
    KNOWN_DATASETS,
    Sample,
    label_names,
    load_pair,
    read_manifest,
    samples_from_folders,
    scan_samples,
    select,
)
from .masks import decode_mask, read_mask
from .readers import ImageRecord, read_image, read_volume, write_mask

__all__ = [
    "ImageReadError", "ImageRecord", "KNOWN_DATASETS", "ManifestError", "MaskError", "Sample", "SegmentationDataset",
    "convert_channels", "decode_mask", "label_names", "load_pair", "normalise", "read_image", "read_manifest",
    "read_mask", "read_volume", "samples_from_folders", "scan_samples", "select", "write_mask",
]
