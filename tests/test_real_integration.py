"""Few-shot training on real images generalises to an unseen site: a fundus expert trained on 5 DRIVE images
segments CHASE_DB1 vessels far better than trivial masks (all background: Dice 0; all vessel: about 0.13).

Needs the shared data and the zoo's reference backbone; skipped with the reason otherwise. Not timed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("M4OE_DATA", ROOT.parent / "shared" / "data"))
BACKBONE = ROOT / "adapters_zoo" / "backbone"
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason=f"real data not found at {DATA}"),
    pytest.mark.skipif(not (BACKBONE / "model.safetensors").is_file(), reason=f"no reference backbone at {BACKBONE}"),
]


def test_five_drive_images_segment_chase_vessels_well_above_trivial():
    from m4oe_adapters import load_backbone
    from m4oe_adapters.adapt import fit_modality
    from m4oe_adapters.data import load_pair, read_manifest, select
    from m4oe_adapters.evaluation import evaluate_samples
    from m4oe_adapters.training import TrainConfig

    samples = read_manifest(DATA / "manifest.csv")
    drive = select(samples, modality="fundus", sites=["DRIVE"], split="train")
    chase = select(samples, modality="fundus", sites=["CHASE_DB1"])[:4]
    fit = fit_modality(lambda: load_backbone("timm:", BACKBONE), drive, "fundus", shots=5, val_count=2,
                       size=(224, 224), resize_mode="crop",
                       train_config=TrainConfig(steps=80, batch_size=4, lr=3e-3, val_every=40, seed=0),
                       progress=False)
    rows, skipped = evaluate_samples(
        fit.segmenter, chase, preset=fit.preset, in_chans=3, num_classes=2, label_names=fit.label_names,
        input_size=(224, 224), resize_mode="crop",
    )
    assert not skipped
    dice = np.mean([row["dice"] for row in rows if row["label"] == "mean"])
    foreground = np.mean([(load_pair(sample)[1] > 0).mean() for sample in chase])
    all_vessel = 2 * foreground / (1 + foreground)
    print(f"\nCHASE_DB1 Dice after 5 DRIVE images: {dice:.3f} (all-vessel mask: {all_vessel:.3f}, all-background: 0)")
    assert dice > all_vessel + 0.15
