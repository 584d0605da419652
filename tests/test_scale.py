"""Scale harmonisation: the field of view is measured, inputs are predicted at the adapter's recorded scale and the
mask comes back on the input's grid, and the CLI records and uses the scale."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m4oe_adapters.data import data_root, read_image, read_manifest
from m4oe_adapters.scale import fov_diameter_px, predict_mask_at_scale, resampling_factor


def fundus_like(height: int, width: int, diameter: float, centre_row: float | None = None) -> np.ndarray:
    """``[3, H, W]`` uint8: a bright orange disc of ``diameter`` px on black, with noise and a dark vessel."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    cy = height / 2 if centre_row is None else centre_row
    disc = (yy - cy) ** 2 + (xx - width / 2) ** 2 < (diameter / 2) ** 2
    image = np.zeros((3, height, width), np.float32)
    image[0] = disc * 160 + rng.normal(0, 8, disc.shape)
    image[1] = disc * 80 + rng.normal(0, 5, disc.shape)
    image[:, height // 2 - 2 : height // 2 + 2, :] *= 0.4  # a vessel across the disc must not split it
    return np.clip(image, 0, 255).astype(np.uint8)


def test_field_of_view_diameter_is_measured_within_two_percent():
    assert fov_diameter_px(fundus_like(300, 320, 250)) == pytest.approx(250, rel=0.02)
    assert fov_diameter_px(fundus_like(900, 1000, 820)) == pytest.approx(820, rel=0.02)


def test_a_disc_cut_at_top_and_bottom_still_gives_its_full_diameter():
    # the camera crops the disc to 60% of its height: the area shrinks, the widest row does not
    assert fov_diameter_px(fundus_like(240, 460, 400)) == pytest.approx(400, rel=0.02)


def test_a_twice_larger_field_of_view_is_predicted_at_half_size_and_the_mask_returns_on_the_input_grid():
    raw = fundus_like(400, 420, 360)
    image = torch.from_numpy(raw.astype(np.float32) / 255)
    seen = []

    def predictor(batch):  # "foreground" = bright red; records the windows' input
        seen.append(tuple(batch.shape[-2:]))
        red = batch[:, :1]
        return torch.cat([0.3 - red, red - 0.3], dim=1) * 10

    recorded = {"kind": "fov_diameter_px", "value": 180.0}
    assert resampling_factor(recorded, raw) == pytest.approx(0.5, rel=0.03)
    mask = predict_mask_at_scale(predictor, image, (64, 64), "crop", scale=recorded, raw=raw)
    assert tuple(mask.shape) == (400, 420)
    expected = (raw[0] > 0.3 * 255).astype(np.int64)
    dice = 2 * (mask.numpy() * expected).sum() / (mask.numpy().sum() + expected.sum())
    assert dice > 0.97
    # the predictor ran on the image shrunk to ~half (sliding windows of 64 px cover 200×210, not 400×420)
    plain_calls = []
    predict_mask_at_scale(lambda b: plain_calls.append(1) or predictor(b), image, (64, 64), "crop", scale=None)
    assert len(seen) - len(plain_calls) < len(plain_calls) / 2


def test_an_adapter_without_scale_or_a_resize_adapter_predicts_at_the_input_pixel_size():
    raw = fundus_like(128, 128, 100)
    assert resampling_factor(None, raw) == 1.0
    assert resampling_factor({"kind": "fov_diameter_px", "value": 101.0}, raw) == 1.0  # within 5%: not resampled
    shapes = []
    image = torch.from_numpy(raw.astype(np.float32) / 255)
    predict_mask_at_scale(lambda b: shapes.append(tuple(b.shape[-2:])) or b[:, :2], image, (64, 64), "resize",
                          scale={"kind": "fov_diameter_px", "value": 50.0}, raw=raw)
    assert shapes == [(64, 64)]


def test_pixel_spacing_from_headers_sets_the_factor():
    raw = np.zeros((1, 64, 64), np.float32)
    recorded = {"kind": "pixel_spacing_mm", "value": 1.0}
    assert resampling_factor(recorded, raw, {"spacing": [0.5, 0.5]}) == pytest.approx(0.5)
    assert resampling_factor(recorded, raw, {}) == 1.0  # no header spacing: predicted as is
    assert resampling_factor(recorded, raw, {}, pixel_size=2.0) == pytest.approx(2.0)  # the user's --pixel-size


def test_train_records_the_pixel_size_and_eval_resamples_to_it(tmp_path, capsys):
    from tests.test_cli import TINY, write_site

    from m4oe_adapters.cli import main

    write_site(tmp_path / "A", 6, 1, 120)
    rows = ["dataset,modality,site,image,mask,split_hint"]
    for image in sorted((tmp_path / "A" / "images").iterdir()):
        rows.append(f"synthetic,xray,A,A/images/{image.name},A/masks/{image.stem}_mask.png,")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    adapter = tmp_path / "xray.safetensors"
    assert main(["train", *TINY, "--data", str(tmp_path / "manifest.csv"), "--modality", "xray", "--steps", "2",
                 "--batch", "2", "--size", "64", "--pixel-size", "0.5", "-o", str(adapter), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    scale = json.loads(capsys.readouterr().out)["metadata"]["provenance"]["scale"]
    assert scale["kind"] == "pixel_size" and scale["value"] == 0.5
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(adapter), *TINY, "--data", str(tmp_path / "manifest.csv"), "--modality",
                 "xray", "--pixel-size", "1.0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    factors = {row["scale_factor"] for row in metrics["images"]}
    assert factors == {2.0}  # pixels twice as large as at training: enlarged twice before prediction


def write_fundus_pair(folder, name: str, height: int, width: int, diameter: float):
    """A fundus-like PNG and its mask (the bright disc), as a manifest sample of modality fundus."""
    from PIL import Image

    from m4oe_adapters.data.manifest import Sample

    raw = fundus_like(height, width, diameter)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw.transpose(1, 2, 0)).save(folder / f"{name}.png")
    Image.fromarray(((raw[0] > 0.3 * 255) * 255).astype(np.uint8)).save(folder / f"{name}_mask.png")
    return Sample("synthetic", "fundus", name, folder / f"{name}.png", folder / f"{name}_mask.png",
                  mask_encoding="binary255")


def test_training_images_of_another_field_of_view_are_resampled_to_the_scale_the_adapter_records(tmp_path):
    """Two sites' photographs train at one scale: a disc twice as wide is shrunk by half before cropping, its mask
    alike (still on the image's pixels, still class ids), and a disc at the recorded scale is left as it is."""
    from m4oe_adapters.data import SegmentationDataset

    small = write_fundus_pair(tmp_path, "small", 200, 210, 180)
    large = write_fundus_pair(tmp_path, "large", 400, 420, 360)
    recorded = {"kind": "fov_diameter_px", "value": 180.0}
    dataset = SegmentationDataset([small, large], size=(64, 64), mode="crop", scale=recorded)
    image, mask = dataset.preprocessed(1)
    assert dataset.factors[1] == pytest.approx(0.5, rel=0.03)
    assert abs(image.shape[-2] - 200) <= 6 and abs(image.shape[-1] - 210) <= 6 and mask.shape == image.shape[-2:]
    assert set(np.unique(mask)) <= {0, 1}
    disc = fov_diameter_px(image - image.min())
    assert disc == pytest.approx(180, rel=0.04)  # the same field of view as the recorded one
    assert dataset.preprocessed(0)[0].shape[-2:] == (200, 210) and dataset.factors[0] == 1.0
    overlap = 2 * (mask * (image[0] > image[0].mean())).sum() / (mask.sum() + (image[0] > image[0].mean()).sum())
    assert overlap > 0.95  # the label was resampled with its image
    unscaled = SegmentationDataset([large], size=(64, 64), mode="crop")
    assert unscaled.preprocessed(0)[0].shape[-2:] == (400, 420)
    resized = SegmentationDataset([large], size=(64, 64), mode="resize", scale=recorded)
    assert resized.preprocessed(0)[0].shape[-2:] == (64, 64) and resized.scale is None


def test_an_adapter_named_after_its_site_is_preprocessed_and_scaled_as_its_images_modality(tmp_path):
    """`m4oe train --modality fundus-clinicA` on fundus photographs: the fundus preset and the field-of-view scale,
    not the percentile preset and no scale an unknown modality name gets; the scale is the training images'."""
    from m4oe_adapters.adapt import fit_modality
    from m4oe_adapters.config import ExpertConfig
    from m4oe_adapters.presets import default_preset
    from m4oe_adapters.training import TrainConfig

    samples = [write_fundus_pair(tmp_path, f"eye{i}", 96, 100, 80 + 2 * i) for i in range(3)]
    fit = fit_modality(tiny_backbone, samples, "fundus-clinicA", size=(64, 64), resize_mode="crop", val_count=0,
                       expert_config=ExpertConfig(rank=2), train_config=TrainConfig(steps=1, batch_size=2),
                       progress=False, log=lambda line: None)
    assert fit.preset == default_preset("fundus")
    assert fit.provenance["scale"]["kind"] == "fov_diameter_px"
    assert fit.provenance["scale"]["value"] == pytest.approx(82, rel=0.04)


def test_an_adapter_file_spells_out_every_parameter_of_its_preset(tmp_path):
    """A preset given by its kind alone (``{"kind": "clahe"}``) is written into the adapter with its tiles and clip
    limit, so the file keeps its meaning if a default changes later; prediction reads it back."""
    from m4oe_adapters.adapt import fit_modality
    from m4oe_adapters.adapter_file import read_header
    from m4oe_adapters.config import ExpertConfig
    from m4oe_adapters.training import TrainConfig

    samples = [write_fundus_pair(tmp_path, f"eye{i}", 96, 100, 80) for i in range(2)]
    fit_modality(tiny_backbone, samples, "fundus", size=(64, 64), resize_mode="crop", val_count=0,
                 preset={"kind": "clahe"}, expert_config=ExpertConfig(rank=2),
                 train_config=TrainConfig(steps=1, batch_size=2), output=tmp_path / "a.safetensors",
                 progress=False, log=lambda line: None)
    assert read_header(tmp_path / "a.safetensors")[0]["preset"] == {"kind": "clahe", "tiles": 8, "clip": 0.01}


def test_adapting_an_adapter_to_a_new_site_trains_at_the_scale_its_experts_learnt(tmp_path):
    """`m4oe train --init` on a site whose discs are twice as wide: the new images are resampled to the starting
    adapter's scale (what its experts learnt vessels at), and the adapted adapter records that scale, so prediction
    shrinks the new site's images as training did."""
    from m4oe_adapters.adapt import fit_modality, inherit_recipe
    from m4oe_adapters.config import ExpertConfig
    from m4oe_adapters.training import TrainConfig

    options = dict(size=(64, 64), resize_mode="crop", val_count=0, expert_config=ExpertConfig(rank=2),
                   train_config=TrainConfig(steps=1, batch_size=2), progress=False, log=lambda line: None)
    source = [write_fundus_pair(tmp_path / "a", f"eye{i}", 96, 100, 80) for i in range(2)]
    fit_modality(tiny_backbone, source, "fundus", output=tmp_path / "source.safetensors", **options)
    recipe, notes = inherit_recipe(tmp_path / "source.safetensors")
    assert recipe["scale"]["value"] == pytest.approx(80, rel=0.04) and "resampled" in notes[0]
    new_site = [write_fundus_pair(tmp_path / "b", f"eye{i}", 192, 200, 160) for i in range(2)]
    adapted = fit_modality(tiny_backbone, new_site, "fundus", init_adapter=tmp_path / "source.safetensors",
                           **{key: value for key, value in options.items() if key != "expert_config"})
    assert adapted.provenance["scale"] == recipe["scale"]  # not the 160 px the new images measure
    plain = fit_modality(tiny_backbone, new_site, "fundus", **options)
    assert plain.provenance["scale"]["value"] == pytest.approx(160, rel=0.04)


def tiny_backbone():
    from m4oe_adapters import load_backbone

    return load_backbone("timm:swin_tiny_patch4_window7_224", None, img_size=64,
                         model_args={"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4],
                                     "window_size": 2})


DATA = data_root()


@pytest.mark.real_data
@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="real data not found (set M4OE_DATA)")
def test_chase_db1_field_of_view_is_about_1_7_times_drive():
    samples = [s for s in read_manifest(DATA / "manifest.csv") if s.dataset in ("DRIVE", "CHASE_DB1")]
    drive = [fov_diameter_px(read_image(s.image).array) for s in samples if s.dataset == "DRIVE"][:6]
    chase = [fov_diameter_px(read_image(s.image).array) for s in samples if s.dataset == "CHASE_DB1"][:6]
    # DRIVE images are 565 px wide with a ~540 px disc; CHASE_DB1 999 px wide with a ~920 px disc
    assert 520 < np.median(drive) < 560 and 880 < np.median(chase) < 960


@pytest.mark.real_data
@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="real data not found (set M4OE_DATA)")
def test_otsu_threshold_raises_the_zoo_fundus_adapter_at_chase_db1_and_keeps_drive():
    """README ("Training, evaluation, prediction"): `--threshold otsu` raised the zoo fundus adapter (CLAHE preset) on
    26 of the 28 CHASE_DB1 images (64.9 -> 65.9) and left DRIVE at 80.7. Here 3 images of each site, predicted as
    `m4oe eval` predicts them (scale harmonised, windows), scored at the argmax and with each image's Otsu threshold."""
    from pathlib import Path

    from m4oe_adapters.evaluation import prepare
    from m4oe_adapters.inference import mask_from_probabilities
    from m4oe_adapters.scale import predict_probabilities_at_scale
    from m4oe_adapters.segmenter_file import load_segmenter

    zoo = Path(__file__).resolve().parents[1] / "adapters_zoo"
    loaded = load_segmenter(zoo / "fundus.safetensors", zoo / "backbone")
    info = loaded.model.modalities["fundus"]
    samples = read_manifest(DATA / "manifest.csv")
    chosen = {"CHASE_DB1": [s for s in samples if s.dataset == "CHASE_DB1"][::10][:3],
              "DRIVE": [s for s in samples if s.dataset == "DRIVE" and s.split_hint == "test"][:3]}

    def dice(mask, label):
        return 2 * float((mask & label).sum()) / max(1, int(mask.sum() + label.sum()))

    gains = {}
    with torch.no_grad():
        for site, site_samples in chosen.items():
            for sample in site_samples:
                prepared = prepare(sample, info.preset, loaded.in_chans)
                probabilities = predict_probabilities_at_scale(
                    loaded, prepared.image, info.input_size, info.provenance.get("resize_mode", "crop"),
                    scale=info.provenance.get("scale"), raw=prepared.raw, meta=prepared.meta, progress=False)
                label = np.asarray(prepared.label) > 0
                argmax = dice(mask_from_probabilities(probabilities).numpy() > 0, label)
                otsu = dice(mask_from_probabilities(probabilities, "otsu").numpy() > 0, label)
                gains.setdefault(site, []).append(otsu - argmax)
    assert float(np.mean(gains["CHASE_DB1"])) > 0.003 and sum(g > 0 for g in gains["CHASE_DB1"]) >= 2, gains
    assert abs(float(np.mean(gains["DRIVE"]))) < 0.01, gains
