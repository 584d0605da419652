"""Data in: every format and mask encoding reads in the orientation PIL shows; bad files get typed errors."""
from __future__ import annotations

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
    samples_from_folders,
    scan_samples,
    write_mask,
)
from m4oe_adapters.presets import apply_preset, default_preset, validate_preset
from m4oe_adapters.errors import ConfigError


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


def test_dicom_is_converted_to_hounsfield_units(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "s.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.zeros((16, 24), np.uint16)
    pixels[2:5, 3:20] = 1064  # 1064 - 1024 = 40 HU
    ds.Modality, ds.Rows, ds.Columns = "CT", 16, 24
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing, ds.ImagePositionPatient = [0.8, 0.8], [0, 0, 5]
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "s.dcm", enforce_file_format=True)
    record = read_image(tmp_path / "s.dcm")
    assert record.array.shape == (1, 16, 24)
    assert record.array[0, 3, 10] == 40 and record.array[0, 0, 0] == -1024
    assert record.meta["dicom_modality"] == "CT"


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
