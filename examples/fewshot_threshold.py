"""Few labels without training: keep the source adapter and choose only its foreground threshold on the k labelled
images of the new site (``m4oe eval/predict --threshold``), for the splits and shots of ``examples/fewshot_sweep.py``.

    python examples/fewshot_threshold.py --task fundus --source SOURCE.safetensors --out runs/fewshot_fundus
    python examples/fewshot_threshold.py --task endoscopy --source ENDO.safetensors --out runs/fewshot_endoscopy

* The split manifest and the k images of each (k, seed) are those of the sweep: the same images `m4oe train
  --shots k --seed s` trains on (``adapt.split_samples`` over the same rows), checked against the content hashes a
  trained adapter of the sweep carries in its routing signature where one exists.
* The threshold is the one of 0.05, 0.10, ..., 0.95 with the highest mean Dice over the k images (ties: the one
  nearest 0.5); k = all chooses on the whole label pool. The test images are never looked at to choose it.
* Each (k, seed) appends a row with mode ``threshold`` (and the chosen value) to ``OUT/results.csv``, the sweep's
  table format, so ``examples/fewshot_table.py`` shows it beside the trained modes; ``OUT/thresholds.csv`` holds
  the chosen values and the shots' Dice at it and at 0.5. The sweep's ``zero-shot`` row is the source at the argmax.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

from fewshot_sweep import BACKBONE, FIELDS, TASKS, write_split  # examples/fewshot_sweep.py
from m4oe_adapters.adapt import split_samples
from m4oe_adapters.adapter_file import read_header
from m4oe_adapters.data import read_manifest, select
from m4oe_adapters.evaluation import prepare
from m4oe_adapters.inference import mask_from_probabilities
from m4oe_adapters.metrics import score_mask, summarise
from m4oe_adapters.scale import predict_probabilities_at_scale
from m4oe_adapters.segmenter_file import load_segmenter
from m4oe_adapters.signatures import image_hash

GRID = [round(0.05 * step, 2) for step in range(1, 20)]


def dice(mask: np.ndarray, label: np.ndarray) -> float:
    both = mask.sum() + label.sum()
    return 1.0 if both == 0 else float(2 * (mask & label).sum() / both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="fundus")
    parser.add_argument("--source", required=True)
    parser.add_argument("--out", required=True, help="the sweep's folder (its split manifest and results.csv)")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shots", default="1,3,5,all")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_split(Path(args.data), out, args.task)
    modality = TASKS[args.task][1]
    weights = BACKBONE[BACKBONE.index("--weights") + 1]
    loaded = load_segmenter(args.source, weights)
    info = loaded.model.modalities[modality] if loaded.model is not None else loaded.info
    resize_mode, scale = info.provenance.get("resize_mode", "crop"), info.provenance.get("scale")
    samples = read_manifest(manifest)
    pool, test = select(samples, modality=modality, split="train"), select(samples, modality=modality, split="test")
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def foreground(sample) -> tuple[np.ndarray, np.ndarray]:
        """(foreground probability, label > 0) of one image, as `m4oe eval` predicts it (scale, windows)."""
        key = str(sample.image)
        if key not in cache:
            prepared = prepare(sample, info.preset, loaded.in_chans)
            probabilities = predict_probabilities_at_scale(loaded, prepared.image, info.input_size, resize_mode,
                                                           scale=scale, raw=prepared.raw, meta=prepared.meta,
                                                           progress=False)
            cache[key] = (probabilities[1].numpy(), np.asarray(prepared.label) > 0)
        return cache[key]

    results = out / "results.csv"
    done = {(r["mode"], r["k"], r["seed"]) for r in csv.DictReader(open(results))} if results.is_file() else set()
    if not results.is_file():
        with open(results, "w", newline="") as stream:
            csv.DictWriter(stream, fieldnames=FIELDS).writeheader()
    start = time.perf_counter()
    test_maps = [foreground(sample) for sample in test]
    print(f"{len(test)} test images predicted in {time.perf_counter() - start:.0f} s", flush=True)
    for k in args.shots.split(","):
        for seed in args.seeds.split(","):
            if ("threshold", k, seed) in done:
                continue
            start = time.perf_counter()
            shots = pool if k == "all" else split_samples(pool, int(k), None, int(seed))[0]
            trained = out / f"experts_k{k}_s{seed}.safetensors"
            if trained.is_file() and k != "all":  # the same images the trained modes used
                hashes = set(read_header(trained)[0]["routing"]["image_hashes"])
                assert {image_hash(s.image) for s in shots} <= hashes, f"k={k} seed={seed}: not the sweep's images"
            maps = [foreground(sample) for sample in shots]
            means = [np.mean([dice(probability > t, label) for probability, label in maps])
                     for t in GRID]
            best = max(range(len(GRID)), key=lambda i: (round(means[i], 6), -abs(GRID[i] - 0.5)))
            threshold = GRID[best]
            choose_s = time.perf_counter() - start
            start = time.perf_counter()
            rows = []
            for (probability, label), sample in zip(test_maps, test):
                probabilities = torch.from_numpy(np.stack([1 - probability, probability]))
                mask = mask_from_probabilities(probabilities, threshold).numpy()
                score = score_mask(mask, label.astype(np.int64), 2)[1]
                rows.append({"mode": "threshold", **score})
            summary = summarise(rows, ("mode",))[0]
            row = {"mode": "threshold", "k": k, "seed": seed, "train_s": round(choose_s),
                   "eval_s": round(time.perf_counter() - start), "test_images": summary["images"],
                   **{f: round(summary[f], 4) for f in ("dice", "dice_low", "dice_high", "hd95")}}
            with open(results, "a", newline="") as stream:
                csv.DictWriter(stream, fieldnames=FIELDS).writerow(row)
            chosen = out / "thresholds.csv"
            new = not chosen.is_file()
            with open(chosen, "a", newline="") as stream:
                writer = csv.writer(stream)
                if new:
                    writer.writerow(["k", "seed", "threshold", "shots_dice_at_threshold", "shots_dice_at_0.5"])
                writer.writerow([k, seed, threshold, round(means[best], 4), round(means[GRID.index(0.5)], 4)])
            print({**row, "threshold": threshold}, flush=True)
    # sanity: the argmax of these probabilities is the sweep's zero-shot Dice
    argmax = np.mean([dice(probability > 0.5, label) for probability, label in test_maps])
    print(f"test Dice at 0.5 from these maps: {argmax:.4f} (the sweep's zero-shot row holds m4oe eval's)")


if __name__ == "__main__":
    main()
