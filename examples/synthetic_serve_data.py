"""Stand-in images for `m4oe serve-bench` on a machine without the shared data (a lent GPU machine): one smooth
random 600x560 PNG per zoo dataset (RGB for the colour modalities) and a manifest naming them.

    python examples/synthetic_serve_data.py /tmp/synthetic      # refuses to replace files there unless --overwrite
    m4oe serve-bench --zoo adapters_zoo --data /tmp/synthetic --device cuda --memory-adapters 0 --out report.json

The bench's requests name their modality, so the content changes the masks, not the speed; nothing is routed."""
import argparse
import csv
import sys
from pathlib import Path
import numpy as np
from PIL import Image

DATASETS = ["COVID19_CT_MedSeg_InfNet", "ACDC_cardiac_MRI_SSL4MIS_h5", "PH2", "ISBI2012_EM", "CVC-ClinicDB", "DRIVE",
            "BUSI", "HC18_fetal_head_US", "CXR_COVID_GeneralBlockchain"]
COLOUR = {"PH2", "CVC-ClinicDB", "DRIVE"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where the PNGs and manifest.csv go (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of these names already there")
    args = parser.parse_args(argv)
    root = Path(args.folder)
    names = [f"{name}.png" for name in DATASETS] + ["manifest.csv"]
    existing = [name for name in names if (root / name).exists()]
    if existing and not args.overwrite:  # never replace a user's manifest (e.g. the shared data's) unasked
        print(f"{root}: already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}; "
              "choose an empty folder or pass --overwrite", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in DATASETS:
        small = rng.uniform(0, 255, (32, 32, 3 if name in COLOUR else 1))
        image = Image.fromarray(small.astype(np.uint8).squeeze()).resize((600, 560), Image.BICUBIC)
        image.save(root / f"{name}.png")
        rows.append({"dataset": name, "image": f"{name}.png"})
    with open(root / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["dataset", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
