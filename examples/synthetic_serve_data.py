"""Stand-in images for `m4oe serve-bench` on a machine without the shared data (a lent GPU machine): one smooth
random 600x560 PNG per zoo dataset (RGB for the colour modalities) and a manifest naming them.

    python examples/synthetic_serve_data.py /tmp/synthetic
    m4oe serve-bench --zoo adapters_zoo --data /tmp/synthetic --device cuda --memory-adapters 0 --out report.json

The bench's requests name their modality, so the content changes the masks, not the speed; nothing is routed."""
import csv, sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
colour = {"PH2", "CVC-ClinicDB", "DRIVE"}
rng = np.random.default_rng(0)
rows = []
for name in ["COVID19_CT_MedSeg_InfNet", "ACDC_cardiac_MRI_SSL4MIS_h5", "PH2", "ISBI2012_EM", "CVC-ClinicDB", "DRIVE",
             "BUSI", "HC18_fetal_head_US", "CXR_COVID_GeneralBlockchain"]:
    small = rng.uniform(0, 255, (32, 32, 3 if name in colour else 1))
    image = Image.fromarray(small.astype(np.uint8).squeeze()).resize((600, 560), Image.BICUBIC)
    image.save(root / f"{name}.png")
    rows.append({"dataset": name, "image": f"{name}.png"})
with open(root / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["dataset", "image"]); w.writeheader(); w.writerows(rows)
