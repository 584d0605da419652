"""Volumes as users have them: the slicing axis (header spacing, or --slice-axis), every slice by default, slice
indices in the rows, and 3D Dice/HD95 in mm per volume beside the per-slice numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from m4oe_adapters.data import read_manifest
from m4oe_adapters.evaluation import evaluate_samples

SPACING = (1.0, 1.0, 4.0)  # mm: axis 2 is the through-plane axis although axis 0 is the shortest


@pytest.fixture
def volume_manifest(tmp_path):
    """A 20 x 48 x 30 volume whose label is a box on slices 10..13 of axis 2; the image marks the same box
    shifted by one slice (11..14), so a thresholding predictor has a known 3D Dice of 2*3/(4+4) = 0.75."""
    import nibabel

    label = np.zeros((20, 48, 30), np.uint8)
    label[5:15, 10:30, 10:14] = 1
    image = np.zeros(label.shape, np.int16)
    image[5:15, 10:30, 11:15] = 100
    affine = np.diag([*SPACING, 1.0])
    nibabel.save(nibabel.Nifti1Image(image, affine), tmp_path / "vol.nii.gz")
    nibabel.save(nibabel.Nifti1Image(label, affine), tmp_path / "vol_label.nii.gz")
    (tmp_path / "manifest.csv").write_text("dataset,modality,site,image,mask,split_hint\n"
                                           "synthetic,MRI,A,vol.nii.gz,vol_label.nii.gz,\n")
    return tmp_path / "manifest.csv"


def threshold(images: torch.Tensor) -> torch.Tensor:
    """Logits [B, 2, H, W]: foreground where the (min-max normalised) image is bright."""
    foreground = (images[:, :1] > 0.5).float() * 20 - 10
    return torch.cat([-foreground, foreground], dim=1)


def evaluate(samples):
    return evaluate_samples(threshold, samples, preset={"kind": "minmax"}, in_chans=1, num_classes=2,
                            label_names=["background", "box"], input_size=(32, 32), volumes=True)[0]


def test_volumes_are_cut_along_the_coarsest_spacing_axis_into_every_slice(volume_manifest):
    samples = read_manifest(volume_manifest, nonempty_slices=False)
    assert {s.slice_axis for s in samples} == {2} and sorted(s.slice_index for s in samples) == list(range(30))
    foreground = read_manifest(volume_manifest, nonempty_slices=True)
    assert sorted(s.slice_index for s in foreground) == [10, 11, 12, 13]
    across = read_manifest(volume_manifest, nonempty_slices=False, slice_axis=1)
    assert {s.slice_axis for s in across} == {1} and len(across) == 48


def test_3d_dice_and_hd95_in_mm_per_volume_beside_per_slice_rows_with_slice_index(volume_manifest):
    rows = evaluate(read_manifest(volume_manifest, nonempty_slices=False))
    volume = [r for r in rows if r["level"] == "volume" and r["label"] == "box"]
    assert len(volume) == 1
    assert volume[0]["dice"] == pytest.approx(0.75)
    # every predicted surface point is at most one slice (4 mm) from the true surface, and the faces a slice
    # apart (over 5% of the surface) are exactly that far: HD95 = 4 mm, not 1 (voxels)
    assert volume[0]["hd95_unit"] == "mm" and volume[0]["hd95"] == pytest.approx(4.0)
    assert volume[0]["slices"] == volume[0]["volume_slices"] == 30
    slices = [r for r in rows if r["level"] == "slice" and r["label"] == "box"]
    assert sorted(r["slice_index"] for r in slices) == list(range(30)) and {r["slice_axis"] for r in slices} == {2}
    # per-slice Dice: 1 on both-empty slices, 0 on the two slices only one mask covers, 1 on the 3 shared ones
    by_index = {r["slice_index"]: r["dice"] for r in slices}
    assert by_index[10] == 0 and by_index[14] == 0 and by_index[12] == pytest.approx(1.0)


def test_eval_cli_slices_along_the_axis_it_is_given_and_says_so(volume_manifest, tmp_path, capsys):
    from m4oe_adapters.cli import main

    from test_cli import TINY

    adapter = tmp_path / "mri.safetensors"
    assert main(["train", *TINY, "--data", str(volume_manifest), "--modality", "MRI", "--steps", "1", "--batch", "2",
                 "--size", "32", "--val", "0", "--no-progress", "--slice-axis", "1", "-o", str(adapter)]) == 0
    assert "1 volume(s) cut along axis 1 into 48 slices (every slice" in capsys.readouterr().out
    out = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(volume_manifest), "--modality", "MRI", "--adapter", str(adapter),
                 "--out", str(out), "--no-progress", "--foreground-slices"]) == 0
    text = capsys.readouterr().out
    assert "cut along axis 2 into 4 slices (only slices with foreground" in text
    assert "Per volume" in (out / "report.md").read_text()
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"slice_index", "slice_axis", "level", "hd95_unit"} <= set(header)


def test_predict_segments_a_whole_hdf5_volume_into_nifti_with_a_slice_sheet_overlay(volume_manifest, tmp_path):
    import h5py
    import nibabel
    from PIL import Image

    from m4oe_adapters.cli import main

    from test_cli import TINY

    assert main(["train", *TINY, "--data", str(volume_manifest), "--modality", "MRI", "--steps", "1", "--batch", "2",
                 "--size", "32", "--val", "0", "--no-progress", "-o", str(tmp_path / "mri.safetensors")]) == 0
    volume = np.random.default_rng(0).integers(0, 200, (64, 72, 5)).astype(np.float32)  # 5 slices on axis 2
    with h5py.File(tmp_path / "la.h5", "w") as handle:
        handle["image"] = volume
    assert main(["predict", str(tmp_path / "la.h5"), "--adapter", str(tmp_path / "mri.safetensors"), *TINY,
                 "--out", str(tmp_path / "out"), "--overlay", "--no-progress"]) == 0
    result = nibabel.load(tmp_path / "out" / "la_mask.nii.gz")
    assert result.shape == volume.shape
    sheet = Image.open(tmp_path / "out" / "la_mask_overlay.png")
    assert sheet.size[0] >= 4 * 64  # four 64 x 72 slices of axis 2 side by side


def test_binary_png_masks_are_0_and_255_and_multiclass_masks_keep_class_ids(tmp_path):
    from PIL import Image

    from m4oe_adapters.data import write_mask

    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    write_mask(mask, tmp_path / "binary.png", num_classes=2)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "binary.png")))) == {0, 255}
    mask[6:, 6:] = 2
    write_mask(mask, tmp_path / "three.png", num_classes=3)
    picture = Image.open(tmp_path / "three.png")
    assert picture.mode == "P" and set(np.unique(np.asarray(picture))) == {0, 1, 2}
    assert picture.getpalette()[3:6] != [0, 0, 0]  # class 1 has a visible colour


def test_predict_gives_a_nifti_volume_s_in_plane_spacing_to_scale_harmonisation(tmp_path, monkeypatch):
    """An adapter that recorded its pixel spacing gets each slice of a NIfTI volume resampled from the volume's
    in-plane spacing (the header's, without the slice axis), as 2D images and DICOM slices already were."""
    import nibabel

    import m4oe_adapters.prediction as prediction
    from conftest import tiny_model

    model = tiny_model(modalities=("MRI",))
    model.modalities["MRI"].provenance["scale"] = {"kind": "pixel_spacing_mm", "value": 0.5, "images": 1}
    nibabel.save(nibabel.Nifti1Image(np.zeros((40, 48, 3), np.float32), np.diag([*SPACING, 1.0])),
                 tmp_path / "v.nii.gz")
    seen = []
    original = prediction.predict_mask_at_scale

    def spy(*args, **kwargs):
        seen.append((kwargs.get("meta") or {}).get("spacing"))
        return original(*args, **kwargs)

    monkeypatch.setattr(prediction, "predict_mask_at_scale", spy)
    results = prediction.predict_files(model, [tmp_path / "v.nii.gz"], tmp_path / "out", modality="MRI")
    assert results[0].error is None and len(seen) == 3  # axis 2 (4 mm) is the slice axis: 3 slices
    assert all(spacing == [1.0, 1.0] for spacing in seen)
