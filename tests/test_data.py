"""Data in: every format and mask encoding reads in the orientation PIL shows; bad files get typed errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m4oe_adapters.data import (
    ImageReadError,
    ManifestError,
    MaskError,
    Sample,
    SegmentationDataset,
    load_pair,
    read_image,
    read_manifest,
    read_mask,
    read_volume,
    samples_from_folders,
    scan_samples,
    select,
    write_mask,
)
from m4oe_adapters.errors import ConfigError, DataError
from m4oe_adapters.presets import PresetError, apply_preset, canonical_modality, default_preset, validate_preset


def asymmetric(height=40, width=70):
    image = np.zeros((height, width), dtype=np.uint8)
    image[2:10, 5:60] = 200  # a wide bar near the top: transposing would move it
    image[30, 3] = 255
    return image


def test_png_orientation_matches_pil(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(asymmetric()).save(path)
    record = read_image(path)
    assert record.array.shape == (1, 40, 70)
    assert np.array_equal(record.array[0], np.asarray(Image.open(path)))


def test_rgb_and_rgba_images_become_three_channels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        record = read_image(tmp_path / name)
        assert record.array.shape == (3, 20, 30)
        assert np.array_equal(record.array, np.moveaxis(rgb, -1, 0))


def test_sixteen_bit_png_keeps_its_values(tmp_path):
    data = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    Image.fromarray(data).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png").array.max() == data.max()


@pytest.mark.parametrize("encoding,values,expected", [
    ("binary255", [0, 255], [0, 1]), ("binary01", [0, 1], [0, 1]), ("invert255", [0, 255], [1, 0]),
    ("class_ids", [0, 3], [0, 3]),
])
def test_mask_encodings(tmp_path, encoding, values, expected):
    mask = np.full((10, 12), values[0], np.uint8)
    mask[:, 6:] = values[1]
    Image.fromarray(mask).save(tmp_path / "m.png")
    decoded = read_mask(tmp_path / "m.png", encoding=encoding)
    assert decoded[0, 0] == expected[0] and decoded[0, 11] == expected[1]


def test_one_bit_mask_reads_as_zero_one(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[3:6, 2:9] = True
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), mask.astype(np.int64))


def test_jpeg_mask_is_thresholded(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=70)
    decoded = read_mask(tmp_path / "m.jpg")
    assert set(np.unique(decoded)) == {0, 1}
    assert (decoded == (mask > 0)).mean() > 0.98


def test_rgb_coded_classes_use_a_palette(tmp_path):
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:4] = (255, 0, 0)
    mask[4:, 4:] = (0, 255, 0)
    Image.fromarray(mask).save(tmp_path / "m.png")
    decoded = read_mask(tmp_path / "m.png", encoding="rgb", palette={(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2})
    assert decoded[0, 0] == 1 and decoded[7, 7] == 2 and decoded[7, 0] == 0


def test_mask_with_unexpected_values_is_refused_naming_the_file(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[0, 0], mask[5, 5] = 255, 37
    Image.fromarray(mask).save(tmp_path / "odd.png")
    with pytest.raises(MaskError, match="odd.png"):
        read_mask(tmp_path / "odd.png", encoding="binary255")


def test_nifti_volume_is_sliced_along_the_axis_and_masks_keep_geometry(tmp_path):
    import nibabel

    volume = np.random.default_rng(0).normal(size=(20, 30, 5)).astype(np.float32)
    labels = np.zeros((20, 30, 5), np.uint8)
    labels[5:10, 5:20, 2] = 1
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "v.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, affine), tmp_path / "l.nii.gz")
    record = read_image(tmp_path / "v.nii.gz", slice_index=2)
    assert record.array.shape == (1, 20, 30)
    np.testing.assert_allclose(record.array[0], volume[:, :, 2])
    samples = samples_from_folders(tmp_path, None, modality="MRI")  # no masks: every slice
    assert len([s for s in samples if s.image.name == "v.nii.gz"]) == 5
    write_mask(labels, tmp_path / "out.nii.gz", affine=affine)
    saved = nibabel.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(saved.affine, affine)
    assert np.array_equal(np.asarray(saved.dataobj), labels)


def write_dicom(path, pixels, z=5.0):
    """A CT slice: stored values ``pixels`` (uint16), HU = stored - 1024, at height ``z`` mm."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "CT", *pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing, ds.ImagePositionPatient = [0.8, 0.8], [0, 0, z]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_is_converted_to_hounsfield_units(tmp_path):
    pixels = np.zeros((16, 24), np.uint16)
    pixels[2:5, 3:20] = 1064  # 1064 - 1024 = 40 HU
    write_dicom(tmp_path / "s.dcm", pixels)
    record = read_image(tmp_path / "s.dcm")
    assert record.array.shape == (1, 16, 24)
    assert record.array[0, 3, 10] == 40 and record.array[0, 0, 0] == -1024
    assert record.meta["dicom_modality"] == "CT" and record.meta["spacing"] == [0.8, 0.8]


def test_hdf5_image_and_label_in_one_file(tmp_path):
    import h5py

    with h5py.File(tmp_path / "s.h5", "w") as handle:
        handle["image"] = np.random.default_rng(0).random((12, 14)).astype(np.float32)
        handle["label"] = np.eye(12, 14, dtype=np.uint8) * 2
    sample = Sample("x", "MRI", "A", tmp_path / "s.h5", tmp_path / "s.h5")
    image, mask, _ = load_pair(sample)
    assert image.shape == (1, 12, 14) and mask.max() == 2


def test_truncated_png_raises_image_read_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(asymmetric()).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(path)


def test_nan_pixels_are_refused(tmp_path):
    import tifffile

    data = np.ones((8, 8), np.float32)
    data[2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(tmp_path / "nan.tif")


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setenv("M4OE_MAX_PIXELS", "10000")
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(tmp_path / "big.png")


def test_mask_size_mismatch_names_both_files(tmp_path):
    Image.fromarray(asymmetric()).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((41, 70), np.uint8)).save(tmp_path / "img_mask.png")
    sample = Sample("x", "xray", "A", tmp_path / "img.png", tmp_path / "img_mask.png")
    with pytest.raises(MaskError, match="img_mask.png.*img.png"):
        load_pair(sample)


def write_pairs(folder, count=4, size=(48, 64)):
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for index in range(count):
        image = np.random.default_rng(index).integers(0, 255, (*size, 3), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[10:30, 10 + index : 40] = 255
        Image.fromarray(image).save(folder / "images" / f"case{index}.png")
        Image.fromarray(mask).save(folder / "masks" / f"case{index}_mask.png")


def test_folders_pair_images_and_masks_by_name(tmp_path):
    write_pairs(tmp_path)
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", modality="fundus", site="X")
    assert [s.mask.name for s in samples] == [f"case{i}_mask.png" for i in range(4)]


def test_manifest_paths_are_relative_to_the_csv_and_columns_are_checked(tmp_path):
    write_pairs(tmp_path)
    rows = ["dataset,modality,site,image,mask,split_hint"] + [
        f"d,fundus,S{i % 2},images/case{i}.png,masks/case{i}_mask.png,train" for i in range(4)
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    samples = read_manifest(tmp_path / "manifest.csv")
    assert len(samples) == 4 and samples[0].image == tmp_path / "images" / "case0.png"
    (tmp_path / "bad.csv").write_text("dataset,image\nd,x.png\n")
    with pytest.raises(ManifestError, match="missing columns"):
        read_manifest(tmp_path / "bad.csv")


def test_bad_files_are_skipped_and_reported_not_fatal(tmp_path):
    write_pairs(tmp_path)
    (tmp_path / "images" / "case1.png").write_bytes(b"not a png")
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", modality="fundus")
    good, bad = scan_samples(samples)
    assert len(good) == 3 and len(bad) == 1 and "case1.png" in bad[0][1]


def test_dataset_is_deterministic_with_a_seed_and_returns_shaped_tensors(tmp_path):
    write_pairs(tmp_path)
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", modality="fundus")
    dataset = SegmentationDataset(samples, in_channels=1, size=(32, 32), augment=True)
    dataset.set_sample_seed(5)
    first = dataset[0]
    dataset.set_sample_seed(5)
    again = dataset[0]
    assert first["image"].shape == (1, 32, 32) and first["label"].shape == (1, 32, 32)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert first["label"].dtype == torch.long


def test_ct_window_maps_hounsfield_units_to_unit_range():
    image = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    out = apply_preset(image, default_preset("CT"))
    np.testing.assert_allclose(out[0, 0], [0, 0, 0.5, 1, 1])


def test_eight_bit_ct_is_not_rewindowed():
    out = apply_preset(np.array([[[0.0, 255.0]]]), default_preset("CT"), source_dtype="uint8")
    np.testing.assert_allclose(out[0, 0], [0, 1])


def test_constant_image_normalises_to_zeros_and_bad_presets_are_refused():
    assert not apply_preset(np.full((1, 4, 4), 7.0), default_preset("MRI")).any()
    with pytest.raises(ConfigError):
        validate_preset({"kind": "ct_window", "center": 40, "width": 0})
    with pytest.raises(ConfigError):
        validate_preset({"kind": "magic"})


# ------------------------------------------------------------------------------------------------ more formats
@pytest.mark.parametrize("name", ["a.bmp", "a.gif", "a.tif", "a.jpg"])
def test_other_picture_formats_read_as_pil_shows_them(tmp_path, name):
    Image.fromarray(asymmetric()).save(tmp_path / name)
    record = read_image(tmp_path / name)
    assert record.array.shape == (1, 40, 70)
    shown = np.asarray(Image.open(tmp_path / name).convert("L"))
    assert np.array_equal(record.array[0], shown)


def test_colour_image_orientation_matches_pil(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    record = read_image(tmp_path / "c.png")
    assert np.array_equal(np.moveaxis(record.array, 0, -1), np.asarray(Image.open(tmp_path / "c.png")))
    assert record.meta["dtype"] == "uint8" and record.meta["shape"] == [30, 50, 3]


def test_sixteen_bit_colour_tiff_is_read_with_tifffile(tmp_path):
    import tifffile

    data = np.random.default_rng(0).integers(0, 65535, (10, 14, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", data, photometric="rgb")
    record = read_image(tmp_path / "deep.tif")
    assert np.array_equal(record.array, np.moveaxis(data, -1, 0).astype(np.float32))


def test_two_channel_image_is_refused_naming_the_file(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "two.tif", np.zeros((10, 14, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match="two.tif.*2 channels"):
        read_image(tmp_path / "two.tif")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and header claiming ``width x height`` pixels, with no pixel data (a cheap 'bomb')."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_twenty_thousand_square_image_gets_a_typed_error_not_a_decompression_bomb(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_header_only(20001, 20000))
    with pytest.raises(DataError, match="huge.png.*over the limit.*M4OE_MAX_PIXELS"):
        read_image(tmp_path / "huge.png")


def test_constant_image_reads_and_normalises_to_zeros(tmp_path):
    Image.fromarray(np.full((8, 9), 77, np.uint8)).save(tmp_path / "flat.png")
    record = read_image(tmp_path / "flat.png")
    for modality in ("MRI", "xray", "ultrasound", "em"):
        assert not apply_preset(record.array, default_preset(modality)).any()


def test_nrrd_volume_reads_as_pynrrd_stores_it(tmp_path):
    import nrrd

    volume = np.arange(6 * 7 * 3, dtype=np.int16).reshape(6, 7, 3)
    nrrd.write(str(tmp_path / "v.nrrd"), volume)
    data, affine = read_volume(tmp_path / "v.nrrd")
    assert np.array_equal(data, volume) and affine.shape == (4, 4)
    assert np.array_equal(read_image(tmp_path / "v.nrrd", slice_index=1).array[0], volume[:, :, 1])


def test_three_d_volume_without_a_slice_index_is_refused(tmp_path):
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(ImageReadError, match="slice index"):
        read_image(tmp_path / "v.nii.gz")
    assert read_image(tmp_path / "v.nii.gz", slice_axis=0, slice_index=3).array.shape == (1, 5, 6)


def test_unsupported_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="notes.txt.*unsupported"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="absent.png"):
        read_image(tmp_path / "absent.png")


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("values,suffix_,expected", [
    (np.array([[0, 1], [1, 0]], np.uint8), ".png", [[0, 1], [1, 0]]),
    (np.array([[0, 255], [255, 0]], np.uint8), ".png", [[0, 1], [1, 0]]),
    (np.array([[0, 2], [3, 1]], np.uint8), ".png", [[0, 2], [3, 1]]),
])
def test_auto_encoding_reads_zero_one_zero_255_and_class_ids(tmp_path, values, suffix_, expected):
    Image.fromarray(values).save(tmp_path / f"m{suffix_}")
    assert np.array_equal(read_mask(tmp_path / f"m{suffix_}"), expected)


def test_auto_encoding_refuses_a_png_with_stray_values(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[:5], mask[5, 5] = 255, 37
    Image.fromarray(mask).save(tmp_path / "smoothed.png")
    with pytest.raises(MaskError, match="smoothed.png"):
        read_mask(tmp_path / "smoothed.png")


def test_colour_jpeg_mask_is_thresholded_on_grey_level(tmp_path):
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[8:40, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=60)
    decoded = read_mask(tmp_path / "m.jpg")
    assert (decoded == (mask[..., 0] > 0)).mean() > 0.98


def test_isbi_labels_are_inverted_so_membranes_are_foreground(tmp_path):
    label = np.full((8, 8), 255, np.uint8)
    label[:, 3] = 0  # a membrane
    Image.fromarray(label).save(tmp_path / "0.png")
    decoded = read_mask(tmp_path / "0.png", dataset="ISBI2012_EM")
    assert decoded[:, 3].all() and decoded.sum() == 8


def test_mask_checked_against_its_image_names_both_files_and_shapes(tmp_path):
    Image.fromarray(asymmetric()).save(tmp_path / "scan.png")
    Image.fromarray(np.zeros((70, 40), np.uint8)).save(tmp_path / "scan_mask.png")  # transposed by mistake
    with pytest.raises(MaskError, match=r"scan_mask.png.*70x40.*scan.png.*40x70"):
        read_mask(tmp_path / "scan_mask.png", image_record=read_image(tmp_path / "scan.png"))


def test_cxr_lung_crops_are_pasted_at_their_offsets(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((50, 80), np.uint8)).save(tmp_path / "images" / "p.png")
    left = np.zeros((20, 10, 4), np.uint8)
    left[..., 3], left[2:18, 2:8, 0] = 255, 255  # (255, 0, 0) = lung
    right = np.zeros((20, 10, 4), np.uint8)
    right[..., 3], right[2:18, 2:8, :3] = 255, (187, 73, 73)
    Image.fromarray(left).save(tmp_path / "masks" / "l.png")
    Image.fromarray(right).save(tmp_path / "masks" / "r.png")
    (tmp_path / "lung_masks_index.csv").write_text(
        "image,left_lung_mask,left_left,left_top,right_lung_mask,right_left,right_top\n"
        "images/p.png,masks/l.png,60,5,masks/r.png,10,5\n"
    )
    sample = Sample("CXR_COVID_GeneralBlockchain", "xray", "A", tmp_path / "images" / "p.png", tmp_path / "masks" / "l.png")
    _, mask, _ = load_pair(sample)
    assert mask.shape == (50, 80) and mask.sum() == 2 * 16 * 6
    assert mask[7:23, 62:68].all() and mask[7:23, 12:18].all()


def test_ct_dicom_slice_picks_its_nrrd_label_slice_by_z_position(tmp_path):
    import nrrd

    labels = np.zeros((24, 16, 3), np.int16)  # pynrrd order x, y, z: label[:, :, k].T is [rows, columns]
    for k in range(3):
        labels[k + 1, 2, k] = k + 1
    header = {"space": "left-posterior-superior", "space origin": [0.0, 0.0, -10.0],
              "space directions": np.diag([0.8, 0.8, 1.0])}
    nrrd.write(str(tmp_path / "seg.nrrd"), labels, header)
    write_dicom(tmp_path / "s.dcm", np.zeros((16, 24), np.uint16), z=-9.0)  # z = -9 → k = 1
    _, mask, _ = load_pair(Sample("CT_dcmqi_3slice", "CT", "A", tmp_path / "s.dcm", tmp_path / "seg.nrrd"))
    assert mask.shape == (16, 24) and mask[2, 2] == 2 and mask.sum() == 2


# ------------------------------------------------------------------------------------------------ writing
def test_png_mask_is_written_atomically_with_the_image_size(tmp_path):
    Image.fromarray(asymmetric()).save(tmp_path / "img.png")
    record = read_image(tmp_path / "img.png")
    mask = (record.array[0] > 0).astype(np.uint8)
    write_mask(mask, tmp_path / "out" / "img_mask.png", like=record)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "img_mask.png")), mask)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["img_mask.png"]  # no temporary left behind
    with pytest.raises(MaskError, match="img.png"):
        write_mask(mask[:10], tmp_path / "out" / "bad.png", like=record)


def test_nifti_mask_takes_the_affine_of_its_image(tmp_path):
    import nibabel

    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 7, 2), np.float32), affine), tmp_path / "v.nii.gz")
    record = read_image(tmp_path / "v.nii.gz", slice_index=0)
    write_mask(np.ones((6, 7), np.uint8), tmp_path / "m.nii.gz", like=record)
    np.testing.assert_allclose(nibabel.load(tmp_path / "m.nii.gz").affine, affine)


# ------------------------------------------------------------------------------------------------ samples
def test_volumes_in_a_manifest_expand_to_slices_with_foreground(tmp_path):
    import nibabel

    labels = np.zeros((8, 9, 6), np.uint8)
    labels[2:4, 2:4, [1, 4]] = 1
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((8, 9, 6)).astype(np.float32), np.eye(4)),
                 tmp_path / "img.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), tmp_path / "seg.nii.gz")
    (tmp_path / "m.csv").write_text("dataset,modality,site,image,mask\nd,MRI,S,img.nii.gz,seg.nii.gz\n")
    samples = read_manifest(tmp_path / "m.csv", nonempty_slices=True)
    assert [s.slice_index for s in samples] == [1, 4]
    assert len(read_manifest(tmp_path / "m.csv")) == 6  # every slice by default, as on the command line
    _, mask, _ = load_pair(samples[1])
    assert mask.sum() == 4


def test_manifest_naming_a_missing_file_reports_the_line(tmp_path):
    (tmp_path / "m.csv").write_text("dataset,modality,site,image,mask\nd,CT,S,gone.png,\n")
    with pytest.raises(ManifestError, match=r"m.csv, line 2.*gone.png"):
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("image_name,mask_name", [
    ("21_training.tif", "21_manual1.gif"), ("Image_01L.jpg", "Image_01L_1stHO.png"),
    ("IMD003.bmp", "IMD003_lesion.bmp"), ("000_HC.png", "000_HC_Annotation.png"), ("case.png", "case_MASK.png"),
])
def test_folders_pair_names_with_common_mask_endings(tmp_path, image_name, mask_name):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(asymmetric()).save(tmp_path / "i" / image_name)
    Image.fromarray(np.zeros((40, 70), np.uint8)).save(tmp_path / "m" / mask_name)
    [sample] = samples_from_folders(tmp_path / "i", tmp_path / "m", "fundus", "X")
    assert sample.mask.name == mask_name and sample.site == "X"


def test_image_without_a_mask_in_the_mask_folder_is_reported(tmp_path):
    write_pairs(tmp_path)
    (tmp_path / "masks" / "case2_mask.png").unlink()
    with pytest.raises(ManifestError, match="case2.png"):
        samples_from_folders(tmp_path / "images", tmp_path / "masks", "fundus")


def test_select_filters_by_modality_alias_site_and_split(tmp_path):
    samples = [Sample("d", "X-Ray", "A", tmp_path / "1.png", None, "train"),
               Sample("d", "CXR", "B", tmp_path / "2.png", None, "test"),
               Sample("d", "CT", "A", tmp_path / "3.png", None, "train")]
    assert len(select(samples, modality="xray")) == 2
    assert [s.site for s in select(samples, modality="xray", sites=["B"])] == ["B"]
    assert len(select(samples, split="train")) == 2


# ------------------------------------------------------------------------------------------------ datasets
def test_resized_labels_keep_their_class_ids_and_grey_becomes_rgb(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(asymmetric(45, 61)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((45, 61), np.uint8)
    mask[5:20, 5:30], mask[25:40, 30:60] = 1, 2
    Image.fromarray(mask).save(tmp_path / "masks" / "a_mask.png")
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", "ultrasound")
    item = SegmentationDataset(samples, in_channels=3, size=(32, 48), mode="resize")[0]
    assert item["image"].shape == (3, 32, 48) and item["label"].shape == (1, 32, 48)
    assert set(item["label"].unique().tolist()) == {0, 1, 2}
    assert torch.equal(item["image"][0], item["image"][2]) and item["modality"] == "ultrasound"


def test_different_seeds_give_different_augmentations(tmp_path):
    write_pairs(tmp_path, count=1, size=(64, 64))
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", "fundus")
    dataset = SegmentationDataset(samples, size=(32, 32), augment=True)
    items = []
    for seed in range(4):
        dataset.set_sample_seed(seed)
        items.append(dataset[0]["image"])
    assert any(not torch.equal(items[0], other) for other in items[1:])


def test_site_augmentation_shifts_colour_per_channel_and_scale_reproducibly(tmp_path):
    """augment="site": seeded like the basic one (same seed, same item), labels stay class ids on the image's
    grid, and across seeds the channels move apart (a colour cast) and the labelled area changes (zoom), which
    the basic augmentation (flips, rotations, one gain for all channels) never does."""
    write_pairs(tmp_path, count=1, size=(64, 64))
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", "fundus")
    site = SegmentationDataset(samples, size=(48, 48), augment="site")
    basic = SegmentationDataset(samples, size=(48, 48), augment="basic")

    def draws(dataset):
        out = []
        for seed in range(12):
            dataset.set_sample_seed(seed)
            out.append(dataset[0])
        return out

    first, again = draws(site), draws(site)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) for a, b in zip(first, again))
    assert all(set(item["label"].unique().tolist()) <= {0, 1} for item in first)

    def spread(items):
        ratios = [float(item["image"][0].std() / item["image"][1].std().clamp_min(1e-6)) for item in items]
        areas = [int(item["label"].sum()) for item in items]
        return max(ratios) - min(ratios), len(set(areas))

    site_ratio, site_areas = spread(first)
    basic_ratio, basic_areas = spread(draws(basic))
    assert site_ratio > basic_ratio + 0.05 and site_areas > basic_areas
    with pytest.raises(ConfigError):
        SegmentationDataset(samples, augment="strong")


def test_dataset_refuses_bad_settings(tmp_path):
    write_pairs(tmp_path, count=1)
    samples = samples_from_folders(tmp_path / "images", tmp_path / "masks", "fundus")
    with pytest.raises(ConfigError):
        SegmentationDataset(samples, mode="stretch")
    with pytest.raises(DataError):
        SegmentationDataset([])


# ------------------------------------------------------------------------------------------------ presets
def test_modality_names_are_case_insensitive_with_aliases():
    assert canonical_modality("X-Ray") == canonical_modality("cxr") == "xray"
    assert canonical_modality("EM") == "electron_microscopy"
    assert default_preset("ct") == default_preset("CT")
    assert default_preset("Fundus")["kind"] == "rgb_meanstd"


def test_presets_survive_a_json_round_trip():
    import json

    for modality in ("CT", "MRI", "xray", "ultrasound", "em", "fundus", "dermoscopy", "endoscopy", "unknown"):
        preset = default_preset(modality)
        assert validate_preset(json.loads(json.dumps(preset))) == validate_preset(preset)


def test_percentile_preset_ignores_a_few_saturated_pixels():
    image = np.tile(np.linspace(0, 100, 100, dtype=np.float32), (1, 100, 1))
    image[0, 0, :5] = 10_000  # burnt-in text
    out = apply_preset(image, default_preset("xray"))
    assert out.max() == 1.0 and np.median(out) > 0.4


def test_sixteen_bit_colour_is_scaled_by_its_own_range():
    image = np.full((3, 4, 4), 65535.0, np.float32)
    eight = np.full((3, 4, 4), 255.0, np.float32)
    preset = default_preset("dermoscopy")
    np.testing.assert_allclose(apply_preset(image, preset, source_dtype="uint16"),
                               apply_preset(eight, preset, source_dtype="uint8"), rtol=1e-5)


@pytest.mark.parametrize("preset", [
    {"kind": "ct_window", "center": "40", "width": 400}, {"kind": "ct_window", "center": 40, "width": -5},
    {"kind": "percentile", "low": 90, "high": 10}, {"kind": "rgb_meanstd", "mean": [0.5], "std": [0.0]},
    {"kind": "rgb_meanstd", "mean": [0.5, 0.5], "std": [0.2]}, {"kind": "ct_window", "center": True, "width": 1},
    {"kind": "clahe", "tiles": 0}, {"kind": "clahe", "tiles": 2.5}, {"kind": "clahe", "clip": 0},
    {"kind": "clahe", "clip": 1.5}, "ct", None,
])
def test_bad_presets_raise_preset_errors(preset):
    with pytest.raises(PresetError):
        validate_preset(preset)


def test_unit_range_presets_always_give_finite_values_in_zero_one():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    images = arrays(np.float32, st.tuples(st.sampled_from([1, 3]), st.integers(1, 6), st.integers(1, 6)),
                    elements=st.floats(-5000, 70000, width=32))

    @settings(max_examples=60, deadline=None)
    @given(images, st.sampled_from(["CT", "MRI", "xray", "em"]), st.sampled_from([None, "uint8", "int16", "float32"]))
    def check(image, modality, source_dtype):
        out = apply_preset(image, default_preset(modality), source_dtype=source_dtype)
        assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()
        if not (modality == "CT" and source_dtype == "uint8"):  # 8-bit CT is only divided by 255
            assert out.min() >= 0 and out.max() <= 1

    check()


def test_clahe_with_one_tile_and_no_clip_is_global_histogram_equalisation():
    from m4oe_adapters.presets import clahe

    generator = np.random.default_rng(0)
    image = generator.beta(2, 5, size=(37, 53)).astype(np.float32)  # skewed: equalisation moves it
    levels = np.minimum((image * 256).astype(int), 255)
    cdf = np.cumsum(np.bincount(levels.ravel(), minlength=256)) / levels.size
    np.testing.assert_allclose(clahe(image, tiles=1, clip=1.0), cdf[levels], atol=1e-6)


def test_clahe_halves_the_brightness_gap_of_uneven_illumination_that_the_imagenet_preset_keeps():
    generator = np.random.default_rng(1)
    texture = 0.5 + 0.1 * generator.standard_normal((192, 256))
    light = np.linspace(0.25, 1.0, texture.shape[1])[None, :]  # one side lit four times less
    image = (np.clip(texture * light, 0, 1) * 255).astype(np.float32)[None].repeat(3, 0)
    gaps = {}
    for name, preset in (("clahe", {"kind": "clahe"}), ("imagenet", default_preset("fundus"))):
        out = apply_preset(image, preset, source_dtype="uint8")[0]
        gaps[name] = abs(out[:, :64].mean() - out[:, -64:].mean()) / out.std()  # in the image's own spread
    assert gaps["imagenet"] > 2.0 and gaps["clahe"] < 0.55 * gaps["imagenet"], gaps


def test_clahe_does_not_depend_on_the_pixel_size_of_the_image():
    """Tiles are a share of the image: the same picture at twice the pixel count is equalised alike."""
    from m4oe_adapters.presets import clahe

    generator = np.random.default_rng(2)
    small = np.kron(generator.random((12, 16)), np.ones((8, 8))) * np.linspace(0.3, 1.0, 128)[None, :]
    large = np.kron(small, np.ones((2, 2)))  # every pixel four times
    difference = np.abs(clahe(large)[::2, ::2] - clahe(small))
    assert difference.mean() < 0.01 and np.quantile(difference, 0.99) < 0.05, difference.mean()


def test_clahe_preset_gives_finite_values_of_the_same_shape_for_any_image():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    images = arrays(np.float32, st.tuples(st.sampled_from([1, 3]), st.integers(1, 40), st.integers(1, 40)),
                    elements=st.floats(0, 255, width=32))

    @settings(max_examples=60, deadline=None)
    @given(images, st.integers(1, 9), st.sampled_from([0.001, 0.01, 1.0]))
    def check(image, tiles, clip):
        preset = validate_preset({"kind": "clahe", "tiles": tiles, "clip": clip})
        out = apply_preset(image, preset, source_dtype="uint8")
        assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()
        assert out.min() >= -0.5 / 0.29 - 1e-5 and out.max() <= 0.5 / 0.29 + 1e-5

    check()


# ------------------------------------------------------------------------------------------------ groups
def test_clinicdb_frames_belong_to_the_sequences_of_its_readme_and_the_subset_is_sequence_1():
    from m4oe_adapters.data import sample_group
    from m4oe_adapters.data.manifest import Sample

    def group(dataset, name):
        return sample_group(Sample(dataset, "endoscopy", dataset, Path(f"/x/{name}"), None))

    assert group("CVC-ClinicDB", "1.jpg") == group("CVC-ClinicDB", "25.jpg") == "CVC-ClinicDB sequence 1"
    assert group("CVC-ClinicDB", "26.jpg") == "CVC-ClinicDB sequence 2"
    assert group("CVC-ClinicDB", "591.jpg") == "CVC-ClinicDB sequence 28"
    assert group("CVC-ClinicDB", "612.jpg") == "CVC-ClinicDB sequence 29"
    assert group("CVC-ClinicDB_subset", "fine_3_7_fram.jpg") == "CVC-ClinicDB sequence 1"
    assert group("Kvasir-SEG", "a.jpg") == "/x/a.jpg"  # independent images: each its own group


def test_a_site_without_split_hints_trained_beside_a_hinted_one_gets_test_images_with_both_eyes_on_one_side():
    """DRIVE (its manifest's train/test hints) + CHASE_DB1 (no hints) as training sites: DRIVE splits by its hints,
    CHASE_DB1 holds out about 30 % of its children, each child's two eyes together. Before, every CHASE_DB1 image
    went to development and it had no in-domain test image. Hints that split nothing whole (ClinicDB's) still
    fall back to one random split of the whole pool, as before."""
    from m4oe_adapters.data import sample_group
    from m4oe_adapters.data.manifest import Sample
    from m4oe_adapters.protocol import split_in_domain

    drive = [Sample("DRIVE", "fundus", "DRIVE", Path(f"/d/{n}.tif"), None, split_hint="test" if n < 20 else "train")
             for n in range(40)]
    chase = [Sample("CHASE_DB1", "fundus", "CHASE_DB1", Path(f"/c/Image_{child:02d}{eye}.jpg"), None)
             for child in range(1, 15) for eye in "LR"]
    assert sample_group(chase[0]) == sample_group(chase[1]) == "CHASE_DB1 child 01"
    development, test = split_in_domain(drive + chase, 0)
    assert {s.image.stem for s in test if s.site == "DRIVE"} == {str(n) for n in range(20)}
    held = [s for s in test if s.site == "CHASE_DB1"]
    assert len(held) == 8 and not {sample_group(s) for s in held} & {sample_group(s) for s in development}
    assert split_in_domain(drive, 0) == (drive[20:], drive[:20])  # one hinted site: its hints, as before
    clinic = [Sample("CVC-ClinicDB", "endoscopy", "CVC-ClinicDB", Path(f"/x/{n}.jpg"), None,
                     split_hint="test" if n in (133, 419, 480) else "train") for n in range(1, 613)]
    kvasir = [Sample("Kvasir-SEG", "endoscopy", "Kvasir-SEG", Path(f"/k/{n}.jpg"), None,
                     split_hint="test" if n < 2 else "") for n in range(100)]
    development, test = split_in_domain(clinic + kvasir, 0)
    assert sum(s.site == "Kvasir-SEG" for s in test) > 10  # not only Kvasir's two hinted images


def test_splits_never_put_frames_of_one_video_on_both_sides():
    """The in-domain test split and the validation split keep each ClinicDB sequence whole; the manifest's three
    'test' frames (133, 419, 480, each inside a training sequence) are not used as a test set."""
    from m4oe_adapters.adapt import split_samples
    from m4oe_adapters.data import sample_group
    from m4oe_adapters.data.manifest import Sample
    from m4oe_adapters.protocol import split_in_domain

    pool = [Sample("CVC-ClinicDB", "endoscopy", "CVC-ClinicDB", Path(f"/x/{n}.jpg"), None,
                   split_hint="test" if n in (133, 419, 480) else "train") for n in range(1, 613)]
    for seed in range(3):
        development, test = split_in_domain(pool, seed)
        assert len(test) > 100 and not {sample_group(s) for s in development} & {sample_group(s) for s in test}
        train, val = split_samples(development, None, 4, seed)
        assert len(val) >= 4 and not {sample_group(s) for s in train} & {sample_group(s) for s in val}
    plain = [Sample("d", "x", "d", Path(f"/y/{n}.png"), None) for n in range(10)]
    train, val = split_samples(plain, None, 4, 0)
    assert len(val) == 4 and len(train) == 6  # independent images: exactly the validation count asked
