"""`m4oe pretrain`: SimMIM learns, resumes exactly after a kill, and writes a backbone timm itself loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from m4oe_adapters import load_backbone
from m4oe_adapters.pretrain import pretrain

ARGS = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}


@pytest.fixture
def images(tmp_path):
    import nibabel

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    for index in range(4):
        picture = (127 + 100 * np.sin(xx / (4 + index)) * np.cos(yy / 7)).astype(np.uint8)
        Image.fromarray(picture).save(folder / f"img{index}.png")
    volume = rng.normal(size=(64, 64, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), folder / "vol.nii.gz")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def run(images, out, steps, **options):
    # one thread: on shared cores a tiny model is many times slower with two threads spinning against other jobs
    return pretrain([images], out, model_args=ARGS, img_size=64, crop_size=64, batch_size=4, steps=steps, lr=2e-3,
                    warmup=2, checkpoint_every=5, preview_every=10, progress=False, num_threads=1,
                    log=lambda _: None, **options)


def test_pretraining_reduces_the_loss_and_writes_logs_and_previews(images, tmp_path):
    folder = run(images, tmp_path / "a", 30)
    losses = [float(line.split(",")[1]) for line in (tmp_path / "a" / "log.csv").read_text().splitlines()[1:]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for name in ("preview.png", "loss_curve.png", "log.csv"):
        assert (tmp_path / "a" / name).is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    # the backbone carries its own training curve (the model card draws it without the run folder)
    curve = json.loads((folder / "config.json").read_text())["m4oe"]["loss_curve"]
    assert curve[-1][0] == 30 and len(curve) == 30
    assert [loss for _, loss in curve] == pytest.approx(losses, abs=1e-5)


def test_corrupt_images_are_skipped_and_reported(images, tmp_path):
    from m4oe_adapters.pretrain import collect_images

    found, skipped = collect_images([images], 3, log=lambda _: None)
    assert len(found) == 4 + 3 and [path.endswith("corrupt.png") for path, _ in skipped] == [True]


def plain_timm_reads_headless_files():
    """timm < 1.0.31 takes a headless timm-layout file for Microsoft's layout (README: plain timm from 1.0.31 on;
    ``load_backbone`` reads it on every version, tests/test_backbones.py)."""
    import timm

    if tuple(int(part) for part in timm.__version__.split(".")[:3] if part.isdigit()) < (1, 0, 31):
        pytest.skip(f"plain timm {timm.__version__} misreads headless files (fixed in 1.0.31)")


def test_output_loads_with_plain_timm_and_the_backbone_loader(images, tmp_path):
    import timm

    folder = run(images, tmp_path / "b", 2)
    ours = load_backbone("timm:", folder, img_size=64)
    assert ours.pretrained
    plain_timm_reads_headless_files()
    plain = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=0, img_size=64,
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")), **ARGS)
    assert torch.equal(plain.patch_embed.proj.weight, ours.model.patch_embed.proj.weight)
    hub = timm.create_model(f"local-dir:{folder}", pretrained=True)  # architecture and args from config.json
    assert hub.num_classes == 0 and torch.equal(hub.patch_embed.proj.weight, plain.patch_embed.proj.weight)


def test_fp16_output_is_half_the_size_and_timm_upcasts_it(images, tmp_path):
    import timm

    full = run(images, tmp_path / "full", 2) / "model.safetensors"
    half = run(images, tmp_path / "half", 2, dtype="fp16") / "model.safetensors"
    assert half.stat().st_size < 0.6 * full.stat().st_size
    plain_timm_reads_headless_files()
    models = [timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=0, img_size=64,
                                pretrained_cfg_overlay=dict(file=str(file)), **ARGS) for file in (full, half)]
    assert models[1].patch_embed.proj.weight.dtype == torch.float32
    assert torch.equal(models[0].patch_embed.proj.weight.half().float(), models[1].patch_embed.proj.weight)


def test_global_random_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    from m4oe_adapters.pretrain import rng_states, set_rng_states

    torch.save({"rng": rng_states()}, tmp_path / "state.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_a_killed_pretraining_resumed_ends_with_the_same_weights(images, tmp_path):
    import safetensors.torch

    # On the CPU: GPU kernels (atomics in convolution backward) are not bit-deterministic, so two straight CUDA
    # runs already differ in the last bits (seen on an H200); the resume logic is the same on every device.
    straight = run(images, tmp_path / "straight", 12, device="cpu")

    class Killed(Exception):
        pass

    def kill_at_7(step, loss):
        if step == 7:  # checkpoint at 5: steps 6-7 are redone after the restart
            raise Killed

    with pytest.raises(Killed):
        run(images, tmp_path / "killed", 12, on_step=kill_at_7, device="cpu")
    resumed = run(images, tmp_path / "killed", 12, resume=True, device="cpu")
    a = safetensors.torch.load_file(str(straight / "model.safetensors"))
    b = safetensors.torch.load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_excluded_sites_are_never_read_and_the_backbone_records_the_list(tmp_path):
    """A manifest with two sites: pretraining with --exclude-sites B sees only site A's images, and the backbone's
    config.json and images.txt say so."""
    from m4oe_adapters.cli import main

    rows = ["dataset,modality,site,image,mask,split_hint"]
    for site in ("A", "B"):
        (tmp_path / site).mkdir()
        for index in range(3):
            picture = (np.random.default_rng(index).uniform(0, 255, (64, 64))).astype(np.uint8)
            Image.fromarray(picture).save(tmp_path / site / f"{site}{index}.png")
            rows.append(f"set{site},xray,{site},{site}/{site}{index}.png,,")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["pretrain", str(tmp_path / "manifest.csv"), "--out", str(out), "--exclude-sites", "B",
                 "--model-args", json.dumps(ARGS), "--img-size", "64", "--crop-size", "64", "--batch", "2",
                 "--steps", "2", "--threads", "1", "--no-progress"]) == 0
    provenance = json.loads((out / "backbone" / "config.json").read_text())["m4oe"]
    assert provenance["excluded_sites"] == ["B"] and provenance["excluded_entries"] == {"setB": 3}
    assert provenance["data"] == {"setA": 3}
    assert sorted((out / "backbone" / "images.txt").read_text().split()) == ["A/A0.png", "A/A1.png", "A/A2.png"]


def test_pretraining_cuts_volumes_along_the_axis_it_is_given(images):
    from m4oe_adapters.pretrain import collect_images

    def slices(**kwargs):
        found, _ = collect_images([images], in_chans=1, log=lambda _: None, **kwargs)
        return sorted(image.name for image in found if "vol.nii.gz#" in image.name)

    assert len(slices()) == 3  # 64 x 64 x 3, isotropic: the shortest axis
    along_first = slices(slice_axis=0)
    assert len(along_first) == 64
