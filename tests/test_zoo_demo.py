"""The zoo index and `m4oe zoo`, and `m4oe demo` on synthetic images (a tiny zoo built on the spot)."""
from __future__ import annotations

import json

import pytest
import torch

from m4oe_adapters import ExpertConfig, SegmentationModel, load_backbone, save_adapter
from m4oe_adapters.cli import main
from m4oe_adapters.pretrain import build_swin, save_backbone
from m4oe_adapters.zoo import sha256_file, write_index

ARGS = {"embed_dim": 16, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2], "window_size": 7}


@pytest.fixture
def tiny_zoo(tmp_path):
    zoo = tmp_path / "zoo"
    torch.manual_seed(0)
    folder = save_backbone(build_swin("swin_tiny_patch4_window7_224", 3, 224, ARGS), zoo / "backbone",
                           "swin_tiny_patch4_window7_224", ARGS, 3, 224, {"steps": 0, "images": 0})
    backbone = load_backbone("timm:swin_tiny_patch4_window7_224", folder)
    model = SegmentationModel(backbone, ExpertConfig(rank=4))
    adapters = []
    for name in ("fundus", "dermoscopy"):
        model.add_modality(name, 2, ["background", "target"], seed=1)
        model.modalities[name].provenance = {"sites": ["X"], "resize_mode": "resize"}
        adapters.append(save_adapter(model, name, zoo / f"{name}.safetensors", dtype="fp16"))
    write_index(zoo, {"spec": "timm:swin_tiny_patch4_window7_224", "path": "backbone", "img_size": 224,
                      "fingerprint": backbone.fingerprint(), "sha256": sha256_file(folder / "model.safetensors"),
                      "description": "tiny test backbone"}, adapters)
    return zoo


def test_zoo_list_info_and_verify(tiny_zoo, capsys):
    assert main(["zoo", "list", "--zoo", str(tiny_zoo)]) == 0
    assert "fundus" in capsys.readouterr().out
    assert main(["zoo", "info", "dermoscopy", "--zoo", str(tiny_zoo)]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["background", "target"]
    assert main(["zoo", "verify", "--zoo", str(tiny_zoo)]) == 0
    assert "3 ok, 0 bad" in capsys.readouterr().out


def test_zoo_verify_catches_a_modified_adapter(tiny_zoo, capsys):
    path = tiny_zoo / "fundus.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert main(["zoo", "verify", "--zoo", str(tiny_zoo)]) == 1
    assert "sha256 differs" in capsys.readouterr().out


def test_demo_runs_on_synthetic_images_and_says_so(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("M4OE_DATA", str(tmp_path / "no_data_here"))
    out = tmp_path / "demo"
    assert main(["demo", "--zoo", str(tiny_zoo), "--out", str(out), "--steps", "3", "--shots", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "mixed-modality batch" in report
    assert len(list(out.glob("batch_*.png"))) == 2


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_serve_bench_measures_the_model_alone_on_the_services_device(tiny_zoo, device):
    """serve-bench's "model alone" ceiling ran on the CPU whatever --device said (its GPU report showed a 16-core
    CPU's number as the GPU's); it now runs where the services run and says where."""
    from m4oe_adapters.serve.loadtest import _model_batching

    report = _model_batching(tiny_zoo, ["fundus", "dermoscopy"], 2, repeats=1, device=device)
    assert report["device"].startswith(device) and report["one_batch_s"] > 0


@pytest.mark.real_data
def test_the_demo_shows_each_zoo_adapter_an_image_its_builder_held_out():
    """`m4oe demo` says its batch holds images the adapters never trained on: each must be among the test images the
    zoo builder scored the adapter on (its report). The endoscopy adapter trains on two sites; the demo had kept
    splitting its first site alone and showed a CVC-ClinicDB frame it trained on."""
    import csv
    from pathlib import Path

    from m4oe_adapters.adapter_file import read_adapter
    from m4oe_adapters.data import data_root, read_manifest
    from m4oe_adapters.demo import held_out_sample

    manifest = data_root() / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"needs the shared data ({manifest})")
    zoo = Path(__file__).resolve().parents[1] / "adapters_zoo"
    samples = read_manifest(manifest, nonempty_slices=True)
    for path in sorted(zoo.glob("*.safetensors")):
        metadata, _ = read_adapter(path)
        name = metadata["modality"]

        class Info:  # what held_out_sample reads of a loaded modality
            provenance = metadata["provenance"]

        sample = held_out_sample(name, Info, samples)
        with open(zoo / "reports" / name / "metrics.csv", newline="") as stream:  # paths of the builder's machine
            tested = {Path(row["image"]).parts[-3:] for row in csv.DictReader(stream) if row["domain"] == "in"}
        assert sample is not None and Path(sample.image).parts[-3:] in tested, \
            f"{name}: {sample.image if sample else None} is not among its builder's test images"


def test_every_zoo_adapter_was_trained_with_the_recipe_recipes_py_holds_for_it():
    """One recipe per modality in one place: each zoo adapter's provenance names the recipe it was built with, and
    that is today's `m4oe_adapters/recipes.py` entry (fields added to Recipe since an adapter was built must hold
    their defaults there). Changing a recipe without rebuilding its adapter turns this red."""
    import dataclasses
    import types
    from pathlib import Path

    from m4oe_adapters.adapter_file import read_header
    from m4oe_adapters.presets import default_preset, known_modality
    from m4oe_adapters.recipes import RECIPES, Recipe

    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    zoo = Path(__file__).resolve().parents[1] / "adapters_zoo"
    for path in sorted(zoo.glob("*.safetensors")):
        metadata, _ = read_header(path)
        stored = metadata["provenance"]["recipe"]
        current = RECIPES[metadata["modality"]].as_metadata()
        for key, value in current.items():
            if key == "notes":
                continue
            if key == "preset" and key not in stored:  # built before recipes named presets: the one it used
                recipe = RECIPES[metadata["modality"]]
                sample = types.SimpleNamespace(modality=recipe.modality)
                made = value if value is not None else default_preset(known_modality(recipe.name, [sample]))
                assert made == metadata["preset"], f"{path.name}: recipes.py would build it with preset {made}"
                continue
            expected = stored[key] if key in stored else defaults[key]
            expected = list(expected) if isinstance(expected, tuple) else expected
            assert value == expected, f"{path.name}: recipe {key} is {value!r} in recipes.py, {expected!r} in the file"


def test_the_synthetic_serve_data_example_never_replaces_a_users_manifest_unasked(tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "synthetic_serve_data.py"
    main = runpy.run_path(str(script))["main"]
    (tmp_path / "manifest.csv").write_text("a user's manifest\n")
    assert main([str(tmp_path)]) == 2
    assert (tmp_path / "manifest.csv").read_text() == "a user's manifest\n"
    assert main([str(tmp_path), "--overwrite"]) == 0 and len(list(tmp_path.glob("*.png"))) == 9
