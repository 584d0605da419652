"""Every dataset of the shared real data reads correctly: image and mask agree, classes and foreground are sane.

Skipped, with the reason, when the data folder ($M4OE_DATA or ../shared/data) is absent.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ.get("M4OE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason=f"real data not found at {DATA}"),
]

EXPECTED_CLASSES = {"CT_dcmqi_3slice": {0, 1, 2}, "ACDC_cardiac_MRI_SSL4MIS_h5": {0, 1, 2, 3}}


@pytest.fixture(scope="module")
def by_dataset():
    from m4oe_adapters.data import read_manifest

    groups = collections.defaultdict(list)
    for sample in read_manifest(DATA / "manifest.csv"):
        groups[sample.dataset].append(sample)
    return groups


def test_manifest_covers_twelve_or_more_datasets_and_eight_modalities(by_dataset):
    modalities = {s.modality for samples in by_dataset.values() for s in samples}
    assert len(by_dataset) >= 12 and len(modalities) >= 8


@pytest.mark.parametrize("dataset", [
    "DRIVE", "CHASE_DB1", "ISBI2012_EM", "PH2", "Kvasir-SEG_subset", "CVC-ClinicDB_subset", "CXR_lung_imlab_demo",
    "HC18_fetal_head_US", "BUSI", "SCT_spinalcord_MRI", "CT_dcmqi_3slice", "COVID19_CT_MedSeg_InfNet",
    "ACDC_cardiac_MRI_SSL4MIS_h5", "CXR_COVID_GeneralBlockchain",
])
def test_each_dataset_reads_with_matching_image_and_mask(by_dataset, dataset):
    from m4oe_adapters.data import load_pair

    samples = by_dataset[dataset]
    picks = samples[:: max(1, len(samples) // 3)][:3]
    classes = set()
    for sample in picks:
        image, mask, _ = load_pair(sample)
        assert image.shape[-2:] == mask.shape
        assert image.shape[0] in (1, 3)
        classes |= set(np.unique(mask).tolist())
        assert 0 < (mask > 0).mean() < 0.9, f"{sample.mask}: implausible foreground fraction"
    assert classes <= EXPECTED_CLASSES.get(dataset, {0, 1})


def test_cxr_masks_hold_both_lungs(by_dataset):
    from m4oe_adapters.data import load_pair
    from scipy import ndimage

    _, mask, _ = load_pair(by_dataset["CXR_COVID_GeneralBlockchain"][0])
    _, components = ndimage.label(mask)
    assert components >= 2


def test_ct_dicom_slices_match_their_labels_in_hounsfield_units(by_dataset):
    from m4oe_adapters.data import load_pair

    for sample in by_dataset["CT_dcmqi_3slice"]:
        image, mask, _ = load_pair(sample)
        liver = image[0][mask == 1].mean()
        spine = image[0][mask == 2].mean()
        assert 20 < liver < 80 and spine > 200, (sample.image, liver, spine)


def test_png_orientation_of_real_masks_matches_pil(by_dataset):
    from PIL import Image

    from m4oe_adapters.data import read_mask

    sample = by_dataset["BUSI"][0]
    assert np.array_equal(read_mask(sample.mask, encoding="binary255"), np.asarray(Image.open(sample.mask)) == 255)
