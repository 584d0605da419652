"""Few-label site adaptation, DRIVE → CHASE_DB1 or CVC-ClinicDB → Kvasir-SEG (issue 14 item 5), resumable.

    python examples/fewshot_sweep.py --source SOURCE.safetensors --out runs/fewshot_fundus [--seeds 0,1,2]
    python examples/fewshot_sweep.py --task endoscopy --source ENDO.safetensors --out runs/fewshot_endoscopy

* Backbone: the clean reference backbone (``adapters_zoo/backbone``, never saw CHASE_DB1 or Kvasir-SEG).
* ``--task endoscopy-reverse`` (Kvasir-SEG → CVC-ClinicDB): the frames of every third video sequence of
  CVC-ClinicDB (3, 6, ..., 27) are the test set, the other 20 sequences the pool (split by video, never by frame).
* ``--task fundus``: CHASE_DB1 split by child (both eyes of a child stay together): children 01–07 are the pool the
  k labelled images are drawn from (``--shots k --seed s`` picks them), children 08–14 (14 images) are the test set,
  never trained or validated on. ``--task endoscopy``: Kvasir-SEG (one image per patient, no grouping) sorted by
  file name, every fifth image (200) is the test set, the other 800 the pool. The split is a manifest written into
  ``OUT`` that points at the shared data (no copy).
* Every mode sees the images as the source adapter did (its resize mode and input size: native-resolution crops for
  fundus, whole images resized to 224 for endoscopy) and runs the same fixed recipe (``--steps``, default 150):
  with k labels there is nothing left to stop on, so the step count is chosen beforehand, not on the test images.
* Modes: ``experts`` starts from the source adapter (``--init``: the DRIVE-trained experts and decoder, recipe
  inherited, its scale too since 2026-11-28: the new site's images are resampled to the source's field of view);
  ``lora`` (PEFT LoRA + decoder), ``full`` (whole backbone + decoder) start from the clean backbone; ``scratch`` is
  the from-scratch U-Net. ``zero-shot`` is the source adapter itself.
* ``--val-from-shots FOLDS``: experts choose their step count by cross-validation over the k labelled images (the
  source adapter as it is, step 0, is a candidate), instead of the fixed ``--steps``.
* Each finished run appends a row to ``OUT/results.csv`` (mode, k, seed, Dice with its 95 % CI over the test images,
  HD95, seconds); a row already there is skipped, so the sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from _runs import run  # examples/_runs.py
from m4oe_adapters.adapter_file import read_header

BACKBONE = ["--backbone", "timm:swin_tiny_patch4_window7_224", "--weights", "adapters_zoo/backbone"]
FIELDS = ["mode", "k", "seed", "dice", "dice_low", "dice_high", "hd95", "train_s", "eval_s", "test_images"]


def chase_is_test(rows: list[dict]) -> list[bool]:
    """CHASE_DB1: children 08–14 test (``Image_08L.jpg`` → child 8)."""
    return [int(Path(row["image"]).stem.split("_")[1][:2]) > 7 for row in rows]


def kvasir_is_test(rows: list[dict]) -> list[bool]:
    """Kvasir-SEG: every fifth image in file-name order is a test image."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["image"])
    test = {index for rank, index in enumerate(order) if rank % 5 == 0}
    return [i in test for i in range(len(rows))]


def clinicdb_is_test(rows: list[dict]) -> list[bool]:
    """CVC-ClinicDB: the frames of every third video sequence (3, 6, ..., 27: 9 of 29) are test frames."""
    from m4oe_adapters.data.known_datasets import clinicdb_sequence

    return [int(clinicdb_sequence(Path(row["image"])).rsplit(" ", 1)[1]) % 3 == 0 for row in rows]


TASKS = {  # task: (new-site dataset, modality, split rule)
    "fundus": ("CHASE_DB1", "fundus", chase_is_test),
    "endoscopy": ("Kvasir-SEG", "endoscopy", kvasir_is_test),
    "endoscopy-reverse": ("CVC-ClinicDB", "endoscopy", clinicdb_is_test),
}


def write_split(data: Path, out: Path, task: str) -> Path:
    """Manifest of the task's new site with split_hint train (the label pool) / test, absolute paths."""
    dataset, _, is_test = TASKS[task]
    manifest = out / f"{dataset.lower()}_split.csv" if task != "fundus" else out / "chase_split.csv"
    rows = [r for r in csv.DictReader(open(data / "manifest.csv", newline="")) if r["dataset"] == dataset]
    with open(manifest.with_suffix(".tmp"), "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["dataset", "modality", "site", "image", "mask", "split_hint"])
        writer.writeheader()
        for row, test in zip(rows, is_test(rows)):
            writer.writerow({**row, "image": str((data / row["image"]).resolve()),
                             "mask": str((data / row["mask"]).resolve()),
                             "split_hint": "test" if test else "train"})
    os.replace(manifest.with_suffix(".tmp"), manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fundus")
    parser.add_argument("--source", required=True,
                        help="source-site adapter on the clean backbone (DRIVE fundus, CVC-ClinicDB or Kvasir-SEG "
                             "endoscopy)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shots", default="3,1,5,all", help="k values, in the order they run")
    parser.add_argument("--modes", default="experts,full,scratch,lora")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--val-from-shots", type=int, default=None, metavar="FOLDS",
                        help="experts: choose the step count (0 keeps the source) by cross-validation over the k")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_split(Path(args.data), out, args.task)
    modality = TASKS[args.task][1]
    results = out / "results.csv"
    done = set()
    if results.is_file():
        done = {(r["mode"], r["k"], r["seed"]) for r in csv.DictReader(open(results))}
    else:
        with open(results, "w", newline="") as stream:
            csv.DictWriter(stream, fieldnames=FIELDS).writeheader()
    m4oe = [sys.executable, "-m", "m4oe_adapters.cli"]
    provenance = read_header(args.source)[0]["provenance"]
    source_resize, source_size = provenance["resize_mode"], provenance["train_size"][0]
    plan = [("zero-shot", "0", "0")]
    for k in args.shots.split(","):
        for seed in args.seeds.split(","):
            plan += [(mode, k, seed) for mode in args.modes.split(",")]
    for mode, k, seed in plan:
        if (mode, k, seed) in done:
            continue
        name = f"{mode}_k{k}_s{seed}"
        adapter, train_s = Path(args.source), 0.0
        if mode != "zero-shot":
            adapter = out / f"{name}.safetensors"
            if not adapter.is_file():
                cmd = m4oe + ["train", *BACKBONE, "--data", str(manifest), "--modality", modality, "--split", "train",
                              "--mode", mode, "--steps", str(args.steps), "--seed", seed, "--no-progress",
                              "-o", str(adapter)]
                if k != "all":
                    cmd += ["--shots", k]
                else:
                    cmd += ["--val", "0"]
                if mode == "experts":
                    cmd += ["--init", args.source]
                    if args.val_from_shots:
                        cmd += ["--val-from-shots", str(args.val_from_shots)]
                else:  # the source's input handling (experts inherit it through --init): same images for every mode
                    cmd += ["--resize", source_resize, "--size", str(source_size)]
                train_s = run(cmd, out / f"{name}.train.log")
        report = out / name
        cmd = m4oe + ["eval", *BACKBONE, "--data", str(manifest), "--modality", modality, "--split", "test",
                      "--adapter", str(adapter), "--out", str(report), "--no-progress"]
        eval_s = run(cmd, out / f"{name}.eval.log")
        summary = json.load(open(report / "metrics.json"))["summary"][0]
        row = {"mode": mode, "k": k, "seed": seed, "train_s": round(train_s), "eval_s": round(eval_s),
               "test_images": summary["images"], **{f: round(summary[f], 4) for f in
                                                     ("dice", "dice_low", "dice_high", "hd95")}}
        with open(results, "a", newline="") as stream:
            csv.DictWriter(stream, fieldnames=FIELDS).writerow(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
