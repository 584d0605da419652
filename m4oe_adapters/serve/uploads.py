"""What a client sends and gets back: an upload's bytes → 2D images with their geometry, and masks → the upload's
own format.

=====================  ==========================================  ============================================
upload                 read as                                      mask returned as
=====================  ==========================================  ============================================
PNG/JPG/TIF/BMP/GIF    one image ``[C, H, W]``                       PNG of the same ``H, W``
NIfTI (.nii, .nii.gz)  slices along the stored z axis               NIfTI with the same shape and affine
DICOM file             one image (HU for CT)                        DICOM SEG referencing the instance
DICOM series (zip)     one image per instance, sorted along z       DICOM SEG referencing every instance
=====================  ==========================================  ============================================

The type comes from the bytes themselves (magic numbers), not from the name the client gives. Limits are checked
from headers before pixels are decoded (``max_pixels`` over all slices); zip members are counted and sized before
they are read, never extracted under their own names.
"""
from __future__ import annotations

import io
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import read_image, read_volume, write_mask
from ..errors import DataError
from .errors import PayloadTooLarge, UnsupportedMediaType

MAX_SERIES_FILES = 2000

MEDIA_TYPES = {"png": "image/png", "nifti": "application/x-nifti", "dicom_seg": "application/dicom"}


@dataclass
class Upload:
    """A decoded upload.

    Attributes:
        kind: ``"image"``, ``"nifti"``, ``"dicom"`` (one file) or ``"dicom_series"`` (zip of files).
        images: raw ``[C, H, W]`` float32 images (one per slice/instance).
        metas: per image, what :func:`~m4oe_adapters.data.read_image` reports (dtype, DICOM modality...).
        affine: NIfTI affine ``[4, 4]`` (mm).
        volume_shape: NIfTI shape as stored (``[X, Y]`` or ``[X, Y, Z]``).
        gzipped: the NIfTI came gzipped (the mask is returned gzipped too).
        datasets: DICOM source datasets (pixels not kept), one per image.
    """

    kind: str
    images: list[np.ndarray]
    metas: list[dict[str, Any]]
    affine: np.ndarray | None = None
    volume_shape: tuple[int, ...] | None = None
    gzipped: bool = False
    datasets: list = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return int(sum(image.shape[-2] * image.shape[-1] for image in self.images))


def sniff(data: bytes) -> str:
    """The upload's format from its first bytes: ``png``, ``jpeg``, ``tiff``, ``bmp``, ``gif``, ``dicom``,
    ``nifti``, ``nifti_gz`` or ``zip``.

    Raises:
        UnsupportedMediaType: none of those.
    """
    head = data[:512]
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself look like a TIFF header
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"\x1f\x8b":
        return "nifti_gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00") or len(head) >= 4 and (
        struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    ):
        return "nifti"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    raise UnsupportedMediaType(
        "the upload is not a PNG, JPEG, TIFF, BMP, GIF, DICOM (with its 128-byte preamble and 'DICM'), NIfTI or a "
        "zip of DICOM files; send one of those"
    )


SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "gif": ".gif", "dicom": ".dcm",
            "nifti": ".nii", "nifti_gz": ".nii.gz"}


def decode(data: bytes, *, max_pixels: int, max_series_bytes: int, name: str = "upload") -> Upload:
    """Decode an upload's bytes.

    Args:
        max_pixels: most pixels over all slices/instances (checked from headers before decoding).
        max_series_bytes: most uncompressed bytes in a zipped DICOM series.
        name: how the upload is named in error messages.

    Raises:
        UnsupportedMediaType (415), PayloadTooLarge (413), DataError/ServiceError (400) for unreadable data.
    """
    kind = sniff(data)
    with tempfile.TemporaryDirectory(prefix="m4oe-serve-") as folder:
        if kind == "zip":
            return _decode_series(data, Path(folder), max_pixels, max_series_bytes, name)
        path = Path(folder) / f"upload{SUFFIXES[kind]}"
        path.write_bytes(data)
        if kind in ("nifti", "nifti_gz"):
            return _decode_nifti(path, max_pixels, name, gzipped=kind == "nifti_gz")
        if kind == "dicom":
            dataset = _dicom_header(path, name)
            _check_pixels(int(getattr(dataset, "Rows", 0)) * int(getattr(dataset, "Columns", 0)), max_pixels, name)
            record = read_image(path)
            return Upload("dicom", [record.array], [_named(record.meta, name)], datasets=[dataset])
        _check_pixels(_picture_pixels(path, name), max_pixels, name)
        record = read_image(path)
        return Upload("image", [record.array], [_named(record.meta, name)])


def _named(meta: dict[str, Any], name: str) -> dict[str, Any]:
    return {**meta, "source": name}  # never the temporary path


def _check_pixels(pixels: int, limit: int, name: str) -> None:
    if pixels > limit:
        raise PayloadTooLarge(
            f"{name}: {pixels / 1e6:.1f} M pixels is over this service's limit of {limit / 1e6:.1f} M pixels; "
            "downscale the image or split the volume"
        )


def _picture_pixels(path: Path, name: str) -> int:
    """Width × height from the header of a PNG/JPEG/TIFF/BMP/GIF (no pixel is decoded)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit applies, from the header
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{name}: cannot read the image ({type(error).__name__}: {str(error)[:200]})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return int(width) * int(height)


def _dicom_header(path: Path, name: str):
    import pydicom

    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types for broken files
        raise DataError(f"{name}: cannot read the DICOM file ({type(error).__name__}: {str(error)[:200]})") from None
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        raise UnsupportedMediaType(f"{name}: multi-frame DICOM is not supported; send single-frame instances")
    if "Rows" not in dataset or "Columns" not in dataset:
        raise DataError(f"{name}: a DICOM file without an image (no Rows/Columns); send image instances")
    return dataset


def _decode_nifti(path: Path, max_pixels: int, name: str, gzipped: bool) -> Upload:
    import nibabel

    try:
        shape = tuple(int(s) for s in nibabel.load(str(path)).shape)  # header only
    except Exception as error:  # nibabel raises many types for broken headers
        raise DataError(f"{name}: cannot read the NIfTI header ({type(error).__name__}: {str(error)[:200]})") from None
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"{name}: a 2D or 3D NIfTI volume was expected, got shape {shape}")
    _check_pixels(int(np.prod(shape, dtype=np.int64)), max_pixels, name)
    volume, affine = read_volume(path)
    volume = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise DataError(f"{name}: the volume holds NaN or Inf values; fix the export before sending it")
    slices = [volume] if volume.ndim == 2 else [volume[:, :, index] for index in range(volume.shape[2])]
    meta = {"source": name, "dtype": "float32"}
    return Upload("nifti", [s[None] for s in slices], [dict(meta) for _ in slices], affine=affine,
                  volume_shape=tuple(volume.shape), gzipped=gzipped)


def _decode_series(data: bytes, folder: Path, max_pixels: int, max_bytes: int, name: str) -> Upload:
    """A zip of single-frame DICOM files of one series, sorted along the slice normal (else InstanceNumber)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise DataError(f"{name}: not a readable zip ({type(error).__name__}: {error})") from None
    if not members:
        raise DataError(f"{name}: the zip holds no file; zip the DICOM files of one series")
    if len(members) > MAX_SERIES_FILES:
        raise PayloadTooLarge(f"{name}: {len(members)} files in the zip; at most {MAX_SERIES_FILES} per request")
    if sum(info.file_size for info in members) > max_bytes:
        raise PayloadTooLarge(f"{name}: the zip unpacks to more than {max_bytes / 2**20:.0f} MiB")
    paths, budget = [], max_bytes
    for index, info in enumerate(members):
        try:
            with archive.open(info) as stream:
                content = stream.read(budget + 1)  # bounded even if the declared size lies
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as error:
            raise DataError(f"{name}: member {info.filename[:100]!r} cannot be read ({type(error).__name__})") from None
        budget -= len(content)
        if budget < 0:
            raise PayloadTooLarge(f"{name}: the zip unpacks to more than {max_bytes / 2**20:.0f} MiB")
        path = folder / f"{index:05d}.dcm"  # our own names: a member called ../../x goes nowhere
        path.write_bytes(content)
        paths.append((path, info.filename[:100]))
    headers = []
    for path, member in paths:
        if path.stat().st_size < 132 or path.read_bytes()[128:132] != b"DICM":
            raise DataError(f"{name}: member {member!r} is not a DICOM file; the zip must hold one series' files")
        headers.append(_dicom_header(path, f"{name}:{member}"))
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(series) != 1 or len(sizes) != 1:
        raise DataError(f"{name}: the zip mixes {len(series)} series / {len(sizes)} image sizes; send one series")
    rows, columns = sizes.pop()
    _check_pixels(rows * columns * len(headers), max_pixels, name)
    order = sorted(range(len(headers)), key=lambda i: _slice_position(headers[i]))
    images, metas = [], []
    for i in order:
        record = read_image(paths[i][0])
        images.append(record.array)
        metas.append(_named(record.meta, f"{name}:{paths[i][1]}"))
    return Upload("dicom_series", images, metas, datasets=[headers[i] for i in order])


def _slice_position(header) -> tuple[float, int]:
    """Position along the slice normal (ImagePositionPatient · normal of ImageOrientationPatient), then number."""
    number = int(getattr(header, "InstanceNumber", 0) or 0)
    try:
        orientation = np.asarray([float(v) for v in header.ImageOrientationPatient])
        position = np.asarray([float(v) for v in header.ImagePositionPatient])
        return float(np.dot(np.cross(orientation[:3], orientation[3:]), position)), number
    except (AttributeError, ValueError, TypeError):
        return 0.0, number


# ------------------------------------------------------------------------------------------------- encoding
def encode(upload: Upload, masks: list[np.ndarray], label_names: list[str], *, algorithm: str,
           algorithm_version: str) -> tuple[bytes, str, str]:
    """The masks in the upload's format: ``(bytes, media type, file name)``.

    Args:
        masks: one ``[H, W]`` class-id mask per image of ``upload``, same order.
    """
    if upload.kind in ("dicom", "dicom_series"):
        from .dicom_seg import segmentation_bytes

        data = segmentation_bytes(upload.datasets, np.stack(masks), label_names, algorithm=algorithm,
                                  algorithm_version=algorithm_version)
        return data, MEDIA_TYPES["dicom_seg"], "mask_seg.dcm"
    with tempfile.TemporaryDirectory(prefix="m4oe-serve-") as folder:
        if upload.kind == "nifti":
            volume = masks[0] if len(upload.volume_shape) == 2 else np.stack(masks, axis=2)
            suffix = ".nii.gz" if upload.gzipped else ".nii"
            path = write_mask(volume.astype(np.uint16 if volume.max(initial=0) > 255 else np.uint8),
                              Path(folder) / f"mask{suffix}", affine=upload.affine)
            return path.read_bytes(), MEDIA_TYPES["nifti"], f"mask{suffix}"
        path = write_mask(masks[0], Path(folder) / "mask.png")
        return path.read_bytes(), MEDIA_TYPES["png"], "mask.png"
