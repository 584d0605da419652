"""Does site augmentation make a DRIVE-trained fundus adapter hold at CHASE_DB1? Resumable, one row per run.

    python examples/augment_compare.py --out runs/augment_fundus [--seeds 0,1,2] [--variants basic,site]

Each run trains the fundus recipe the few-label study starts from (clean backbone, DRIVE training split, 16 train /
4 validation images, native-resolution crops, 150 steps, validation every 25, scale recorded) with one
``--augment`` variant and one seed, then scores it on the 20 DRIVE test images (in-domain) and on all 28 CHASE_DB1
images (zero-shot; the clean backbone never saw CHASE_DB1, no CHASE_DB1 image is used to choose anything). Rows go
to ``OUT/results.csv`` (variant, seed, site, Dice and its 95 % CI over images, HD95, seconds).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from _runs import run  # examples/_runs.py

BACKBONE = ["--backbone", "timm:swin_tiny_patch4_window7_224", "--weights", "adapters_zoo/backbone"]
FIELDS = ["variant", "seed", "site", "dice", "dice_low", "dice_high", "hd95", "images", "train_s", "eval_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="basic,site")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    done = set()
    if results.is_file():
        done = {(r["variant"], r["seed"]) for r in csv.DictReader(open(results))}
    else:
        with open(results, "w", newline="") as stream:
            csv.DictWriter(stream, fieldnames=FIELDS).writeheader()
    m4oe = [sys.executable, "-m", "m4oe_adapters.cli"]
    for seed in args.seeds.split(","):
        for variant in args.variants.split(","):
            if (variant, seed) in done:
                continue
            name = f"{variant}_s{seed}"
            adapter = out / f"{name}.safetensors"
            train_s = 0.0
            if not adapter.is_file():
                train_s = run(m4oe + ["train", *BACKBONE, "--data", args.data, "--modality", "fundus", "--sites",
                                      "DRIVE", "--split", "train", "--steps", str(args.steps), "--val-every", "25",
                                      "--augment", variant, "--seed", seed, "--no-progress", "-o", str(adapter)],
                              out / f"{name}.train.log")
            rows = []
            for site, extra in (("DRIVE", ["--sites", "DRIVE", "--split", "test"]), ("CHASE_DB1", ["--sites", "CHASE_DB1"])):
                report = out / f"{name}_{site}"
                eval_s = run(m4oe + ["eval", *BACKBONE, "--data", args.data, "--modality", "fundus", *extra,
                                     "--adapter", str(adapter), "--out", str(report), "--no-progress"],
                             out / f"{name}_{site}.eval.log")
                summary = json.load(open(report / "metrics.json"))["summary"][0]
                rows.append({"variant": variant, "seed": seed, "site": site, "images": summary["images"],
                             "train_s": round(train_s), "eval_s": round(eval_s),
                             **{f: round(summary[f], 4) for f in ("dice", "dice_low", "dice_high", "hd95")}})
            with open(results, "a", newline="") as stream:
                csv.DictWriter(stream, fieldnames=FIELDS).writerows(rows)
            print(rows, flush=True)


if __name__ == "__main__":
    main()
