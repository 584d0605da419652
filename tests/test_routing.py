"""Image-level routing: every image finds its adapter, unknown images are refused, nobody names the modality.

Real-image tests use the zoo adapters (their signatures were fitted on the zoo's development images only) and
held-out images of the shared data; the images a signature was fitted on are excluded by their content hashes.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from m4oe_adapters import load_adapter, model_from_adapter, save_adapter
from m4oe_adapters.adapter_file import read_adapter, sign_adapter
from m4oe_adapters.errors import AdapterError, ConfigError, UnknownImageError
from m4oe_adapters.signatures import CALIBRATION_POINTS, ImageSignature, image_hash, routing_thumbnails

ZOO = Path(__file__).resolve().parents[1] / "adapters_zoo"
# Manifest datasets → the zoo adapter their images belong to (unseen sites of the same modality included).
EXPECTED = {
    "DRIVE": "fundus", "CHASE_DB1": "fundus", "Kvasir-SEG": "endoscopy", "CVC-ClinicDB": "endoscopy",
    "PH2": "dermoscopy", "BUSI": "ultrasound-breast", "HC18_fetal_head_US": "ultrasound-fetal-head",
    "COVID19_CT_MedSeg_InfNet": "CT-lung-infection", "ACDC_cardiac_MRI_SSL4MIS_h5": "MRI-cardiac",
    "ISBI2012_EM": "electron-microscopy", "CXR_COVID_GeneralBlockchain": "xray", "CXR_lung_imlab_demo": "xray",
}


def zoo_signatures() -> dict[str, ImageSignature]:
    signatures = {}
    for path in sorted(ZOO.glob("*.safetensors")):
        metadata, tensors = read_adapter(path)
        signatures[metadata["modality"]] = ImageSignature.from_file(metadata["routing"], tensors)
    return signatures


def held_out(samples, per_dataset: int, seed: int = 0):
    """Up to ``per_dataset`` images per dataset in EXPECTED that no zoo signature was fitted on."""
    seen = {h for signature in zoo_signatures().values() for h in signature.image_hashes}
    chosen = []
    for dataset in EXPECTED:
        pool = list({(str(s.image), s.slice_index): s for s in samples if s.dataset == dataset}.values())
        random.Random(seed).shuffle(pool)
        chosen += [s for s in pool if image_hash(s.image, s.slice_index) not in seen][:per_dataset]
    return chosen


@pytest.fixture(scope="module")
def manifest_samples():
    from m4oe_adapters.data import data_root, read_manifest

    manifest = data_root() / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"needs the shared data ({manifest})")
    return read_manifest(manifest, nonempty_slices=True)


@pytest.fixture(scope="module")
def zoo_model():
    index = json.loads((ZOO / "index.json").read_text())
    files = [ZOO / entry["file"] for entry in index["adapters"]]
    model = model_from_adapter(files[0], ZOO / "backbone")
    for path in files[1:]:
        load_adapter(model, path)
    return model.eval()


# ------------------------------------------------------------------------------------------- real images
@pytest.mark.real_data
@pytest.mark.slow
def test_zoo_adapters_recognise_held_out_images_of_every_shared_dataset(manifest_samples):
    """README: top-1 99.5 % on 571 held-out images (eval-routing, volumes whole; 98.9 % slice by slice). Here slice
    by slice, a seeded sample of 12 per dataset, 12 datasets, the unseen sites and CHASE_DB1's unsigned children
    included; the floor is below the measured value by the sampling spread."""
    from m4oe_adapters.data import read_image
    from m4oe_adapters.routing import route_images
    from m4oe_adapters.signatures import image_descriptors

    samples = held_out(manifest_samples, per_dataset=12)
    signatures = zoo_signatures()
    arrays = [read_image(s.image, slice_axis=s.slice_axis, slice_index=s.slice_index).array for s in samples]
    decisions = route_images(signatures, image_descriptors(routing_thumbnails(arrays)))
    right = [d.nearest == EXPECTED[s.dataset] for s, d in zip(samples, decisions)]
    rejected = [d.unknown for d in decisions]
    assert len(samples) >= 120
    assert np.mean(right) >= 0.95, f"top-1 {np.mean(right):.3f}"
    assert np.mean(rejected) <= 0.02, f"false rejection {np.mean(rejected):.3f}"
    for dataset in ("DRIVE", "CHASE_DB1", "PH2", "BUSI", "HC18_fetal_head_US", "ISBI2012_EM", "COVID19_CT_MedSeg_InfNet",
                    "CVC-ClinicDB"):
        own = [r for s, r in zip(samples, right) if s.dataset == dataset]
        assert all(own), f"{dataset}: {sum(own)}/{len(own)} routed to {EXPECTED[dataset]}"


@pytest.mark.real_data
@pytest.mark.slow
def test_held_out_images_in_a_black_frame_still_find_their_adapter(zoo_model, manifest_samples):
    """Another site's export may letterbox: each held-out image framed by black margins of 15 % of its size (README:
    38 % top-1 when the frame was scored as part of the image, 98.6 % now, examples/routing_robustness.py)."""
    from m4oe_adapters.data import read_image

    samples = [s for s in held_out(manifest_samples, per_dataset=6) if s.slice_index is None]
    right = []
    for sample in samples:
        image = torch.from_numpy(read_image(sample.image).array)
        margin = int(0.15 * max(image.shape[-2:]))
        framed = torch.nn.functional.pad(image, (margin,) * 4, value=float(image.min()))
        right.append(zoo_model.route([framed])[0].nearest == EXPECTED[sample.dataset])
    assert len(samples) >= 60 and np.mean(right) >= 0.95, f"top-1 {np.mean(right):.3f} on {len(samples)} framed images"


@pytest.mark.real_data
def test_model_without_a_modality_routes_a_mixed_batch_in_one_backbone_pass(zoo_model, manifest_samples):
    from m4oe_adapters.data import load_pair, normalise

    # Adapters whose presets are affine: routing reads the normalised batch (a clahe-normalised fundus image is not
    # the image its signature knows; predict and serve route raw pixels, tested below and in test_serve.py).
    picks = {"PH2": "dermoscopy", "BUSI": "ultrasound-breast", "ISBI2012_EM": "electron-microscopy"}
    chosen = [next(s for s in held_out(manifest_samples, 3) if s.dataset == d) for d in picks]
    images = []
    for sample, name in zip(chosen, picks.values()):
        raw, _, meta = load_pair(sample)
        tensor = torch.from_numpy(normalise(raw, meta, zoo_model.modalities[name].preset, 3)).float()
        images.append(torch.nn.functional.interpolate(tensor[None], size=(224, 224), mode="bilinear")[0])
    batch = torch.stack(images)
    calls = []
    handle = zoo_model.backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            routed = zoo_model(batch)
    finally:
        handle.remove()
    with torch.no_grad():
        explicit = zoo_model(batch, modality=list(picks.values()))
    assert [d.modality for d in zoo_model.route(batch)] == list(picks.values())
    assert len(calls) == 1  # one backbone forward for the whole mixed batch (routing itself uses no backbone pass)
    torch.testing.assert_close(routed, explicit)


@pytest.mark.real_data
def test_predict_routes_a_mixed_folder_of_formats_and_writes_its_decisions(zoo_model, manifest_samples, tmp_path):
    import csv
    import shutil

    from m4oe_adapters.prediction import predict_files

    picks = {"DRIVE": ".tif", "Kvasir-SEG": ".jpg", "BUSI": ".png", "PH2": ".bmp"}
    folder = tmp_path / "inbox"
    folder.mkdir()
    expected = {}
    for dataset, suffix in picks.items():
        sample = next(s for s in held_out(manifest_samples, 20)
                      if s.dataset == dataset and str(s.image).endswith(suffix) and s.slice_index is None)
        target = folder / f"{dataset}{suffix}"
        shutil.copy(sample.image, target)
        expected[target.name] = EXPECTED[dataset]
    # Formats no zoo adapter is made for still get a decision (routed or unknown), never a crash or silence.
    others = {"CT_dcmqi_3slice": "scan.dcm", "SCT_spinalcord_MRI": "spine.nii.gz"}
    for dataset, name in others.items():
        shutil.copy(next(s for s in manifest_samples if s.dataset == dataset).image, folder / name)
    results = {r.source.name: r for r in predict_files(zoo_model, [folder], tmp_path / "out")}
    from m4oe_adapters.data import read_image

    for name in expected:  # predict asks the router, whatever the format
        assert results[name].modality == zoo_model.route([read_image(folder / name).array])[0].modality
    right = [results[name].modality == modality for name, modality in expected.items()]
    assert sum(right) >= 3, {name: results[name].modality for name in expected}  # top-1 is ~94 %, not 100 %
    assert all(results[name].chosen_by == "router" and results[name].output.is_file() for name in expected)
    with open(tmp_path / "out" / "predictions.csv") as stream:
        rows = {Path(row["input"]).name: row for row in csv.DictReader(stream)}
    assert set(rows) == set(expected) | set(others.values())
    assert all((rows[name]["status"], rows[name]["modality"]) == ("segmented", results[name].modality)
               for name in expected)
    assert all(rows[name]["status"] in ("segmented", "unknown") and rows[name]["chosen_by"] == "router"
               for name in others.values())


def test_a_blank_frame_fits_no_zoo_adapter_and_is_refused(zoo_model):
    blank = torch.full((1, 3, 224, 224), 0.5)
    decision = zoo_model.route(blank)[0]
    assert decision.unknown and decision.confidence < 1e-6
    with pytest.raises(UnknownImageError) as caught:
        zoo_model(blank)
    assert caught.value.decisions[0].unknown



@pytest.mark.parametrize("kind", ["uniform colour", "uniform grey", "gaussian colour", "salt and pepper", "small"])
def test_pixel_noise_is_refused_by_the_zoo_whatever_the_threshold(zoo_model, kind):
    """White noise used to fit the dermoscopy signature well enough to be segmented (confidence 0.002-0.007
    against the stored 0.001). Its neighbouring pixels do not correlate, which no image of any modality does: it is
    refused before the scores, even with min_confidence 0, and model(images) raises."""
    generator = torch.Generator().manual_seed(1)
    image = {"uniform colour": lambda: torch.rand(3, 300, 400, generator=generator) * 255,
             "uniform grey": lambda: torch.rand(1, 256, 256, generator=generator),
             "gaussian colour": lambda: torch.randn(3, 512, 512, generator=generator),
             "salt and pepper": lambda: (torch.rand(1, 200, 300, generator=generator) > 0.5).float(),
             "small": lambda: torch.rand(3, 64, 64, generator=generator)}[kind]()
    for threshold in (None, 0.0):
        decision = zoo_model.route([image], min_confidence=threshold)[0]
        assert decision.unknown and decision.reason == "noise" and decision.nearest in zoo_model.modalities
    volume = zoo_model.route_volume([image[:1]] * 3 + [torch.rand(1, 64, 64, generator=generator)] * 2)
    assert volume.unknown and volume.reason == "noise"
    if kind == "uniform grey":
        with pytest.raises(UnknownImageError):
            zoo_model(torch.nn.functional.interpolate(image[None], size=(64, 64)).expand(1, 3, 64, 64))


def test_noise_refusal_is_decided_by_neighbour_correlation_only():
    """Upsampled or smoothed noise correlates and goes to the signatures (the tiny model accepts it at
    min_confidence 0); a few noisy slices do not make a volume noise; a constant image is not noise."""
    from m4oe_adapters.signatures import NOISE_CORRELATION, looks_like_noise, neighbour_correlation

    generator = torch.Generator().manual_seed(2)
    white = torch.rand(1, 128, 128, generator=generator)
    grain = torch.rand(1, 64, 64, generator=generator).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert abs(neighbour_correlation(white)) < 0.05 and looks_like_noise(white)
    framed = torch.nn.functional.pad(white, (40, 40, 30, 30), value=-1.0)  # the frame alone correlates perfectly
    assert neighbour_correlation(framed) > NOISE_CORRELATION and looks_like_noise(framed)
    assert neighbour_correlation(grain) > NOISE_CORRELATION and not looks_like_noise(grain)
    assert neighbour_correlation(torch.full((3, 32, 32), 7.0)) == 1.0 and not looks_like_noise(torch.zeros(8, 8))
    model = signed_tiny_model()
    assert model.route([grain], min_confidence=0.0)[0].modality is not None
    assert model.route([white], min_confidence=0.0)[0].reason == "noise"
    smooth = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=generator), size=(128, 128),
                                             mode="bilinear", align_corners=False)[0]
    assert model.route_volume([smooth] * 3 + [white] * 2, min_confidence=0.0).modality is not None
    assert model.route_volume([smooth] * 2 + [white] * 3, min_confidence=0.0).reason == "noise"


@pytest.mark.real_data
def test_no_image_of_the_shared_data_looks_like_noise(manifest_samples):
    """The noise threshold (NOISE_CORRELATION) sits far below every image of every dataset: the lowest measured
    neighbour correlation, spinal-cord MRI, was 0.69. Up to 40 images or slices per dataset, seeded."""
    from m4oe_adapters.data import read_image
    from m4oe_adapters.signatures import NOISE_CORRELATION, looks_like_noise, neighbour_correlation

    by_dataset = {}
    for sample in manifest_samples:
        by_dataset.setdefault(sample.dataset, []).append(sample)
    lowest, flagged = {}, []
    for dataset, samples in by_dataset.items():
        random.Random(0).shuffle(samples)
        arrays = [read_image(s.image, slice_axis=getattr(s, "slice_axis", 2), slice_index=s.slice_index).array
                  for s in samples[:40]]
        lowest[dataset] = min(neighbour_correlation(array) for array in arrays)
        flagged += [dataset for array in arrays if looks_like_noise(array)]  # framed images: the picture inside
    assert len(lowest) >= 10 and min(lowest.values()) > NOISE_CORRELATION + 0.3, lowest
    assert not flagged, flagged

def test_set_modality_still_segments_every_image_with_that_modality(zoo_model):
    images = torch.rand(2, 3, 64, 64)
    zoo_model.set_modality("fundus")
    try:
        with torch.no_grad():
            torch.testing.assert_close(zoo_model(images), zoo_model(images, modality="fundus"))
    finally:
        zoo_model._modality_chosen = False


# ------------------------------------------------------------------------------------------- mechanics
def signed_tiny_model(names=("CT", "MRI", "xray"), seed=0):
    model = tiny_model(in_chans=3, modalities=names)
    generator = torch.Generator().manual_seed(seed)
    for index, name in enumerate(names):
        thumbnails = (torch.rand(6, 3, 160, 160, generator=generator) * (0.3 + 0.3 * index)).clamp(0, 1)
        model.set_signature(name, ImageSignature.fit(thumbnails, views=2, seed=index))
    return model


def test_adding_or_removing_an_adapter_leaves_the_other_adapters_scores_bit_identical(tmp_path):
    images = torch.rand(4, 3, 80, 96)
    model = signed_tiny_model(("CT", "MRI"))
    before = model.route(images)
    extra = signed_tiny_model(("xray",), seed=5)
    save_adapter(extra, "xray", tmp_path / "xray.safetensors")
    load_adapter(model, tmp_path / "xray.safetensors")
    with_xray = model.route(images)
    model.remove_modality("MRI")
    without_mri = model.route(images)
    for old, new, newer in zip(before, with_xray, without_mri):
        assert old.scores["CT"] == new.scores["CT"] == newer.scores["CT"]  # exact, not approximate
        assert old.scores["MRI"] == new.scores["MRI"]
        assert "xray" in new.scores and "MRI" not in newer.scores


def _kinds(count: int, kind: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Grey slices of one look: smooth blobs, fine noise or stripes (routing normalises intensity away). The
    "noise" kind is grain of 2-px blocks: pixel noise itself is refused before any signature scores it."""
    slices = []
    for _ in range(count):
        if kind == "smooth":
            image = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(96, 96),
                                                    mode="bicubic", align_corners=False)[0]
        elif kind == "noise":
            image = torch.rand(1, 48, 48, generator=generator).repeat_interleave(2, 1).repeat_interleave(2, 2)
        else:
            frequency = 0.2 + 0.3 * float(torch.rand(1, generator=generator))
            image = torch.sin(torch.arange(96.0) * frequency).expand(96, 96)[None].clone()
        slices.append(image)
    return slices


def test_a_volume_goes_to_one_adapter_chosen_by_most_of_its_slices():
    """predict/serve route a volume as a whole: each adapter's median score over its slices, so two odd slices
    neither split the volume nor decide it; a one-slice volume is routed exactly as that image."""
    model, generator = _kinds_model()
    volume = _kinds(5, "smooth", generator) + _kinds(2, "noise", generator)
    per_slice = [decision.nearest for decision in model.route(volume)]
    assert per_slice == ["smooth"] * 5 + ["noise"] * 2  # the slices alone disagree
    whole = model.route_volume(volume)
    assert whole.modality == "smooth"
    assert model.route_volume(_kinds(4, "noise", generator) + _kinds(1, "stripes", generator)).modality == "noise"
    one = _kinds(1, "stripes", generator)
    alone, as_volume = model.route(one)[0], model.route_volume(one)
    assert (alone.modality, alone.confidence, alone.scores) == (as_volume.modality, as_volume.confidence,
                                                                as_volume.scores)


def _kinds_model():
    generator = torch.Generator().manual_seed(0)
    model = tiny_model(in_chans=3, modalities=("smooth", "noise", "stripes"))
    for index, kind in enumerate(("smooth", "noise", "stripes")):
        model.set_signature(kind, ImageSignature.fit(routing_thumbnails(_kinds(12, kind, generator)), views=2,
                                                     seed=index))
    return model, generator


def test_an_image_in_a_black_frame_routes_like_the_picture_inside_it():
    """Letterboxing or another export's margins: each adapter also scores the image without its constant-colour
    frame and keeps its better fit. An image without a frame has one view and is scored exactly as before."""
    from m4oe_adapters.routing import route_images
    from m4oe_adapters.signatures import image_descriptors, routing_descriptors, without_border

    model, generator = _kinds_model()
    for kind in ("noise", "smooth"):
        inner = _kinds(1, kind, generator)[0]
        framed = torch.nn.functional.pad(inner, (30, 30, 20, 40), value=float(inner.min()) - 0.5)
        assert torch.equal(without_border(framed), inner)
        plain = route_images(model.signatures, image_descriptors(routing_thumbnails([framed])))[0]
        routed, alone = model.route([framed])[0], model.route([inner])[0]
        assert plain.modality != kind  # as it is, the frame decides: another adapter, or unknown
        assert routed.modality == alone.modality == kind and routed.confidence >= alone.confidence
    assert without_border(inner) is None and routing_descriptors([inner])[0].shape[0] == 1
    exact = route_images(model.signatures, image_descriptors(routing_thumbnails([inner])))[0]
    assert model.route([inner])[0].scores == exact.scores



def test_a_frame_on_any_one_side_is_found():
    """``without_border`` looks at the four edge lines first and stops when none has the corner's colour: a frame
    on one side only (the corner is then frame colour only when the frame holds it) is still removed, whichever
    side it is on, and a picture whose single corner pixel matches nothing else is left whole."""
    from m4oe_adapters.signatures import without_border

    generator = torch.Generator().manual_seed(3)
    inner = torch.rand(3, 40, 50, generator=generator) + 1.0
    for pad, expected in [((0, 0, 7, 0), inner), ((7, 0, 0, 0), inner)]:
        assert torch.equal(without_border(torch.nn.functional.pad(inner, pad, value=0.0)), expected)
    # a frame on the bottom (or right) only: the top-left corner is picture, so no edge line matches it
    assert without_border(torch.nn.functional.pad(inner, (0, 0, 0, 7), value=0.0)) is None
    assert without_border(torch.nn.functional.pad(inner, (0, 7, 0, 0), value=0.0)) is None
    # bottom and right frames when the corner holds the frame colour (the top-left pixel of an L-shaped frame)
    framed = torch.nn.functional.pad(inner, (0, 6, 0, 9), value=0.0)
    framed[:, 0, 0] = 0.0
    assert torch.equal(without_border(framed), framed[:, :-9, :-6])


def test_histogram_counts_match_a_direct_count_when_edges_lie_outside_the_values():
    """``_histogram`` counts by ``bucketize`` + ``bincount``; the shares must equal counting each bin directly, with
    edges inside, at and beyond the values' range (values on an edge belong to the bin above it)."""
    from m4oe_adapters.signatures import _histogram

    generator = torch.Generator().manual_seed(4)
    values = torch.rand(3, 1, 20, 20, generator=generator) * 0.5 + 0.2   # in [0.2, 0.7]
    values[0, 0, 0, 0], values[1, 0, 0, 0], values[2, 0, 0, 0] = 0.2, 0.5, 0.7  # an edge exactly at the maximum
    for edges in ([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 10.0], [-1.0, 0.2, 0.5, 1.0001], [0.8, 0.9], [-2.0, -1.0]):
        flat = values.reshape(3, -1)
        direct = torch.stack([((flat >= low) & (flat < high)).float().mean(1) for low, high in zip(edges, edges[1:])], 1)
        assert torch.allclose(_histogram(values, edges), direct, atol=0, rtol=0), edges

@pytest.mark.real_data
def test_predict_routes_a_cardiac_volume_whole_although_its_apex_slices_look_like_ultrasound(zoo_model, tmp_path):
    """The 4 routing errors of eval-routing before volumes were routed whole and framed images scored without their
    frame: slices 8 and 9 of patient001's two frames (the apex) went to fetal ultrasound. predict gives the volume
    one decision: cardiac MRI."""
    import csv

    from m4oe_adapters.data import data_root, read_image
    from m4oe_adapters.prediction import predict_files

    volume = data_root() / "ACDC_cardiac_MRI_SSL4MIS_h5" / "volumes" / "patient001_frame01.h5"
    if not volume.is_file():
        pytest.skip(f"needs the shared data ({volume})")
    from m4oe_adapters.routing import route_images
    from m4oe_adapters.signatures import image_descriptors

    slices = [read_image(volume, slice_axis=0, slice_index=index).array for index in range(10)]
    plain = route_images(zoo_model.signatures, image_descriptors(routing_thumbnails(slices)))
    assert {d.nearest for d in plain} > {"MRI-cardiac"}  # slice by slice, each slice as it is: it splits
    results = predict_files(zoo_model, [volume], tmp_path / "out")
    assert [(r.modality, r.chosen_by) for r in results] == [("MRI-cardiac", "router")]
    with open(tmp_path / "out" / "predictions.csv") as stream:
        assert [row["modality"] for row in csv.DictReader(stream)] == ["MRI-cardiac"]


def test_min_confidence_decides_what_counts_as_unknown():
    model = signed_tiny_model()
    images = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8), size=(64, 64), mode="bilinear")  # not noise
    assert all(d.unknown for d in model.route(images, min_confidence=1.0 + 1e-9))
    assert not any(d.unknown for d in model.route(images, min_confidence=0.0))


def test_routing_without_any_signature_says_how_to_get_one():
    model = tiny_model(in_chans=3)
    with pytest.raises(ConfigError, match="m4oe sign"):
        model.route(torch.rand(1, 3, 64, 64))


def test_signature_travels_in_the_adapter_file_and_sign_keeps_every_other_byte(tmp_path):
    model = signed_tiny_model()
    plain = tiny_model(in_chans=3)
    save_adapter(plain, "CT", tmp_path / "plain.safetensors", dtype="fp16")
    signature = model.signatures["CT"]
    signed = sign_adapter(tmp_path / "plain.safetensors", signature, tmp_path / "signed.safetensors")
    metadata_before, tensors_before = read_adapter(tmp_path / "plain.safetensors")
    metadata_after, tensors_after = read_adapter(signed)
    for key, tensor in tensors_before.items():
        assert tensors_after[key].dtype == tensor.dtype and torch.equal(tensors_after[key], tensor)
    assert {k: v for k, v in metadata_after.items() if k != "routing"} == metadata_before
    reloaded = tiny_model(in_chans=3, modalities=())
    load_adapter(reloaded, signed)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    original = [d.scores["CT"] for d in model.route(images)]
    travelled = [d.scores["CT"] for d in reloaded.route(images)]
    # fp16 file: a score may cross one stored calibration quantile (confidence moves in steps of 1/100; unseeded
    # images crossed one in 7 of 200 draws)
    np.testing.assert_allclose(travelled, original, rtol=2e-2, atol=1.01 / (CALIBRATION_POINTS - 1))
    with pytest.raises(AdapterError, match="overwrite"):
        sign_adapter(signed, signature, signed)
    assert Path(signed).stat().st_size - (tmp_path / "plain.safetensors").stat().st_size <= 50_000


def _descriptor_inputs() -> list[torch.Tensor]:
    """A colour fundus-like disc, a grey textured slice in CT units, a flat frame with one block (any size)."""
    generator = torch.Generator().manual_seed(7)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 300), torch.linspace(-1, 1, 260), indexing="ij")
    disc = ((x ** 2 + y ** 2) < 0.8).float()
    colour = torch.stack([disc * (0.6 + 0.3 * x), disc * (0.3 + 0.2 * torch.sin(9 * y)), disc * 0.1]) * 255
    colour = colour + torch.rand(3, 300, 260, generator=generator) * 20
    grey = (torch.sin(20 * x) * torch.cos(13 * y) + torch.randn(300, 260, generator=generator) * 0.3)[None] * 800 - 1000
    flat = torch.full((1, 64, 64), 5.0)
    flat[0, 10:20, 30:50] = 7.0
    return [colour, grey, flat]


def test_descriptors_match_the_version_the_stored_signatures_were_fitted_with():
    """Signatures in adapter files are Gaussians over these descriptors (FEATURE_VERSION m4oe-descriptor-2): a change
    to the descriptor code that moves them would silently mis-route every signed file. tests/data/descriptors_v2.npy
    was written by the first implementation (before the speed-ups); a pixel that lands in the neighbouring histogram
    bin through rounding moves one value by 1/6400 of a bin share at most."""
    from m4oe_adapters.signatures import FEATURE_VERSION, image_descriptors

    assert FEATURE_VERSION == "m4oe-descriptor-2"
    reference = np.load(Path(__file__).parent / "data" / "descriptors_v2.npy")
    descriptors = image_descriptors(routing_thumbnails(_descriptor_inputs())).numpy()
    assert descriptors.shape == reference.shape == (3, 200)
    np.testing.assert_allclose(descriptors, reference, rtol=0, atol=1e-4)
    assert np.abs(descriptors - reference).mean() < 1e-6


def test_thumbnail_percentiles_are_exact_whatever_the_values():
    """The routing percentile narrows large inputs to a tail beyond a cut from every 16th value; it must equal the
    sorted-order percentile exactly: with ties, skew, a constant half, and values that defeat the sample (the extreme
    values all at sampled positions, so the cut leaves too few and the full partial sort runs)."""
    from m4oe_adapters.signatures import _percentile

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for count in (50, 19_999, 20_000, 150_528, 333_333):
        values = torch.rand(count, generator=generator)
        inputs += [values, (values * 8).floor(), values ** 6, torch.cat([torch.zeros(count // 2), values[count // 2:]])]
        adversarial = torch.zeros(count)
        adversarial[::16] = 1 + torch.rand(len(adversarial[::16]), generator=generator)
        inputs += [adversarial, -adversarial]
    for values in inputs:
        ordered = values.sort().values
        for q in (0.0, 0.005, 0.01, 0.5, 0.99, 0.995, 1.0):
            position = torch.tensor(q, dtype=values.dtype) * (values.numel() - 1)
            index = int(position.floor())
            expected = torch.lerp(ordered[index], ordered[min(index + 1, values.numel() - 1)], position - index)
            assert torch.equal(_percentile(values, q), expected), (values.numel(), q)


def test_routing_thumbnails_ignore_affine_intensity_presets():
    image = torch.rand(1, 3, 100, 120) * 255
    assert torch.allclose(routing_thumbnails(image), routing_thumbnails((image - 40) / 3.5), atol=1e-5)


def test_predict_keeps_colliding_names_apart_and_never_overwrites_without_being_told(tmp_path):
    from PIL import Image

    from m4oe_adapters.cli import main

    model = tiny_model(in_chans=1, modalities=("CT",))
    adapter = save_adapter(model, "CT", tmp_path / "ct.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels).save(folder / "a.tif")
    args = ["predict", str(folder), "--adapter", str(adapter), "--backbone", "timm:swin_tiny_patch4_window7_224",
            "--weights", "none", "--in-chans", "1", "--img-size", "64", "--model-args",
            json.dumps({"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}),
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a_png_mask.png", "a_tif_mask.png", "predictions.csv"]
    stamp = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in written}
    assert main(args) == 2  # refused before writing anything
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in written} == stamp
    assert main(args + ["--overwrite"]) == 0


def test_eval_routing_refuses_to_replace_an_earlier_report_without_overwrite(tmp_path, capsys):
    from m4oe_adapters.cli import main

    (tmp_path / "report.md").write_text("a user's earlier report\n")
    code = main(["eval-routing", "--zoo", str(ZOO), "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "a user's earlier report\n"


@pytest.mark.real_data
def test_eval_routing_reports_what_its_rows_say_and_compares_dice_three_ways(tmp_path):
    """`m4oe eval-routing` end to end on a few held-out images per dataset: the summary's top-1, false rejection
    and per-dataset counts are those of its per-image CSV, the confusion matrix adds up, every adapter is left out
    once, and --dice compares routed, true-modality and soft Dice on the same images."""
    import csv

    from m4oe_adapters.cli import main
    from m4oe_adapters.data import data_root

    if not (data_root() / "manifest.csv").is_file():
        pytest.skip(f"needs the shared data ({data_root() / 'manifest.csv'})")
    out = tmp_path / "routing"
    assert main(["eval-routing", "--zoo", str(ZOO), "--data", str(data_root()), "--map", "CHASE_DB1=fundus",
                 "--max-per-dataset", "3", "--dice", "1", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [row for row in csv.DictReader(open(out / "routing.csv")) if row["expected"] != "no adapter"]
    assert summary["known_images"] == len(rows) > 0
    assert summary["top1_accuracy"] == pytest.approx(np.mean([r["nearest"] == r["expected"] for r in rows]))
    assert summary["false_rejection_rate"] == pytest.approx(np.mean([r["chosen"] == "unknown" for r in rows]))
    confusion = list(csv.reader(open(out / "confusion.csv")))
    counted = sum(int(v) for line in confusion[1:] if line[0] != "no adapter" for v in line[1:])
    assert counted == len(rows)
    assert set(summary["leave_one_out"]) == set(summary["adapters"])
    dice = summary["dice"]
    assert dice["images"] > 0 and all(0 <= dice[k] <= 1 for k in ("routed_mean", "true_mean", "soft_mean"))


def test_gate_training_moves_only_router_keys_and_lowers_the_gate_loss():
    """train_gate: the gate loss falls and every router key moves, while experts and decoders keep every bit (hard
    routing gives the same output)."""
    from conftest import tiny_model
    from m4oe_adapters.gate_training import train_gate

    model = tiny_model(modalities=("CT", "MRI"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    images = {"CT": [(rng.normal(0.5, 0.3, (1, 64, 64)).astype(np.float32), {}) for _ in range(6)],
              "MRI": [((np.sin(6 * xx + k) * np.cos(4 * yy))[None].astype(np.float32), {}) for k in range(6)]}
    frozen = {key: tensor.clone() for name in ("CT", "MRI") for key, tensor in model.modality_tensors(name).items()
              if "router_key" not in key}
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        hard_before = model(x, ["CT", "MRI"])
    keys_before = {key: tensor.clone() for name in ("CT", "MRI") for key, tensor in model.modality_tensors(name).items()
                   if "router_key" in key}
    history = train_gate(model, images, steps=30, batch_size=4, lr=0.05, log=lambda _: None)
    assert history[-1]["gate"] < 0.8 * history[0]["gate"] and 0 <= history[-1]["accuracy"] <= 1
    after = {key: tensor for name in ("CT", "MRI") for key, tensor in model.modality_tensors(name).items()}
    assert all(torch.equal(frozen[key], after[key]) for key in frozen)
    assert not any(torch.equal(keys_before[key], after[key]) for key in keys_before)
    with torch.no_grad():
        assert torch.equal(model(x, ["CT", "MRI"]), hard_before)
