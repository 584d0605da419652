"""Everything `m4oe` writes, `m4oe` reads: each training mode's file through inspect, eval --adapter and predict;
flags that do not apply to a mode refused; --init inherits the recipe; PEFT folders import; --help shows defaults."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from m4oe_adapters.cli import COMMANDS, build_parser, main

from test_cli import TINY, write_site

SMALL = ["--steps", "2", "--batch", "2", "--size", "64", "--val", "1", "--no-progress", "--labels", "background,disc"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    write_site(root / "A", 4, 1, 120)
    rows = ["dataset,modality,site,image,mask,split_hint"]
    for image in sorted((root / "A" / "images").iterdir()):
        rows.append(f"synthetic,xray,A,A/images/{image.name},A/masks/{image.stem}_mask.png,")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def train(data, out, *extra):
    return main(["train", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", *SMALL, "-o", str(out),
                 *extra])


@pytest.mark.parametrize("mode", ["decoder", "lora", "full", "scratch"])
def test_every_training_mode_writes_a_file_inspect_eval_and_predict_accept(mode, data, tmp_path, capsys):
    path = tmp_path / f"{mode}.safetensors"
    assert train(data, path, "--mode", mode) == 0
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert meta["mode"] == mode and meta["label_names"] == ["background", "disc"]
    assert (meta["backbone"] is None) == (mode == "scratch")
    assert main(["inspect", str(path)]) == 0 and f"mode            {mode}" in capsys.readouterr().out
    report = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", "--adapter", str(path),
                 "--out", str(report), "--no-progress"]) == 0
    rows = json.loads((report / "metrics.json").read_text())["images"]
    assert {row["mode"] for row in rows} == {mode} and {"background", "disc"} & {row["label"] for row in rows}
    out = tmp_path / "pred"
    assert main(["predict", str(data / "A" / "images"), "--adapter", str(path), *TINY, "--out", str(out)]) == 0
    masks = sorted(out.glob("*_mask.png"))
    assert len(masks) == 4
    assert Image.open(masks[0]).size == Image.open(next((data / "A" / "images").iterdir())).size


def test_a_baseline_file_reloads_with_identical_outputs(tmp_path):
    from m4oe_adapters.model import ModalityInfo
    from m4oe_adapters.segmenter_file import load_segmenter, save_baseline
    from m4oe_adapters.segmenters import build_segmenter

    from conftest import tiny_backbone

    for mode in ("lora", "full", "scratch"):
        segmenter = build_segmenter(mode, lambda: tiny_backbone(), "CT", 3, in_chans=1)
        with torch.no_grad():  # what training would change, and only that
            for parameter in segmenter.trainable_parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        segmenter.eval()
        info = ModalityInfo("CT", 3, ["background", "a", "b"], {}, [64, 64], {"resize_mode": "crop"}, {})
        path = save_baseline(segmenter, info, tmp_path / f"{mode}.safetensors")
        loaded = load_segmenter(path, backbone=None if mode == "scratch" else tiny_backbone())
        x = torch.randn(2, 1, 64, 64)
        assert loaded.mode == mode and loaded.info.label_names == ["background", "a", "b"]
        torch.testing.assert_close(loaded(x), segmenter(x), rtol=1e-5, atol=1e-5)


def test_a_lora_file_on_another_backbone_is_refused(tmp_path):
    from m4oe_adapters import BackboneMismatchError
    from m4oe_adapters.model import ModalityInfo
    from m4oe_adapters.segmenter_file import load_segmenter, save_baseline
    from m4oe_adapters.segmenters import build_segmenter

    from conftest import tiny_backbone

    segmenter = build_segmenter("lora", lambda: tiny_backbone(seed=0), "CT", 2, in_chans=1)
    path = save_baseline(segmenter, ModalityInfo("CT", 2, ["background", "a"]), tmp_path / "lora.safetensors")
    with pytest.raises(BackboneMismatchError, match="lora.safetensors"):
        load_segmenter(path, backbone=tiny_backbone(seed=1))


@pytest.mark.parametrize("mode,flag", [("scratch", ["--init", "x.safetensors"]), ("lora", ["--init", "x.safetensors"]),
                                       ("scratch", ["--rank", "4"]), ("full", ["--targets", "qkv"])])
def test_flags_that_do_not_apply_to_a_mode_are_refused(mode, flag, data, tmp_path, capsys):
    assert train(data, tmp_path / "f.safetensors", "--mode", mode, *flag) == 2
    assert f"does not apply to --mode {mode}" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()


def test_init_inherits_the_recipe_and_says_what_it_inherited_and_changed(data, tmp_path, capsys):
    first = tmp_path / "first.safetensors"
    assert train(data, first, "--resize", "resize", "--rank", "4") == 0
    second = tmp_path / "second.safetensors"
    assert main(["train", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", "--steps", "2",
                 "--batch", "2", "--val", "1", "--no-progress", "--init", str(first), "-o", str(second)]) == 0
    out = capsys.readouterr().out
    assert "recipe inherited from first.safetensors" in out and "resize_mode resize" in out and "size 64x64" in out
    capsys.readouterr()
    main(["inspect", str(second), "--json"])
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert meta["provenance"]["resize_mode"] == "resize" and meta["input_size"] == [64, 64]
    assert meta["expert"]["rank"] == 4
    third = tmp_path / "third.safetensors"
    assert main(["train", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", "--steps", "2",
                 "--batch", "2", "--val", "1", "--no-progress", "--init", str(first), "--resize", "crop",
                 "-o", str(third)]) == 0
    assert "changed by flags: resize_mode resize -> crop" in capsys.readouterr().out
    assert main(["train", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", *SMALL,
                 "--init", str(first), "--rank", "8", "-o", str(tmp_path / "fourth.safetensors")]) == 2
    assert "rank 4" in capsys.readouterr().err
    scratch = tmp_path / "scratch.safetensors"
    assert train(data, scratch, "--mode", "scratch") == 0
    assert train(data, tmp_path / "fifth.safetensors", "--init", str(scratch)) == 2
    assert "a scratch-mode file" in capsys.readouterr().err


def test_val_0_says_the_final_weights_were_saved(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", "--steps", "2",
                 "--batch", "2", "--size", "64", "--val", "0", "--no-progress", "-o", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "weights after the last step (2) were saved" in out and "n/a" not in out


def test_a_peft_folder_imports_as_an_adapter_every_command_reads(tmp_path, capsys):
    from m4oe_adapters import save_adapter
    from m4oe_adapters.adapter_file import read_adapter
    from m4oe_adapters.peft_interop import export_peft

    from conftest import tiny_model

    source = tiny_model(modalities=("CT",), rank=4)
    save_adapter(source, "CT", tmp_path / "ct.safetensors")
    export_peft(source, "CT", tmp_path / "peft")
    out = tmp_path / "imported.safetensors"
    assert main(["import-peft", str(tmp_path / "peft"), "-o", str(out), "--modality", "CT", *TINY]) == 0
    assert "decoder is untrained" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    their_meta, theirs = read_adapter(out)
    our_meta, ours = read_adapter(tmp_path / "ct.safetensors")
    their_scale, our_scale = (meta["expert"]["alpha"] / meta["expert"]["rank"] for meta in (their_meta, our_meta))
    for key in (k for k in ours if k.endswith("lora_B")):  # the same weight update (alpha/rank) B A
        a_key = key[: -len("lora_B")] + "lora_A"
        torch.testing.assert_close(their_scale * theirs[key] @ theirs[a_key], our_scale * ours[key] @ ours[a_key],
                                   rtol=1e-4, atol=1e-6)
    assert main(["import-peft", str(tmp_path / "peft"), "-o", str(out), "--modality", "CT", *TINY]) == 2


def test_every_subcommand_help_shows_its_defaults():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(COMMANDS) <= set(subparsers)
    train_help = subparsers["train"].format_help()
    for text in ("(default: 300)", "(default: 4)", "default crop", "(default: 0.002)"):
        assert text in train_help, text
    eval_help = subparsers["eval"].format_help()
    assert "(default: 300)" in eval_help and "(default: crop)" in eval_help
    computing = set(COMMANDS) - {"inspect", "zoo", "backbone", "export-peft", "import-peft"}
    for name in computing:  # every command that runs a model takes --threads
        assert "--threads" in subparsers[name].format_help(), name
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in sub.formatter_class(name)._get_help_string(action).lower() or \
                    "default" in (action.help or "").lower(), (name, action.option_strings)


def test_protocol_reports_label_names_and_training_counts_and_saves_usable_files(data, tmp_path, capsys):
    write_site(tmp_path / "B", 2, 5, 80)  # an unseen site
    rows = (data / "manifest.csv").read_text().replace(",A/", f",{data}/A/").splitlines()
    rows += [f"synthetic,xray,B,B/images/{p.name},B/masks/{p.stem}_mask.png,"
             for p in sorted((tmp_path / "B" / "images").iterdir())]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out, saved = tmp_path / "protocol", tmp_path / "saved"
    assert main(["eval", *TINY, "--data", str(manifest), "--modality", "xray", "--train-sites", "A", "--test-sites",
                 "B", "--modes", "experts,scratch", "--steps", "2", "--size", "64", "--batch", "2", "--val", "1",
                 "--labels", "background,disc", "--save-adapters", str(saved), "--out", str(out),
                 "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "| disc |" in report and "class_1" not in report
    assert "training images (validation images) per run: experts all shots: 2 (1); scratch all shots: 2 (1)" in report
    for path in sorted(saved.iterdir()):
        assert main(["inspect", str(path)]) == 0


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "a.safetensors", "--steps", "5"], "--steps only applies to the protocol"),
    (["--adapter", "a.safetensors", "--modes", "lora", "--seed", "1"], "--modes, --seed only apply to the protocol"),
    (["--train-sites", "A", "--test-sites", "B", "--adapter-scale", "fov_diameter_px:540"],
     "--adapter-scale applies only when evaluating an --adapter"),
    (["--train-sites", "A", "--test-sites", "B", "--tta", "flips"], "--tta applies only when evaluating an --adapter"),
    (["--train-sites", "A", "--test-sites", "B", "--threshold", "0.3"],
     "--threshold applies only when evaluating an --adapter"),
    (["--train-sites", "A", "--test-sites", "B", "--modes", "full,scratch", "--rank", "4"],
     "--rank does not apply to --modes full,scratch"),
    (["--train-sites", "A", "--test-sites", "B", "--adapter", "a.safetensors"], "give one of them"),
])
def test_eval_refuses_flags_of_the_job_it_is_not_doing(extra, message, data, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(data / "manifest.csv"), "--modality", "xray", *extra,
                 "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eval_refuses_a_threshold_for_an_adapter_of_more_than_two_classes(data, tmp_path, capsys):
    from m4oe_adapters.peft_interop import export_peft

    from conftest import tiny_model

    export_peft(tiny_model(modalities=("CT",)), "CT", tmp_path / "peft")
    adapter = tmp_path / "mri.safetensors"  # on the command line's backbone, with 3 classes
    assert main(["import-peft", str(tmp_path / "peft"), "-o", str(adapter), "--modality", "MRI", "--classes", "3",
                 *TINY]) == 0
    out = tmp_path / "report"
    assert main(["eval", *TINY, "--data", str(data / "manifest.csv"), "--modality", "MRI", "--adapter", str(adapter),
                 "--threshold", "0.3", "--out", str(out)]) == 2
    assert "--threshold applies to two-class adapters" in capsys.readouterr().err
    assert not out.exists()


def test_a_volume_given_to_predict_shows_a_bar_over_its_slices(tmp_path, capsys):
    import h5py

    root = tmp_path / "d"
    write_site(root / "A", 4, 1, 120)
    rows = ["dataset,modality,site,image,mask,split_hint"]
    rows += [f"synthetic,MRI,A,A/images/{p.name},A/masks/{p.stem}_mask.png," for p in sorted((root / "A" / "images").iterdir())]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    adapter = tmp_path / "mri.safetensors"
    assert main(["train", *TINY, "--data", str(root / "manifest.csv"), "--modality", "MRI", "--steps", "1", "--batch",
                 "2", "--size", "32", "--val", "0", "--no-progress", "-o", str(adapter)]) == 0
    with h5py.File(tmp_path / "v.h5", "w") as handle:
        handle["image"] = np.random.default_rng(0).integers(0, 200, (40, 40, 7)).astype(np.float32)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "v.h5"), "--adapter", str(adapter), *TINY,
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "v.h5" in err and "/7 " in err and "slice" in err  # a bar over the 7 slices (cleared when done)


def test_train_with_site_augmentation_records_it_in_the_adapter(data, tmp_path, capsys):
    path = tmp_path / "site.safetensors"
    assert train(data, path, "--augment", "site") == 0
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["provenance"]["augment"] == "site"
