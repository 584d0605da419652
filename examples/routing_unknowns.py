"""Inputs that belong to no adapter, routed among every zoo adapter: pixel noise of several kinds, blank and
synthetic frames, and photographs that ship with matplotlib (plus any ``--photo`` files you add).

    OMP_NUM_THREADS=1 python examples/routing_unknowns.py [--zoo adapters_zoo] [--photo FILE ...]

For each input: the decision (``unknown`` or the adapter it would be segmented with), why it was refused
(``noise``: neighbouring pixels do not correlate; ``confidence``: under the chosen adapter's stored threshold), the
best-fitting adapter and its confidence. What it does not show: how often photographs in general are refused
(a handful of files is not a sample of them).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from m4oe_adapters.signatures import neighbour_correlation
from m4oe_adapters.zoo import load_zoo_model

SAMPLE_DATA = Path(os.path.dirname(matplotlib.__file__)) / "mpl-data" / "sample_data"


def photo(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy())


def inputs(photos: list[str]) -> dict[str, torch.Tensor]:
    cases = {}
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        cases[f"uniform noise, colour, seed {seed}"] = torch.rand(3, 300, 400, generator=generator) * 255
        cases[f"uniform noise, grey, seed {seed}"] = torch.rand(1, 256, 256, generator=generator)
        cases[f"gaussian noise, colour, seed {seed}"] = torch.randn(3, 512, 512, generator=generator)
        cases[f"salt and pepper, seed {seed}"] = (torch.rand(1, 256, 256, generator=generator) > 0.5).float()
        cases[f"noise upsampled 4x, seed {seed}"] = torch.rand(1, 64, 64, generator=generator).repeat_interleave(
            4, 1).repeat_interleave(4, 2)
    cases["blank grey"] = torch.full((3, 224, 224), 128.0)
    cases["black"] = torch.zeros(3, 224, 224)
    cases["horizontal ramp"] = torch.linspace(0, 1, 224)[None, None].expand(3, 224, 224).clone()
    grid = (torch.arange(256)[:, None] // 16 + torch.arange(256)[None] // 16) % 2
    cases["checkerboard"] = grid[None].float().expand(3, 256, 256).clone()
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (SAMPLE_DATA / name).is_file():
            cases[f"photograph: matplotlib {name}"] = photo(SAMPLE_DATA / name)
    for path in photos:
        cases[f"photograph: {path}"] = photo(Path(path))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--photo", action="append", default=[])
    args = parser.parse_args()
    model = load_zoo_model(args.zoo)
    print("| input | decision | refused because | best fit (confidence) | neighbour correlation |")
    print("|---|---|---|---|---|")
    refused = 0
    cases = inputs(args.photo)
    for name, image in cases.items():
        decision = model.route([image])[0]
        refused += decision.unknown
        print(f"| {name} | {decision.modality or 'unknown'} | {decision.reason or ''} | {decision.nearest} "
              f"({decision.confidence:.2g}) | {neighbour_correlation(image):.2f} |")
    print(f"\n{refused} of {len(cases)} refused")


if __name__ == "__main__":
    main()
