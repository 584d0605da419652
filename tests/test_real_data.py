"""Every dataset of the shared real data reads correctly: image and mask agree, classes and foreground are sane.

The data folder is ``$M4OE_DATA``, else ``../shared/data``, else the repository's sibling ``shared/data``; the whole
file is skipped, with that reason, when it has no ``manifest.csv``. Three samples per dataset (first, middle, last
third) are read, so the file stays well under a minute.
"""
from __future__ import annotations

import collections
import csv

import numpy as np
import pytest

from m4oe_adapters.data import data_root, load_pair, read_manifest, read_mask

DATA = data_root()
MANIFEST = DATA / "manifest.csv"
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not MANIFEST.is_file(), reason=f"real data not found: no manifest.csv in {DATA} "
                                                       f"(set M4OE_DATA to the shared data folder)"),
]


def manifest_datasets() -> list[str]:
    """Dataset names in the manifest, read with csv alone so collection stays cheap."""
    if not MANIFEST.is_file():
        return []
    with open(MANIFEST, newline="") as stream:
        return sorted({row["dataset"] for row in csv.DictReader(stream)})


EXPECTED_CLASSES = {"CT_dcmqi_3slice": {0, 1, 2}, "ACDC_cardiac_MRI_SSL4MIS_h5": {0, 1, 2, 3}}
# Foreground fraction bounds; most datasets lie between 0 and 0.9, small structures get a tighter upper bound.
FOREGROUND = collections.defaultdict(lambda: (0.0, 0.9), {
    "DRIVE": (0.03, 0.2), "CHASE_DB1": (0.03, 0.2), "ISBI2012_EM": (0.1, 0.4),  # vessels, membranes (inverted)
    "SCT_spinalcord_MRI": (0.0, 0.1), "ACDC_cardiac_MRI_SSL4MIS_h5": (0.0, 0.3),
})


@pytest.fixture(scope="module")
def by_dataset() -> dict[str, list]:
    groups = collections.defaultdict(list)
    for sample in read_manifest(MANIFEST, nonempty_slices=True):  # the checks below expect labelled slices
        groups[sample.dataset].append(sample)
    return groups


def test_manifest_covers_twelve_or_more_datasets_and_eight_modalities(by_dataset):
    modalities = {s.modality.lower() for samples in by_dataset.values() for s in samples}
    assert len(by_dataset) >= 12 and len(modalities) >= 8


@pytest.mark.parametrize("dataset", manifest_datasets())
def test_each_dataset_reads_with_matching_image_and_mask(by_dataset, dataset):
    samples = by_dataset[dataset]
    assert samples, f"{dataset}: no readable samples"
    picks = [samples[0], samples[len(samples) // 2], samples[-1]]
    low, high = FOREGROUND[dataset]
    classes = set()
    for sample in picks:
        image, mask, meta = load_pair(sample)
        assert image.dtype == np.float32 and mask.dtype == np.int64
        assert image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-2:] == mask.shape
        assert np.isfinite(image).all() and image.max() > image.min(), f"{sample.image}: blank image"
        classes |= set(np.unique(mask).tolist())
        fraction = float((mask > 0).mean())
        assert low < fraction < high, f"{sample.mask}: foreground fraction {fraction:.3f} outside ({low}, {high})"
    assert classes <= EXPECTED_CLASSES.get(dataset, {0, 1}) and len(classes) >= 2, (dataset, classes)


def test_cxr_masks_hold_both_lungs(by_dataset):
    from scipy import ndimage

    for sample in by_dataset["CXR_COVID_GeneralBlockchain"][:3]:
        _, mask, _ = load_pair(sample)
        _, components = ndimage.label(mask)
        half = mask.shape[1] // 2
        assert components >= 2, sample.image
        # One lung on each side of the image (the manifest's mask column names the left lung only).
        assert mask[:, :half].mean() > 0.05 and mask[:, half:].mean() > 0.05, sample.image


def test_ct_dicom_slices_match_their_labels_in_hounsfield_units(by_dataset):
    for sample in by_dataset["CT_dcmqi_3slice"]:
        image, mask, meta = load_pair(sample)
        liver = image[0][mask == 1].mean()
        spine = image[0][mask == 2].mean()
        assert meta["dicom_modality"] == "CT"
        assert 20 < liver < 80 and spine > 200, (sample.image, liver, spine)


def test_covid_ct_jpegs_are_eight_bit_so_not_rewindowed(by_dataset):
    from m4oe_adapters.data import normalise
    from m4oe_adapters.presets import default_preset

    image, _, meta = load_pair(by_dataset["COVID19_CT_MedSeg_InfNet"][0])
    assert meta["dtype"] == "uint8"
    normalised = normalise(image, meta, default_preset("CT"), 1)
    np.testing.assert_allclose(normalised, image / 255.0, rtol=1e-6)


def test_isbi_membranes_are_the_minority_foreground(by_dataset):
    _, mask, _ = load_pair(by_dataset["ISBI2012_EM"][0])
    assert 0.1 < mask.mean() < 0.4  # SOURCE.md: 255 = non-membrane (~78%), so membranes are ~22%


def test_png_orientation_of_real_masks_matches_pil(by_dataset):
    from PIL import Image

    sample = by_dataset["BUSI"][0]
    assert np.array_equal(read_mask(sample.mask, encoding="binary255"), np.asarray(Image.open(sample.mask)) == 255)
