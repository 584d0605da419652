"""Label-free thresholds at a new site: each image's mask at the argmax against Otsu's threshold of its own
foreground probabilities (``m4oe eval/predict --threshold otsu``), from one prediction per image.

    python examples/threshold_otsu.py --adapter adapters_zoo/fundus.safetensors --dataset CHASE_DB1
    python examples/threshold_otsu.py --adapter adapters_zoo/fundus.safetensors --dataset DRIVE --split test
    python examples/threshold_otsu.py --adapter adapters_zoo/endoscopy.safetensors --dataset CVC-ClinicDB \
        --in-domain-of adapters_zoo/reports/endoscopy/metrics.csv      # the zoo's own held-out images (also Kvasir-SEG)
    python examples/threshold_otsu.py --adapter OLD_ENDOSCOPY --dataset Kvasir-SEG \
        --manifest runs/fewshot_endoscopy/kvasir-seg_split.csv --split test    # split files: examples/fewshot_sweep.py

(``OLD_ENDOSCOPY``: the CVC-ClinicDB-only adapter the README's first endoscopy rows measured, the zoo's until
2026-11-28: ``git show b1a0060:adapters_zoo/endoscopy.safetensors > old_endoscopy.safetensors``.)
    python examples/threshold_otsu.py --adapter runs/fewshot_endoscopy_rev/source_kvasir.safetensors \
        --dataset CVC-ClinicDB --manifest runs/fewshot_endoscopy_rev/cvc-clinicdb_split.csv --split test
    python examples/threshold_otsu.py --adapter adapters_zoo/xray.safetensors --dataset CXR_lung_imlab_demo

Images: the manifest's rows of ``--dataset`` (``--split``: only rows of that split hint), predicted as ``m4oe eval``
predicts them (the adapter's preset, scale harmonisation, windows). Reported: mean Dice (%) at the argmax, with
Otsu's threshold, and at fixed thresholds 0.2 / 0.3 / 0.4 — those last ones are for reference only: read off the
test images, they are not a method. ``--out`` keeps the per-image Dice and Otsu's threshold as CSV.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch

from m4oe_adapters.data import read_manifest
from m4oe_adapters.evaluation import prepare
from m4oe_adapters.inference import otsu_threshold
from m4oe_adapters.scale import predict_probabilities_at_scale
from m4oe_adapters.segmenter_file import load_segmenter

FIXED = (0.2, 0.3, 0.4)


def dice(mask: np.ndarray, label: np.ndarray) -> float:
    both = mask.sum() + label.sum()
    return 1.0 if both == 0 else float(2 * (mask & label).sum() / both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--weights", default="adapters_zoo/backbone")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--manifest", default=None, help="default: DATA/manifest.csv")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default=None, help="only rows with this split hint (default: every row)")
    parser.add_argument("--in-domain-of", default=None, metavar="METRICS_CSV",
                        help="only the images of this report's in-domain rows (a zoo report's metrics.csv)")
    parser.add_argument("--out", default=None, help="per-image CSV")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_segmenter(args.adapter, args.weights)
    info = loaded.model.modalities[next(iter(loaded.model.modalities))] if loaded.model is not None else loaded.info
    manifest = Path(args.manifest) if args.manifest else Path(args.data) / "manifest.csv"
    samples = [s for s in read_manifest(manifest) if s.dataset == args.dataset
               and (args.split is None or s.split_hint == args.split)]
    if args.in_domain_of:
        listed = {row["image"] for row in csv.DictReader(open(args.in_domain_of, newline="")) if row["domain"] == "in"}
        tail = lambda path: Path(path).parts[-3:]  # noqa: E731  (DATASET/images/NAME: the report's data root may differ)
        samples = [s for s in samples if tail(s.image) in {tail(image) for image in listed}]
    rows, start = [], time.perf_counter()
    for sample in samples:
        prepared = prepare(sample, info.preset, loaded.in_chans)
        foreground = predict_probabilities_at_scale(
            loaded, prepared.image, info.input_size, info.provenance.get("resize_mode", "crop"),
            scale=info.provenance.get("scale"), raw=prepared.raw, meta=prepared.meta, progress=False)[1]
        label, probability = np.asarray(prepared.label) > 0, foreground.numpy()
        otsu = otsu_threshold(foreground)
        rows.append({"image": str(sample.image), "otsu_threshold": otsu, "argmax": dice(probability > 0.5, label),
                     "otsu": dice(probability > otsu, label),
                     **{f"fixed_{t}": dice(probability > t, label) for t in FIXED}})
    means = {key: round(100 * float(np.mean([r[key] for r in rows])), 1) for key in rows[0] if key != "image"
             and key != "otsu_threshold"}
    print(f"{args.adapter} on {len(rows)} {args.dataset} images ({time.perf_counter() - start:.0f} s): Dice % {means}; "
          f"Otsu's threshold median {np.median([r['otsu_threshold'] for r in rows]):.2f}, "
          f"better than the argmax on {sum(r['otsu'] > r['argmax'] for r in rows)} of {len(rows)} images")
    if args.out:
        with open(args.out, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
