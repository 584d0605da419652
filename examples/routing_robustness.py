"""Routing under simulated site shifts: top-1 and false rejection on held-out images after each of a fixed set of
changes another hospital's images might bring (compression, resolution, frames, zoom, colour, noise, gamma,
orientation, grey).

    OMP_NUM_THREADS=1 python examples/routing_robustness.py [--zoo adapters_zoo] [--data ../shared/data] \
        [--per-dataset 15]

Images: up to ``--per-dataset`` 2D held-out images per shared dataset whose modality a zoo adapter covers (the same
seeded choice as tests/test_routing.py: no image any signature was fitted on), routed among every zoo adapter by
``SegmentationModel.route``. Each perturbation is applied to the raw image before routing; nothing is refitted.
What this does not show: real images of other sites (these are synthetic changes of the shared ones), volumes
(2D only), and whether a segmentation would still be good.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m4oe_adapters.data import read_image, read_manifest
from m4oe_adapters.signatures import image_hash
from m4oe_adapters.zoo import load_zoo_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_routing import EXPECTED  # noqa: E402  (datasets -> the zoo adapter their images belong to)


def eight_bit(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) / max(high - low, 1e-6) * 255, 0, 255)


def jpeg(image: np.ndarray, quality: int = 40) -> np.ndarray:
    pixels = eight_bit(image).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer)).astype(np.float32)
    return decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    tensor = torch.from_numpy(image)[None]
    return torch.nn.functional.interpolate(tensor, scale_factor=factor, mode="bilinear", antialias=True)[0].numpy()


def black_frame(image: np.ndarray, share: float = 0.15) -> np.ndarray:
    channels, height, width = image.shape
    margin = int(share * max(height, width))
    framed = np.full((channels, height + 2 * margin, width + 2 * margin), image.min(), np.float32)
    framed[:, margin : margin + height, margin : margin + width] = image
    return framed


def centre_crop(image: np.ndarray, share: float = 0.75) -> np.ndarray:
    _, height, width = image.shape
    keep_h, keep_w = int(height * share), int(width * share)
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    return image[:, top : top + keep_h, left : left + keep_w]


def colour_cast(image: np.ndarray) -> np.ndarray:
    return image if image.shape[0] == 1 else image * np.array([1.15, 1.0, 0.85], np.float32)[:, None, None]


def noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spread = 0.03 * (image.max() - image.min() + 1e-6)
    return image + rng.normal(0, spread, image.shape).astype(np.float32)


PERTURBATIONS = {
    "none": lambda image, rng: image,
    "JPEG quality 40": lambda image, rng: jpeg(image),
    "half resolution": lambda image, rng: rescale(image, 0.5),
    "double resolution": lambda image, rng: rescale(image, 2.0),
    "black frame, 15 % per side": lambda image, rng: black_frame(image),
    "centre crop, 75 % per side": lambda image, rng: centre_crop(image),
    "colour cast (R x1.15, B x0.85)": lambda image, rng: colour_cast(image),
    "Gaussian noise, 3 % of range": noise,
    "gamma 1.6": lambda image, rng: (eight_bit(image) / 255.0) ** 1.6 * 255,
    "horizontal flip": lambda image, rng: image[:, :, ::-1],
    "rotated 90 degrees": lambda image, rng: np.rot90(image, 1, axes=(1, 2)),
    "colour to grey": lambda image, rng: image.mean(0, keepdims=True) if image.shape[0] == 3 else image,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--per-dataset", type=int, default=15)
    args = parser.parse_args()
    model = load_zoo_model(args.zoo)
    seen = {h for signature in model.signatures.values() for h in signature.image_hashes}
    samples = read_manifest(Path(args.data) / "manifest.csv", nonempty_slices=True)
    chosen = []
    for dataset in EXPECTED:
        pool = list({str(s.image): s for s in samples if s.dataset == dataset and s.slice_index is None}.values())
        random.Random(0).shuffle(pool)
        chosen += [s for s in pool if image_hash(s.image, None) not in seen][: args.per_dataset]
    raws = [read_image(sample.image).array for sample in chosen]
    print(f"{len(chosen)} held-out 2D images of {len({s.dataset for s in chosen})} datasets, "
          f"{len(model.signatures)} signed adapters\n")
    print("| change | top-1 | refused | wrong, by dataset |\n|---|---|---|---|")
    for label, change in PERTURBATIONS.items():
        rng = np.random.default_rng(0)
        images = [torch.from_numpy(np.ascontiguousarray(change(raw, rng))) for raw in raws]
        decisions = model.route(images)
        wrong: dict[str, int] = {}
        for sample, decision in zip(chosen, decisions):
            if decision.nearest != EXPECTED[sample.dataset]:
                wrong[sample.dataset] = wrong.get(sample.dataset, 0) + 1
        right = np.mean([d.nearest == EXPECTED[s.dataset] for s, d in zip(chosen, decisions)])
        refused = np.mean([d.unknown for d in decisions])
        detail = ", ".join(f"{name} {count}" for name, count in sorted(wrong.items())) or "-"
        print(f"| {label} | {right * 100:.1f} % | {refused * 100:.1f} % | {detail} |", flush=True)


if __name__ == "__main__":
    main()
