"""Run by ``torchrun`` from tests/test_training.py: train the tiny experts model on discs (2 images per process per
step) and save this rank's trained tensors as ``OUT/rank<R>.pt``."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from m4oe_adapters.training import TrainConfig, train  # noqa: E402
from test_training import DDP_STEPS, Discs, segmenter  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    model = segmenter("experts")
    config = TrainConfig(steps=DDP_STEPS, batch_size=2, lr=1e-2, warmup=1, seed=0, val_every=0)
    train(model, Discs(8, 0), None, 2, config, progress=False)
    torch.save(model.checkpoint_state(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
