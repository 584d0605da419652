"""Reading images and volumes with MONAI's readers, in the orientation PIL/numpy show (rows = H, columns = W).

MONAI's ``PILReader`` and ``PydicomReader`` transpose by default (x, y order); we read with
``reverse_indexing=False`` / ``swap_ij=False`` so arrays equal ``np.asarray(PIL.Image.open(p))`` and
``pydicom.dcmread(p).pixel_array``. HDF5 (``image``/``label`` datasets, as in SSL4MIS's ACDC slices) has no MONAI
reader and is read with h5py.

Handling of awkward inputs (documented, tested):

* RGBA → alpha dropped; LA → grey; palette (P) → grey when the palette is grey, else RGB; 1-bit → 0/1;
  16-bit and float kept as values.
* two-channel or >4-channel 2D images → :class:`ImageReadError`.
* NaN/Inf pixels → :class:`ImageReadError` (a silent fill would hide a broken export).
* more than ``M4OE_MAX_PIXELS`` pixels (default 400 M = 20 000 × 20 000) → :class:`ImageReadError` before
  decoding, from the header alone; PIL's own decompression-bomb check (a non-typed error) is replaced by this one.
* unreadable or truncated files → :class:`ImageReadError` naming the file.
* TIFFs are read with tifffile (exact 16-bit colour and sample counts, which PIL changes), PIL as a fallback.
* a constant image reads normally (the presets map it to zeros); 16-bit and float images keep their values
  (``meta["dtype"]`` tells the presets what the source was).

``meta`` of an :class:`ImageRecord`: ``source`` (path), ``dtype`` (the file's pixel type), ``shape`` (as stored),
``spacing`` (mm, when the format has it), ``affine`` (4×4, NIfTI/NRRD), ``volume_shape``, ``slice_axis`` and
``slice_index`` (slices of volumes), ``dicom_modality`` and ``position`` (DICOM ImagePositionPatient), ``mode`` (PIL).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ImageReadError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
IMAGE_SUFFIXES_ALL = PIL_SUFFIXES + NIFTI_SUFFIXES + HDF5_SUFFIXES + (".dcm", ".nrrd")


MAX_PIXELS_ENV = "M4OE_MAX_PIXELS"


def max_pixels() -> int:
    """The largest image (pixels) read: ``$M4OE_MAX_PIXELS``, default 400 million."""
    value = os.environ.get(MAX_PIXELS_ENV, "400000000")
    try:
        return int(value)
    except ValueError:
        from ..errors import ConfigError

        raise ConfigError(f"{MAX_PIXELS_ENV}={value!r} is not an integer number of pixels") from None


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass
class ImageRecord:
    """One 2D image: ``array [C, H, W]`` float32 raw values and ``meta`` (dtype, source, affine, DICOM tags...)."""

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def read_pil(path: Path) -> tuple[np.ndarray, str]:
    """``[H, W]`` or ``[H, W, C]`` array as PIL shows it, and the PIL mode (``"tifffile"`` for the fallback)."""
    from monai.data import PILReader
    from PIL import Image

    if suffix(path) in (".tif", ".tiff"):
        exact = read_tiff(path)
        if exact is not None:
            return exact, "tifffile"
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own, typed limit below replaces PIL's decompression-bomb error
    try:
        try:
            with Image.open(path) as probe:
                width, height = probe.size
                mode = probe.mode
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None
        check_size(path, height, width)
        try:
            reader = PILReader(reverse_indexing=False, converter=_pil_converter)
            array, _ = reader.get_data(reader.read(str(path)))
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(
                f"{path}: cannot decode the image, the file is probably truncated or corrupt "
                f"({type(error).__name__}: {error}); re-export or remove it"
            ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return np.asarray(array), mode


def check_size(path: Path, height: int, width: int) -> None:
    if height * width > max_pixels():
        raise ImageReadError(
            f"{path}: {width}x{height} = {width * height / 1e6:.0f} M pixels is over the limit of "
            f"{max_pixels() / 1e6:.0f} M; downscale the image or set {MAX_PIXELS_ENV} to raise the limit"
        )


def read_tiff(path: Path) -> np.ndarray | None:
    """A TIFF's first page with tifffile, ``[H, W]`` or ``[H, W, C]`` with its exact samples and bit depth (PIL
    silently turns 16-bit RGB into 8-bit and reads 2-sample images as grey). None when tifffile cannot decode it
    (palette images, codecs it lacks): PIL then tries."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
                return None
            check_size(path, page.imagelength, page.imagewidth)
            array = np.asarray(page.asarray())
    except ImageReadError:
        raise
    except Exception:  # noqa: BLE001 — tifffile raises many types; PIL gets the file and reports the error
        return None
    if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        array = np.moveaxis(array, 0, -1)
    return array


def _pil_converter(image):
    """Bring PIL modes to L / RGB(A) / I / F before MONAI turns the image into an array: palette images with a grey
    palette (GIF masks, grey GIFs) become L, other palettes RGB(A); LA/PA lose alpha; CMYK/YCbCr become RGB."""
    if image.mode == "P":
        if "transparency" in image.info:
            return image.convert("RGBA")
        palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        used = palette[np.unique(np.asarray(image))] if len(palette) else palette
        grey = len(used) > 0 and bool(np.all(used == used[:, :1]))
        return image.convert("L" if grey else "RGB")
    if image.mode in ("LA", "PA"):
        return image.convert("L")
    if image.mode in ("CMYK", "YCbCr"):
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
    """DICOM slice ``[H, W]`` in Hounsfield units for CT (MONAI ``PydicomReader`` applies RescaleSlope and
    RescaleIntercept), oriented as ``pydicom.dcmread(path).pixel_array``."""
    from monai.data import PydicomReader

    try:
        import pydicom

        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        check_size(path, int(getattr(header, "Rows", 0)), int(getattr(header, "Columns", 0)))
        reader = PydicomReader(swap_ij=False)
        array, _ = reader.get_data(reader.read(str(path)))
    except ImageReadError:
        raise
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageReadError(f"{path}: cannot read the DICOM file ({type(error).__name__}: {error})") from None
    bits = int(getattr(header, "BitsAllocated", 16))
    signed = int(getattr(header, "PixelRepresentation", 0)) == 1
    info = {
        "dicom_modality": str(getattr(header, "Modality", "")) or None,
        "position": [float(v) for v in getattr(header, "ImagePositionPatient", [])] or None,
        "spacing": [float(v) for v in getattr(header, "PixelSpacing", [])] or None,
        "dtype": f"{'int' if signed else 'uint'}{bits}",
    }
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array, info


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D (or 2D) NIfTI/NRRD volume as stored (``[X, Y, Z]``, no reorientation) and its 4×4 affine (RAS, mm),
    so that a predicted mask can be written back with :func:`write_mask` on the same grid."""
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
    except KeyError as error:
        if suffix(path) != ".nrrd":
            raise ImageReadError(f"{path}: cannot read the volume (KeyError: {error})") from None
        array, meta = read_nrrd_without_geometry(path), {}  # identity affine
    except Exception as error:  # nibabel/pynrrd raise many types for broken files
        raise ImageReadError(f"{path}: cannot read the volume ({type(error).__name__}: {error})") from None
    affine = np.asarray(meta.get("original_affine", meta.get("affine", np.eye(4))), dtype=np.float64)
    return np.asarray(array), affine


def read_nrrd_without_geometry(path: Path) -> np.ndarray:
    """An NRRD without ``space directions`` (MONAI's reader needs them): its data, to be used with an identity
    affine."""
    import nrrd

    try:
        array, _ = nrrd.read(str(path))
    except Exception as error:  # pynrrd raises many types for broken files
        raise ImageReadError(f"{path}: cannot read the NRRD volume ({type(error).__name__}: {error})") from None
    return np.asarray(array)


def hdf5_shape(path: Path, dataset: str) -> tuple[int, ...]:
    """Shape of an HDF5 dataset, without reading its values."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise ImageReadError(f"{path}: no '{dataset}' dataset (found {list(handle.keys())})")
            return tuple(handle[dataset].shape)
    except ImageReadError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, TypeError... for broken files
        raise ImageReadError(f"{path}: cannot read the HDF5 file ({type(error).__name__}: {error})") from None


def read_hdf5(path: Path, dataset: str) -> np.ndarray:
    """Dataset ``dataset`` (``"image"`` or ``"label"``) of an HDF5 file, ``[H, W]`` or ``[Z, H, W]``."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if dataset not in handle:
                raise ImageReadError(f"{path}: no '{dataset}' dataset (found {list(handle.keys())})")
            return np.asarray(handle[dataset][()])
    except ImageReadError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, TypeError... for broken files
        raise ImageReadError(f"{path}: cannot read the HDF5 file ({type(error).__name__}: {error})") from None


def through_plane_axis(shape: Sequence[int], spacing: Sequence[float] | None = None) -> int:
    """The axis a 3D volume is sliced along by default: the one with the coarsest voxel spacing (the slice
    thickness, from the header); when the spacing is isotropic or unknown (HDF5), the axis with the fewest voxels.

    Args:
        shape: the volume's 3 dimensions; spacing: mm per voxel along each (``None``: unknown).
    """
    if spacing is not None and len(spacing) == 3 and max(spacing) > 1.01 * min(spacing):
        return int(np.argmax(spacing))
    return int(np.argmin(shape))


def read_image(path: str | Path, *, slice_axis: int | None = None, slice_index: int | None = None) -> ImageRecord:
    """One 2D image as ``[C, H, W]`` float32 raw values (HU for DICOM CT), C = 1 (grey) or 3 (colour).

    Formats: PNG, JPG/JPEG, TIF/TIFF, BMP, GIF, DICOM (.dcm), NIfTI (.nii/.nii.gz), NRRD, HDF5 (``image`` dataset).
    3D inputs need ``slice_index``: the slice along ``slice_axis`` (default: 2, the stored z axis, for NIfTI/NRRD;
    0 for HDF5, SSL4MIS's ``[Z, H, W]``).

    Raises:
        ImageReadError: missing, unreadable, truncated, unsupported, too large, NaN/Inf, wrong channel count.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    kind = suffix(path)
    meta: dict[str, Any] = {"source": str(path)}
    if kind in PIL_SUFFIXES:
        array, mode = read_pil(path)
        meta.update(mode=mode, dtype=str(array.dtype), shape=list(array.shape))
        array = to_channels_first(array, path)
    elif kind == ".dcm":
        array, info = read_dicom(path)
        meta.update(info, shape=list(array.shape))
        array = to_channels_first(array, path)
    elif kind in NIFTI_SUFFIXES or kind == ".nrrd":
        volume, affine = read_volume(path)
        spacing = np.linalg.norm(affine[:3, :3], axis=0).tolist()
        meta.update(affine=affine.tolist(), dtype=str(volume.dtype), shape=list(volume.shape),
                    volume_shape=list(volume.shape), spacing=spacing)
        slice_axis = 2 if slice_axis is None else slice_axis
        if volume.ndim == 3:
            meta.update(slice_axis=slice_axis, slice_index=slice_index, volume_spacing=spacing,
                        spacing=[s for axis, s in enumerate(spacing) if axis != slice_axis])
        array = take_slice(volume, path, slice_axis, slice_index)[None]
    elif kind in HDF5_SUFFIXES:
        volume = read_hdf5(path, "image")
        meta.update(dtype=str(volume.dtype), shape=list(volume.shape))
        slice_axis = 0 if slice_axis is None else slice_axis
        if volume.ndim == 3:
            meta.update(volume_shape=list(volume.shape), slice_axis=slice_axis, slice_index=slice_index)
        array = take_slice(volume, path, slice_axis, slice_index)[None]
    else:
        raise ImageReadError(
            f"{path}: unsupported file type {kind!r}; use PNG, JPG, TIF, BMP, GIF, DICOM, NIfTI, NRRD or HDF5"
        )
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ImageReadError(f"{path}: the image holds NaN or Inf values; fix the export before using it")
    return ImageRecord(array, meta)


def take_slice(volume: np.ndarray, path: Path, axis: int, index: int | None) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a 3D volume; 2D arrays pass through."""
    if volume.ndim == 2:
        return volume
    if volume.ndim != 3:
        raise ImageReadError(f"{path}: expected a 2D or 3D volume, got shape {volume.shape}")
    if index is None:
        raise ImageReadError(f"{path}: a 3D volume of shape {volume.shape}; give a slice index along axis {axis}")
    if not 0 <= index < volume.shape[axis]:
        raise ImageReadError(f"{path}: slice {index} outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


def write_mask(
    mask: np.ndarray, path: str | Path, *, like: ImageRecord | None = None, affine: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write class ids atomically (a temporary file in the same folder, then ``os.replace``).

    Args:
        mask: ``[H, W]`` (PNG or NIfTI) or a volume ``[X, Y, Z]`` (NIfTI) of class ids (>= 0).
        path: ``.png`` (8-bit, or 16-bit above 255 classes) or ``.nii``/``.nii.gz``.
        like: the image the mask belongs to; a PNG mask must have its H, W, a NIfTI one takes its affine.
        affine: 4×4 NIfTI affine (wins over ``like``); identity when neither is given.
        num_classes: for PNG masks, make them visible in any viewer: 2 classes → 0 (background) / 255
            (foreground); 3 to 256 → a palette PNG whose pixel values are still the class ids 0..K-1, each shown in
            its own colour. ``None``: raw class ids (0, 1, 2... look black). NIfTI masks always hold class ids.

    Raises:
        MaskError: wrong shape, negative or non-integer ids, or an unsupported suffix.
    """
    from ..adapter_file import atomic_write
    from .errors import MaskError

    path = Path(path)
    data = np.asarray(mask)
    if data.size and (data.min() < 0 or not np.array_equal(data, np.round(data))):
        raise MaskError(f"{path}: a mask holds non-negative integer class ids; got values {np.unique(data)[:8]}")
    if like is not None and data.ndim == 2 and tuple(data.shape) != tuple(like.array.shape[-2:]):
        raise MaskError(
            f"{path}: mask is {data.shape[0]}x{data.shape[1]} but its image {like.meta.get('source')} is "
            f"{like.array.shape[-2]}x{like.array.shape[-1]} (H x W)"
        )
    dtype = np.uint8 if data.max(initial=0) < 256 else np.uint16
    if suffix(path) in NIFTI_SUFFIXES:
        import nibabel

        if affine is None and like is not None and "affine" in like.meta:
            affine = np.asarray(like.meta["affine"], dtype=np.float64)
        image = nibabel.Nifti1Image(data.astype(dtype), np.eye(4) if affine is None else np.asarray(affine))

        def write(temporary: str) -> None:
            # nibabel picks the compression from the name, so write to a same-suffix temporary name.
            staged = temporary + suffix(path)
            try:
                nibabel.save(image, staged)
                os.replace(staged, temporary)
            finally:
                if os.path.exists(staged):
                    os.unlink(staged)

        return atomic_write(path, write)
    if suffix(path) != ".png":
        raise MaskError(f"{path}: masks are written as .png or .nii/.nii.gz, not {suffix(path)!r}")
    from PIL import Image

    if data.ndim != 2:
        raise MaskError(f"{path}: a PNG mask must be 2D [H, W], got shape {data.shape}; write volumes as NIfTI")
    if num_classes == 2 and data.max(initial=0) <= 1:
        picture = Image.fromarray((data * 255).astype(np.uint8))
    elif num_classes is not None and 2 < num_classes <= 256:
        from ..reporting import PALETTE

        picture = Image.fromarray(data.astype(np.uint8), mode="P")
        colours = [PALETTE[i % len(PALETTE)] if i else (0, 0, 0) for i in range(num_classes)]
        picture.putpalette([int(c) for colour in colours for c in colour])
    else:
        picture = Image.fromarray(data.astype(dtype))
    return atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))
