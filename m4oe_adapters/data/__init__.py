"""Data in: readers (MONAI, in the orientation PIL shows), mask encodings, dataset quirks, manifests and folders,
seeded training datasets.

Files: :mod:`.readers` (images, volumes, writing masks), :mod:`.masks` (mask encodings), :mod:`.known_datasets`
(per-dataset quirks), :mod:`.manifest` (samples from CSVs and folders), :mod:`.datasets` (torch datasets),
:mod:`.errors` (typed errors).
"""
from .datasets import SegmentationDataset, convert_channels, normalise
from .errors import ImageReadError, ManifestError, MaskError
from .known_datasets import KNOWN_DATASETS, label_names, sample_group
from .manifest import (
    Sample,
    data_root,
    expand_volume,
    load_pair,
    read_manifest,
    samples_from_folders,
    scan_samples,
    select,
)
from .mask_encodings import ENCODINGS, decode_mask
from .masks import read_mask
from .readers import ImageRecord, read_image, read_volume, write_mask

__all__ = [
    "ENCODINGS", "ImageReadError", "ImageRecord", "KNOWN_DATASETS", "ManifestError", "MaskError", "Sample",
    "SegmentationDataset", "convert_channels", "data_root", "decode_mask", "expand_volume", "label_names",
    "load_pair", "normalise", "read_image", "read_manifest", "read_mask", "read_volume", "sample_group",
    "samples_from_folders", "scan_samples", "select", "write_mask",
]
