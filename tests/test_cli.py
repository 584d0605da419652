"""The m4oe command line end to end on synthetic images: train, inspect, predict, eval, the protocol, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m4oe_adapters.cli import main
from m4oe_adapters.runtime import available_devices

TINY = ["--backbone", "timm:swin_tiny_patch4_window7_224", "--weights", "none", "--in-chans", "1",
        "--model-args", '{"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}']


def write_site(folder, count, seed, brightness):
    """Grey discs on noise; ``brightness`` differs between sites (a domain shift)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    yy, xx = np.mgrid[0:80, 0:96]
    for index in range(count):
        cy, cx, r = rng.uniform(25, 55), rng.uniform(25, 70), rng.uniform(10, 18)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.uint8)
        image = np.clip(60 + brightness * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"s{seed}_{index}.png")
        Image.fromarray(mask * 255).save(folder / "masks" / f"s{seed}_{index}_mask.png")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    write_site(root / "A", 8, 1, 120)
    write_site(root / "B", 4, 2, 80)
    rows = ["dataset,modality,site,image,mask,split_hint"]
    for site in ("A", "B"):
        for image in sorted((root / site / "images").iterdir()):
            rows.append(f"synthetic,xray,{site},{site}/images/{image.name},{site}/masks/{image.stem}_mask.png,")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def adapter(sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "xray.safetensors"
    code = main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "A",
                 "--steps", "30", "--batch", "4", "--size", "64", "--val", "2", "--val-every", "10",
                 "--lr", "3e-3", "--labels", "background,disc", "-o", str(out), "--no-progress"])
    assert code == 0
    return out


def test_train_writes_an_adapter_with_provenance(adapter, capsys):
    assert main(["inspect", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    meta = report["metadata"]
    assert meta["label_names"] == ["background", "disc"]
    assert meta["provenance"]["sites"] == ["A"] and meta["provenance"]["num_labelled_images"] == 6
    assert meta["backbone"]["pretrained"] is False and meta["metrics"]["val_dice"] is not None
    # m4oe train signs what it writes: the signature is fitted on the training + validation images
    fitted = meta["provenance"]["num_labelled_images"] + meta["provenance"]["num_validation_images"]
    assert meta["routing"]["images"] == fitted == len(meta["routing"]["image_hashes"]) == 8
    assert report["routing_signature_bytes"] > 0


def test_predict_writes_masks_of_the_same_size_and_overlays(adapter, sites, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(sites / "B" / "images"), "--adapter", str(adapter), *TINY, "--out", str(out),
                 "--overlay"]) == 0
    masks = sorted(out.glob("*_mask.png"))
    assert len(masks) == 4 and len(list(out.glob("*_overlay.png"))) == 4
    source = Image.open(sites / "B" / "images" / masks[0].name.replace("_mask", ""))
    assert Image.open(masks[0]).size == source.size


@pytest.mark.parametrize("device", available_devices())
def test_predict_on_each_device_and_in_bf16_gives_the_fp32_masks(adapter, sites, tmp_path, device):
    """`m4oe predict --device D --precision bf16`: the model runs there, the masks come back to the input's grid and
    agree with the fp32 CPU masks on nearly every pixel (bf16 keeps 8 bits of mantissa: a pixel near 0.5 may flip)."""
    reference, other = tmp_path / "fp32", tmp_path / device
    assert main(["predict", str(sites / "B" / "images"), "--adapter", str(adapter), *TINY, "--out", str(reference),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["predict", str(sites / "B" / "images"), "--adapter", str(adapter), *TINY, "--out", str(other),
                 "--device", device, "--precision", "bf16", "--no-progress"]) == 0
    for mask in sorted(reference.glob("*_mask.png")):
        expected, got = np.asarray(Image.open(mask)), np.asarray(Image.open(other / mask.name))
        assert got.shape == expected.shape and (got == expected).mean() > 0.98, mask.name


def test_predict_with_flip_tta_gives_a_mirrored_image_the_mirrored_mask(adapter, sites, tmp_path):
    """`m4oe predict --tta flip` averages the image and its left-right mirror, so mirroring the input mirrors the
    mask exactly; without it the two masks differ (the premise that makes this test able to fail)."""
    source = sorted((sites / "B" / "images").iterdir())[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = Image.open(source)
    image.save(inputs / "plain.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(inputs / "mirrored.png")
    masks = {}
    for tta in ("none", "flip"):
        out = tmp_path / tta
        assert main(["predict", str(inputs), "--adapter", str(adapter), *TINY, "--out", str(out), "--tta", tta,
                     "--no-progress"]) == 0
        masks[tta] = [np.asarray(Image.open(out / f"{name}_mask.png")) for name in ("plain", "mirrored")]
    plain, mirrored = masks["flip"]
    assert np.array_equal(plain, mirrored[:, ::-1])
    plain, mirrored = masks["none"]
    assert not np.array_equal(plain, mirrored[:, ::-1])


def test_predict_threshold_grows_the_mask_below_one_half_and_is_checked(adapter, sites, tmp_path, capsys):
    """`m4oe predict --threshold t`: at 0.5 the two-class argmax; lower, every pixel of it and more."""
    masks = {}
    for threshold in (None, "0.5", "0.05", "otsu"):
        out = tmp_path / str(threshold)
        extra = [] if threshold is None else ["--threshold", threshold]
        assert main(["predict", str(sites / "B" / "images"), "--adapter", str(adapter), *TINY, "--out", str(out),
                     "--no-progress", *extra]) == 0
        masks[threshold] = np.stack([np.asarray(Image.open(p)) > 0 for p in sorted(out.glob("*_mask.png"))])
    assert np.array_equal(masks["0.5"], masks[None])
    assert (masks["0.05"] >= masks[None]).all() and masks["0.05"].sum() > masks[None].sum()
    assert masks["otsu"].shape == masks[None].shape and not np.array_equal(masks["otsu"], masks[None])
    with pytest.raises(SystemExit):
        main(["predict", str(sites / "B" / "images"), "--adapter", str(adapter), *TINY, "--out",
              str(tmp_path / "bad"), "--threshold", "1.5"])
    assert "must lie strictly between 0 and 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_predict_a_nifti_volume_keeps_its_affine(adapter, tmp_path):
    import nibabel

    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    volume = np.random.default_rng(0).integers(0, 200, (80, 96, 3)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
    assert main(["predict", str(tmp_path / "vol.nii.gz"), "--adapter", str(adapter), *TINY,
                 "--out", str(tmp_path / "out")]) == 0
    result = nibabel.load(tmp_path / "out" / "vol_mask.nii.gz")
    assert result.shape == volume.shape
    np.testing.assert_allclose(result.affine, affine)


def test_predict_skips_and_reports_a_broken_file(adapter, sites, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    Image.open(next((sites / "B" / "images").iterdir())).save(folder / "good.png")
    assert main(["predict", str(folder), "--adapter", str(adapter), *TINY, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "SKIPPED" in captured.err and "broken.png" in captured.err and "1 segmented, 0 unknown, 1 skipped" in captured.out


def test_eval_reports_dice_per_site_well_above_trivial(adapter, sites, tmp_path):
    out = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--adapter",
                 str(adapter), "--out", str(out)]) == 0
    document = json.loads((out / "metrics.json").read_text())
    by_site = {row["site"]: row["dice"] for row in document["summary"]}
    assert set(by_site) == {"A", "B"}
    assert by_site["A"] > 0.5  # an all-background mask scores 0, all-foreground about 0.2 here
    for name in ("report.md", "metrics.csv", "overlay_best.png", "overlay_worst.png", "dice_per_site.png"):
        assert (out / name).is_file()


def test_site_generalisation_protocol_tables_every_mode(sites, tmp_path):
    out = tmp_path / "protocol"
    assert main(["eval", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--train-sites", "A",
                 "--test-sites", "B", "--modes", "experts,decoder,scratch", "--shots", "3", "--steps", "4",
                 "--size", "64", "--batch", "2", "--val", "1", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert {(row["mode"], row["domain"]) for row in summary} == {
        (mode, domain) for mode in ("experts", "decoder", "scratch") for domain in ("in", "out")
    }
    assert "Site generalisation" in (out / "report.md").read_text()


def test_bad_adapter_gives_a_one_line_error_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    assert "x.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_train_command_completes_under_torchrun_and_rank_0_writes_the_adapter(sites, tmp_path):
    """The CLI path under torchrun; the weights themselves are checked against a one-process run in
    tests/test_training.py."""
    out = tmp_path / "ddp.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "m4oe_adapters.cli", "train", *TINY, "--data", str(sites / "manifest.csv"), "--modality",
               "xray", "--sites", "A", "--steps", "4", "--batch", "2", "--size", "64", "--val", "2",
               "-o", str(out), "--no-progress", "--device", "cpu"]  # two processes: a one-GPU machine has one GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "wrote" in result.stdout


def test_train_and_eval_run_in_bf16_with_checkpointing_on_the_chosen_device(adapter, sites, tmp_path, capsys):
    out = tmp_path / "bf16.safetensors"
    assert main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "A",
                 "--steps", "2", "--batch", "2", "--size", "64", "--val", "2", "--val-every", "2",
                 "--precision", "bf16", "--gradient-checkpointing", "--device", "auto", "-o", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["dtype"] == "fp32"  # parameters stay fp32
    report = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--adapter",
                 str(adapter), "--sites", "A", "--precision", "bf16", "--device", "cpu", "--out", str(report)]) == 0
    assert (report / "metrics.json").is_file()
    assert main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "A",
                 "--steps", "1", "--size", "64", "--device", "tpu", "-o", str(tmp_path / "x.safetensors"),
                 "--no-progress"]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "zoo list"])
def test_light_commands_do_not_import_torch_monai_transformers_timm_or_peft(adapter, command):
    # Each in a fresh process: `m4oe inspect FILE` and `m4oe zoo list` start in a fraction of a second because they
    # import none of these (torch alone takes seconds to import).
    arguments = ["inspect", str(adapter)] if command == "inspect" else ["zoo", "list"]
    code = ("import sys; import m4oe_adapters.cli; from m4oe_adapters.cli import main; "
            f"assert main({arguments!r}) == 0; "
            "print(sorted(m for m in ('torch', 'monai', 'transformers', 'timm', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_imports_without_torch_and_resolves_each_public_name_on_first_use():
    code = ("import sys, m4oe_adapters; "
            "from m4oe_adapters import AdapterFormatError, DecoderConfig, ExpertConfig, inspect_adapter; "
            "light = 'torch' not in sys.modules; "
            "from m4oe_adapters import *; import m4oe_adapters.adapter_file as adapter_file; "
            "assert all(name in dir(m4oe_adapters) and name in globals() for name in m4oe_adapters.__all__); "
            "assert m4oe_adapters.inspect_adapter is adapter_file.inspect_adapter; "
            "assert m4oe_adapters.load_adapter is adapter_file.load_adapter; "
            "print(light, len(m4oe_adapters.__all__), hasattr(m4oe_adapters, 'no_such_name'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "27", "False"]


def test_train_init_takes_the_zoos_reference_backbone_or_names_the_fingerprint_needed(adapter, tmp_path):
    import argparse
    from pathlib import Path

    from m4oe_adapters import ConfigError
    from m4oe_adapters.commands.common import backbone_from_init_adapter
    from m4oe_adapters.zoo import default_zoo

    zoo_adapter = default_zoo() / "fundus.safetensors"
    if zoo_adapter.is_file():
        args = argparse.Namespace(backbone=None, weights=None, in_chans=None, init=str(zoo_adapter))
        backbone_from_init_adapter(args)
        assert args.backbone.startswith("timm:") and Path(args.weights).is_dir() and args.in_chans == 3
    args = argparse.Namespace(backbone=None, weights=None, in_chans=None, init=str(adapter))  # random backbone
    with pytest.raises(ConfigError, match="fingerprint") as error:
        backbone_from_init_adapter(args)
    assert str(adapter) in str(error.value) and "--weights" in str(error.value)
    code = main(["train", "--data", "x.csv", "--modality", "xray", "-o", str(tmp_path / "a.safetensors"),
                 "--no-progress"])
    assert code == 2  # neither --backbone/--weights nor --init: a one-line error, not a traceback


@pytest.mark.parametrize("val, expected_val", [([], 0), (["--val", "2"], 2), (["--val", "9"], 3)])
def test_shots_5_trains_on_all_5_images_and_validates_only_on_other_images(sites, tmp_path, capsys, val,
                                                                          expected_val):
    out = tmp_path / "few.safetensors"
    code = main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "A",
                 "--shots", "5", *val, "--steps", "2", "--batch", "2", "--size", "64", "-o", str(out),
                 "--no-progress"])
    assert code == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("training on 5 labelled images (--shots 5)")
    assert main(["inspect", str(out), "--json"]) == 0
    provenance = json.loads(capsys.readouterr().out)["metadata"]["provenance"]
    # site A has 8 images: the 5 shots all train; validation comes only from the 3 others, and only when asked
    assert provenance["num_labelled_images"] == 5
    assert provenance["num_validation_images"] == expected_val


def test_starting_adapter_is_kept_unchanged_when_no_step_validates_better(sites, tmp_path, capsys):
    """With --init the adapter as it starts is a candidate (step 0): validation keeps it when training never beats
    it, and --val-from-shots can choose 0 steps. A learning rate of 0 makes every step equal to the start, so the
    start must win (a later step has to be strictly better)."""
    from m4oe_adapters.adapter_file import read_adapter

    source = tmp_path / "source.safetensors"
    common = ["--data", str(sites / "manifest.csv"), "--modality", "xray", "--batch", "2", "--size", "64",
              "--no-progress"]
    assert main(["train", *TINY, *common, "--sites", "B", "--steps", "2", "-o", str(source)]) == 0
    kept = tmp_path / "kept.safetensors"
    assert main(["train", *TINY, *common, "--sites", "A", "--init", str(source), "--shots", "4", "--val", "2",
                 "--steps", "4", "--val-every", "2", "--lr", "0", "-o", str(kept)]) == 0
    assert "no step beat the starting adapter" in capsys.readouterr().out
    chosen = tmp_path / "cv.safetensors"
    assert main(["train", *TINY, *common, "--sites", "A", "--init", str(source), "--shots", "4",
                 "--val-from-shots", "2", "--steps", "4", "--val-every", "2", "--lr", "0", "-o", str(chosen)]) == 0
    printed = capsys.readouterr().out
    assert "kept unchanged" in printed and "best steps [0, 0]" in printed
    starts = [line for line in printed.splitlines() if line.startswith("training on 4 labelled images")]
    assert starts == ["training on 4 labelled images (--shots 4), no validation images: 2-fold cross-validation over "
                      "them chooses the steps"]
    _, start = read_adapter(source)
    for path in (kept, chosen):
        metadata, tensors = read_adapter(path)
        for key in start:
            if key.startswith(("experts.", "decoder.")):
                assert torch.equal(tensors[key], start[key]), (path.name, key)
    assert metadata["provenance"]["steps"] == 0 and metadata["provenance"]["cross_validation"]["chosen_steps"] == 0


def test_more_shots_than_images_is_a_one_line_error(sites, tmp_path, capsys):
    code = main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "B",
                 "--shots", "5", "--steps", "2", "-o", str(tmp_path / "x.safetensors"), "--no-progress"])
    assert code == 2
    assert "--shots 5: only 4 labelled images" in capsys.readouterr().err


def test_val_from_shots_chooses_the_steps_by_cross_validation_and_trains_on_every_shot(sites, tmp_path, capsys):
    out = tmp_path / "cv.safetensors"
    code = main(["train", *TINY, "--data", str(sites / "manifest.csv"), "--modality", "xray", "--sites", "A",
                 "--shots", "4", "--val-from-shots", "2", "--steps", "4", "--val-every", "2", "--batch", "2",
                 "--size", "64", "-o", str(out), "--no-progress"])
    assert code == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    provenance = json.loads(capsys.readouterr().out)["metadata"]["provenance"]
    cross_validation = provenance["cross_validation"]
    assert cross_validation["folds"] == 2 and len(cross_validation["best_steps"]) == 2
    assert all(step in (2, 4) for step in cross_validation["best_steps"])
    assert provenance["steps"] == cross_validation["chosen_steps"]
    assert provenance["num_labelled_images"] == 4 and provenance["num_validation_images"] == 0
