"""DICOM SEG out: a predicted label map written as a DICOM Segmentation object (``highdicom``) that references the
source instances it was computed from, one segment per foreground class.

    source datasets [N] + class-id masks [N, H, W] → Segmentation (binary segments 1..K-1, frames of every source)
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .. import __version__
from .errors import ServiceError


def segmentation_bytes(
    sources: Sequence, masks: np.ndarray, label_names: Sequence[str], *, algorithm: str, algorithm_version: str
) -> bytes:
    """The DICOM SEG file (Part 10 bytes) of ``masks`` on ``sources``.

    Args:
        sources: pydicom datasets of the source images, one per mask, in the masks' order (one series).
        masks: ``[N, H, W]`` class ids (0 = background, ``k`` = ``label_names[k]``), ``H, W`` = Rows, Columns.
        label_names: one name per class, background first.
        algorithm: name recorded as the segmentation algorithm (e.g. ``m4oe-adapters fundus``).
        algorithm_version: recorded with it (the adapter version).

    Every foreground class gets a segment, even when empty, and every source frame a frame (empty ones kept), so a
    reader gets back exactly ``masks``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    masks = np.asarray(masks)
    if masks.ndim != 3 or len(sources) != masks.shape[0]:
        raise ServiceError(f"{len(sources)} DICOM sources for masks of shape {masks.shape}")
    labels = list(label_names)[1:] or ["foreground"]
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64], version=algorithm_version[:64], family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(label)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, label in enumerate(labels, start=1)
    ]
    dtype = np.uint8 if len(labels) < 256 else np.uint16
    try:
        segmentation = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=masks.astype(dtype),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=9001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="m4oe-adapters",
            manufacturer_model_name=algorithm[:64],
            software_versions=__version__,
            device_serial_number="none",
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        # highdicom refuses sources that lack what a SEG must reference (UIDs, geometry...): the upload's fault.
        raise ServiceError(
            f"cannot write a DICOM SEG for this upload ({type(error).__name__}: {str(error)[:200]}); "
            "send complete DICOM image instances"
        ) from None
    buffer = io.BytesIO()
    segmentation.save_as(buffer)
    return buffer.getvalue()
