"""Build adapters_zoo/: per-modality adapters on the reference SimMIM backbone, each trained and scored with the
site-generalisation protocol (validation Dice; in-domain test Dice; unseen-site Dice where a second site exists).
Each adapter follows its recipe in m4oe_adapters/recipes.py (data, size, steps cap, early stopping, CPU budget).

    python examples/build_zoo.py --backbone runs/pretrain_ref/backbone --zoo adapters_zoo [--only fundus,xray]

The same script with ``--weights none`` (and ``--zoo runs/zoo_random``) trains the same adapters on the same
architecture with random weights, for the "does pretraining help" table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from m4oe_adapters import load_backbone
from m4oe_adapters.config import ExpertConfig
from m4oe_adapters.data import read_manifest
from m4oe_adapters.evaluation import write_outputs
from m4oe_adapters.protocol import run_protocol
from m4oe_adapters.recipes import RECIPES, recipe_for
from m4oe_adapters.zoo import sha256_file, write_index

ARCH = "timm:swin_tiny_patch4_window7_224"
MODEL_ARGS = {"embed_dim": 48, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="runs/pretrain_ref/backbone", help="backbone folder, or 'none'")
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--only", default=None, help="comma-separated recipe names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-test-images", type=int, default=8)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--index-only", action="store_true",
                        help="train nothing: rewrite index.json for the adapters already in --zoo (e.g. after "
                             "building parts of the zoo in separate folders, one process each, and moving them in)")
    parser.add_argument("--rescore", default=None,
                        help="comma-separated adapters of --zoo: recompute their test Dice from reports/NAME/metrics.csv "
                             "and rewrite it into the adapter's metadata (nothing is trained)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipes' step cap (cosine decay "
                        "runs over it); the adapter records the recipe it was trained with")
    parser.add_argument("--patience", type=int, default=None, help="override the recipes' patience (validations)")
    parser.add_argument("--augment", choices=["basic", "site"], default=None,
                        help="override the recipes' training augmentation")
    parser.add_argument("--preset", type=json.loads, default=None,
                        help='override the recipes\' intensity preset, JSON (e.g. \'{"kind": "clahe"}\')')
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="override the recipes' wall-time budget (a longer schedule on a shared CPU needs more)")
    args = parser.parse_args(argv)

    zoo = Path(args.zoo)
    zoo.mkdir(parents=True, exist_ok=True)
    samples = read_manifest(Path(args.data) / "manifest.csv", nonempty_slices=True)
    weights = None if args.weights == "none" else args.weights
    if weights is not None and Path(weights).resolve() != (zoo / "backbone").resolve():
        shutil.copytree(weights, zoo / "backbone", dirs_exist_ok=True)  # the zoo ships its backbone
        weights = zoo / "backbone"

    def backbone():
        return load_backbone(ARCH, weights, model_args=MODEL_ARGS, img_size=224)

    default = [name for name, recipe in RECIPES.items() if recipe.in_zoo]  # one adapter per modality
    names = [] if args.index_only or args.rescore else args.only.split(",") if args.only else default
    summary = {}
    for name in names:
        recipe = recipe_for(name)  # one recipe per modality: m4oe_adapters/recipes.py
        overrides = {key: value for key, value in (("max_steps", args.max_steps), ("patience", args.patience),
                                                   ("cpu_budget_minutes", args.max_minutes),
                                                   ("augment", args.augment), ("preset", args.preset))
                     if value is not None}
        recipe = dataclasses.replace(recipe, **overrides)
        members = [s for s in samples if s.dataset in recipe.datasets]
        started = time.perf_counter()
        rows, skipped = run_protocol(
            backbone, members, name, train_sites=list(recipe.train_sites),
            test_sites=list(recipe.unseen_sites), modes=["experts"], shots=[None],
            train_config=recipe.train_config(args.seed), in_chans=3, size=(recipe.size, recipe.size),
            resize_mode=recipe.resize_mode, val_count=recipe.val_count, expert_config=ExpertConfig(rank=recipe.rank),
            max_test_images=args.max_test_images, save_dir=zoo / "work", progress=False, preset=recipe.preset,
            augment=recipe.augment,
        )
        test_sites = list(recipe.unseen_sites)
        train_site = " + ".join(recipe.train_sites)
        in_domain, unseen = test_dice(rows)
        produced = zoo / "work" / f"{name}_experts_all.safetensors"
        final = zoo / f"{name}.safetensors"
        finalise(produced, final, in_domain, unseen, test_sites, args.dtype, weights, recipe.as_metadata())
        write_outputs(zoo / "reports" / name, rows, skipped, f"Zoo adapter {name}",
                      [f"trained on {train_site}; unseen sites: {', '.join(test_sites) or 'none available'}"])
        summary[name] = {"in_domain_dice": in_domain, "unseen_site_dice": unseen,
                         "seconds": time.perf_counter() - started}
        print(f"{name}: in-domain Dice {in_domain:.3f}, unseen-site Dice "
              f"{'n/a' if unseen is None else unseen}, {summary[name]['seconds']:.0f} s", flush=True)
    for name in args.rescore.split(",") if args.rescore else []:
        # Test Dice again from the report the build wrote (reports/NAME/metrics.csv), into the adapter's metadata.
        with open(zoo / "reports" / name / "metrics.csv", newline="") as handle:
            rows = [{**row, "dice": float(row["dice"])} for row in csv.DictReader(handle)]
        in_domain, unseen = test_dice(rows)
        final = zoo / f"{name}.safetensors"
        finalise(final, final, in_domain, unseen, list(recipe_for(name).unseen_sites), args.dtype, weights,
                 recipe_for(name).as_metadata())
        print(f"{name}: rescored from its report: in-domain Dice {in_domain:.4f}, unseen-site Dice {unseen}")
    shutil.rmtree(zoo / "work", ignore_errors=True)
    adapters = sorted(zoo.glob("*.safetensors"))
    if weights is not None:
        probe = backbone()
        config = json.loads((Path(weights) / "config.json").read_text())
        write_index(zoo, {
            "spec": ARCH, "path": "backbone", "img_size": 224, "fingerprint": probe.fingerprint(),
            "sha256": sha256_file(Path(weights) / "model.safetensors"),
            "description": f"SimMIM-pretrained Swin (embed 48, depths 2-2-6-2, {config['m4oe']['steps']} steps on "
                           f"{config['m4oe']['images']} shared-data images)",
        }, adapters)
    if summary:
        (zoo / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def test_dice(rows: list[dict]) -> tuple[float, float | None]:
    """Mean per-image Dice (mean over foreground classes) of the in-domain and of the unseen-site test images; for
    volumes each slice is an image (the per-volume rows, a 3D Dice, are left out, as in the report's site table)."""
    images = [row for row in rows if row["label"] == "mean" and row.get("level") != "volume"]
    in_domain = float(np.mean([row["dice"] for row in images if row["domain"] == "in"]))
    unseen = [row["dice"] for row in images if row["domain"] == "out"]
    return in_domain, float(np.mean(unseen)) if unseen else None


def finalise(produced: Path, final: Path, in_domain: float, unseen: float | None, test_sites, dtype, weights,
             recipe: dict | None = None):
    """Re-save the trained adapter with its test metrics and recipe in the metadata (and in the requested dtype)."""
    from m4oe_adapters.adapter_file import model_from_adapter, save_adapter

    model = model_from_adapter(produced, weights)
    name = next(iter(model.modalities))
    info = model.modalities[name]
    info.metrics = {**info.metrics, "in_domain_test_dice": round(in_domain, 4),
                    "unseen_site_dice": None if unseen is None else round(unseen, 4), "unseen_sites": test_sites}
    if recipe is not None:
        info.provenance = {**info.provenance, "recipe": recipe}
    save_adapter(model, name, final, dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
