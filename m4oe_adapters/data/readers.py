"""Reading images and volumes with MONAI's readers, in the orientation PIL/numpy show (rows = H, columns = W).

MONAI's ``PILReader`` and ``PydicomReader`` transpose by default (x, y order); we read with
``reverse_indexing=False`` / ``swap_ij=False`` so arrays equal ``np.asarray(PIL.Image.open(p))`` and
``pydicom.dcmread(p).pixel_array``. HDF5 (``image``/``label`` datasets, as in SSL4MIS's ACDC slices) has no MONAI
reader and is read with h5py.

Handling of awkward inputs (documented, tested):

* RGBA → alpha dropped; LA → grey; palette (P) → RGB; 1-bit → 0/1; 16-bit and float kept as values.
* two-channel or >4-channel 2D images → :class:`ImageReadError`.
* NaN/Inf pixels → :class:`ImageReadError` (a silent fill would hide a broken export).
* more than ``M4OE_MAX_PIXELS`` pixels (default 400 M, e.g. 20 000 × 20 000) → :class:`ImageReadError` before
  decoding (PIL's decompression-bomb limit is lifted only up to that bound).
* unreadable or truncated files → :class:`ImageReadError` naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
IMAGE_SUFFIXES_ALL = PIL_SUFFIXES + NIFTI_SUFFIXES + HDF5_SUFFIXES + (".dcm", ".nrrd")


def max_pixels() -> int:
    return int(os.environ.get("M4OE_MAX_PIXELS", 400_000_000))


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class ImageRecord:
    """One 2D image: ``array [C, H, W]`` float32 raw values and ``meta`` (dtype, source, affine, DICOM tags...)."""

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def read_pil(path: Path) -> tuple[np.ndarray, str]:
    """``[H, W]`` or ``[H, W, C]`` array as PIL shows it, and the PIL mode."""
    from monai.data import PILReader
    from PIL import Image

    try:
        with Image.open(path) as probe:
            width, height = probe.size
            mode = probe.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None
    if width * height > max_pixels():
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height / 1e6:.0f} M pixels is over the limit of "
            f"{max_pixels() / 1e6:.0f} M (set M4OE_MAX_PIXELS to raise it; prediction tiles large images)"
        )
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels(), previous or 0)
    try:
        reader = PILReader(reverse_indexing=False, converter=_pil_converter)
        array, _ = reader.get_data(reader.read(str(path)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot decode the image ({type(error).__name__}: {error})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return np.asarray(array), mode


def _pil_converter(image):
    """Bring PIL modes to L / RGB / I / F before MONAI turns the image into an array."""
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA"):
        return image.convert("L")
    if image.mode == "CMYK" or image.mode == "YCbCr":
        return image.convert("RGB")
    return image


def to_channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    """``[H, W]`` / ``[H, W, C]`` → ``[C, H, W]``; RGBA loses its alpha; 2 or >4 channels are refused."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        channels = array.shape[-1]
        if channels == 4:
            array = array[..., :3]
        elif channels not in (1, 3):
            raise ImageReadError(f"{path}: {channels} channels; expected grey (1), RGB (3) or RGBA (4)")
        return np.moveaxis(array, -1, 0)
    raise ImageReadError(f"{path}: a 2D image was expected, got an array of shape {array.shape}")


def read_dicom(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """DICOM slice in Hounsfield units (MONAI ``PydicomReader`` applies RescaleSlope/Intercept), ``[H, W]``."""
    from monai.data import PydicomReader

    try:
        reader = PydicomReader(swap_ij=False)
        array, meta = reader.get_data(reader.read(str(path)))
        import pydicom

        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: cannot read the DICOM file ({type(error).__name__}: {error})") from None
    info = {
        "dicom_modality": str(getattr(header, "Modality", "")) or None,
        "position": [float(v) for v in getattr(header, "ImagePositionPatient", [])] or None,
        "spacing": [float(v) for v in getattr(header, "PixelSpacing", [])] or None,
    }
    return np.asarray(array), info


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D (or 2D) NIfTI/NRRD volume as stored (``[X, Y, Z]``) and its 4×4 affine."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        if suffix(path) == ".nrrd":
            from monai.data import NrrdReader

            reader = NrrdReader()
        else:
            from monai.data import NibabelReader

            reader = NibabelReader()
        array, meta = reader.get_data(reader.read(str(path)))
    except Exception as error:  # nibabel/pynrrd raise many types for broken files
        raise ImageReadError(f"{path}: cannot read the volume ({type(error).__name__}: {error})") from None
    affine = np.asarray(meta.get("original_affine", meta.get("affine", np.eye(4))), dtype=np.float64)
    return np.asarray(array), affine


def read_hdf5(path: Path, dataset: str) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise ImageReadError(f"{path}: no '{dataset}' dataset (found {list(handle.keys())})")
            return np.asarray(handle[dataset][()])
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read the HDF5 file ({error})") from None


def read_image(path: str | Path, *, slice_axis: int = 2, slice_index: int | None = None) -> ImageRecord:
    """One 2D image as ``[C, H, W]`` float32 raw values.

    3D inputs (NIfTI, NRRD, HDF5 volumes) need ``slice_index`` (the slice along ``slice_axis``; HDF5 volumes are
    ``[Z, H, W]`` and slice along axis 0).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = suffix(path)
    meta: dict[str, Any] = {"source": str(path)}
    if kind in PIL_SUFFIXES:
        array, mode = read_pil(path)
        meta["mode"] = mode
        meta["dtype"] = str(array.dtype)
        array = to_channels_first(array, path)
    elif kind == ".dcm":
        array, info = read_dicom(path)
        meta.update(info, dtype="int16")
        array = array[None]
    elif kind in NIFTI_SUFFIXES or kind == ".nrrd":
        volume, affine = read_volume(path)
        meta.update(affine=affine.tolist(), dtype=str(volume.dtype), volume_shape=list(volume.shape))
        array = take_slice(volume, path, slice_axis, slice_index)[None]
    elif kind in HDF5_SUFFIXES:
        volume = read_hdf5(path, "image")
        meta["dtype"] = str(volume.dtype)
        array = (take_slice(volume, path, 0, slice_index) if volume.ndim == 3 else volume)[None]
    else:
        raise ImageReadError(f"{path}: unsupported file type {kind!r} (PNG, JPG, TIF, BMP, GIF, DICOM, NIfTI, NRRD, HDF5)")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: the image holds NaN or Inf values; fix the export before using it")
    return ImageRecord(array, meta)


def take_slice(volume: np.ndarray, path: Path, axis: int, index: int | None) -> np.ndarray:
    if volume.ndim == 2:
        return volume
    if volume.ndim != 3:
        raise ImageReadError(f"{path}: expected a 2D or 3D volume, got shape {volume.shape}")
    if index is None:
        raise ImageReadError(f"{path}: a 3D volume of shape {volume.shape}; give a slice index along axis {axis}")
    if not 0 <= index < volume.shape[axis]:
        raise ImageReadError(f"{path}: slice {index} outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


def write_mask(mask: np.ndarray, path: str | Path, *, affine: np.ndarray | None = None) -> Path:
    """Write class ids: NIfTI (``.nii``/``.nii.gz``, with ``affine``) or PNG (same H, W), atomically."""
    from ..adapter_file import atomic_write

    path = Path(path)
    data = np.asarray(mask)
    if suffix(path) in NIFTI_SUFFIXES:
        import nibabel

        image = nibabel.Nifti1Image(data.astype(np.uint8), np.eye(4) if affine is None else affine)

        def write(temporary: str) -> None:
            # nibabel picks the compression from the name, so write to a same-suffix temporary name.
            staged = temporary + suffix(path)
            nibabel.save(image, staged)
            os.replace(staged, temporary)

        return atomic_write(path, write)
    from PIL import Image

    if data.ndim != 2:
        raise ImageReadError(f"{path}: a PNG mask must be 2D, got shape {data.shape}")
    picture = Image.fromarray(data.astype(np.uint8 if data.max(initial=0) < 256 else np.uint16))
    return atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))
