"""``m4oe demo``: the three jobs in a few minutes on a laptop CPU.

1. Segment images while swapping adapters: one mixed-modality batch through the reference backbone with the zoo's
   adapters loaded together.
2. Adapt to a new site from a few labelled images: start from the zoo's adapter of a modality, train only its expert
   on ``shots`` images of a site it never saw, and compare Dice on that site's held-out images before and after.
3. A Dice table, overlay PNGs and ``report.md``.

With real data (``--data``, default ``../shared/data`` when present) the images come from there; without, synthetic
images are used and the report says so.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapter_file import atomic_write, load_adapter
from .errors import DataError, M4oEError
from .runtime import device_predictor, module_device, resolve_device

# Which zoo modality adapts to which unseen site in the demo (first one found in the data is used).
ADAPTATION_CASES = (("fundus", "CHASE_DB1"), ("endoscopy", "Kvasir-SEG"), ("xray", "imlab-demo"))


def synthetic_images(count: int, in_chans: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright ellipses on textured noise: ``images [N, C, H, W]`` in [0, 1] and ``masks [N, H, W]``."""
    generator = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, masks = [], []
    for _ in range(count):
        cy, cx = generator.uniform(0.3, 0.7, 2) * size
        ry, rx = generator.uniform(0.08, 0.2, 2) * size
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1).astype(np.int64)
        image = 0.35 + 0.4 * mask + 0.12 * generator.standard_normal((size, size)).astype(np.float32)
        images.append(np.repeat(image[None], in_chans, axis=0))
        masks.append(mask)
    return np.stack(images).astype(np.float32), np.stack(masks)


def run_demo(
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    zoo: str | Path | None = None,
    shots: int = 3,
    steps: int = 40,
    test_images: int = 4,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the demo on ``device`` (``auto``: CUDA when present); returns the numbers written to ``report.md``."""
    from .config import DecoderConfig, ExpertConfig
    from .model import SegmentationModel
    from .reporting import overlay_png
    from .reporting import describe_backbone
    from .zoo import default_zoo, load_reference_backbone, read_index

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    zoo = Path(zoo) if zoo else default_zoo()
    index = read_index(zoo)
    backbone = load_reference_backbone(zoo)
    described = describe_backbone(backbone.family, backbone.name, backbone.model_args)
    log(f"[1/3] loaded the reference backbone ({described}); {len(index['adapters'])} adapters")
    first = zoo / index["adapters"][0]["file"]
    from .adapter_file import read_header

    metadata, _ = read_header(first)
    model = SegmentationModel(backbone, ExpertConfig.from_dict(metadata["expert"]),
                              DecoderConfig.from_dict(metadata["decoder"])).eval()
    load_started = time.perf_counter()
    for entry in index["adapters"]:
        load_adapter(model, zoo / entry["file"])
    load_seconds = time.perf_counter() - load_started
    model.to(resolve_device(device))
    samples, root = real_samples(data)
    real = samples is not None
    lines = [
        "# m4oe demo",
        "",
        f"- backbone: `{described}` from `adapters_zoo/{index['backbone']['path']}` "
        f"({index['backbone'].get('description', '')}), fingerprint `{backbone.fingerprint()[:12]}`",
        f"- {len(model.modalities)} adapters loaded onto it in {load_seconds * 1000:.0f} ms: "
        + ", ".join(f"{name} ({info.num_classes} classes)" for name, info in model.modalities.items()),
        f"- images: {'REAL images from ' + str(root) if real else 'SYNTHETIC images (no data folder found): Dice values below measure the mechanics, not medical accuracy'}",
        "",
    ]
    # ---- job 1: one mixed batch, each sample routed to its own modality's expert
    log("[2/3] segmenting a mixed-modality batch (each image routed to its own expert)")
    batch_rows = mixed_batch(model, samples, out, overlay_png, seed)
    lines += ["## 1. One mixed-modality batch", "",
              "Each image is segmented by its own adapter in one forward pass; the last column is where the image-level "
              "router sends it without being told (confidence in brackets).", "",
              "| image | modality | Dice | router's choice |", "|---|---|---|---|"]
    lines += [f"| {Path(r['image']).name} | {r['modality']} | {r['dice']:.3f} | {r['routed']} |" for r in batch_rows]
    lines += ["", "Overlays: " + ", ".join(f"`{r['overlay']}`" for r in batch_rows), ""]
    # ---- job 2: adapt to an unseen site from a few labelled images
    log(f"[3/3] adapting to a new site from {shots} labelled images ({steps} steps)")
    adaptation = adapt_to_site(model, samples, out, shots, steps, test_images, seed, progress)
    lines += ["## 2. Adapting to a site the adapter never saw", ""]
    lines += [f"- {adaptation['description']}", "",
              "| | Dice on held-out images of the new site |", "|---|---|",
              f"| zoo adapter as shipped | {adaptation['before']:.3f} |",
              f"| after {steps} steps on {shots} labelled images (expert + decoder only) | {adaptation['after']:.3f} |",
              ""]
    seconds = time.perf_counter() - started
    lines += ["## 3. Dice table", "", "| job | Dice |", "|---|---|",
              f"| mixed batch (mean) | {np.mean([r['dice'] for r in batch_rows]):.3f} |",
              f"| new site, before | {adaptation['before']:.3f} |", f"| new site, after | {adaptation['after']:.3f} |",
              "", f"Finished in {seconds:.0f} s."]
    report = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda temporary: Path(temporary).write_text(report))
    log(report)
    return {"seconds": seconds, "real_data": real, "batch": batch_rows, "adaptation": adaptation}


def real_samples(data: str | Path | None) -> tuple[list | None, Path]:
    """``(manifest samples, data root)``; the samples are ``None`` when no data folder is there (the demo then goes
    synthetic)."""
    from .commands.data_args import default_data_root  # torch-free, shared with the commands' --data default

    root = Path(data) if data else default_data_root()
    manifest = root / "manifest.csv" if root.is_dir() else root
    if not manifest.is_file():
        if data:
            raise DataError(f"{manifest}: no manifest.csv in the --data folder")
        return None, root
    from .data import read_manifest

    return read_manifest(manifest, nonempty_slices=True), root


def mixed_batch(model, samples, out: Path, overlay_png, seed: int) -> list[dict[str, Any]]:
    from .evaluation import prepare
    from .metrics import score_mask

    size = 224
    rows, images, labels, names, raws = [], [], [], [], []
    for name, info in model.modalities.items():
        if samples is None:
            synthetic, masks = synthetic_images(1, model.backbone.in_chans, size, seed)
            image, label, raw, path = torch.from_numpy(synthetic[0]), masks[0], synthetic[0], f"synthetic_{name}"
        else:
            sample = held_out_sample(name, info, samples)
            if sample is None:
                continue
            try:
                prepared = prepare(sample, info.preset, model.backbone.in_chans)
            except M4oEError:
                continue
            # The batch needs one size: resize each image (and nearest-resize its label) to 224 x 224.
            image = torch.nn.functional.interpolate(prepared.image[None], size=(size, size), mode="bilinear")[0]
            label = torch.nn.functional.interpolate(torch.from_numpy(prepared.label)[None, None].float(),
                                                    size=(size, size), mode="nearest")[0, 0].long().numpy()
            raw = torch.nn.functional.interpolate(torch.from_numpy(prepared.raw)[None].float(), size=(size, size),
                                                  mode="bilinear")[0].numpy()
            path = str(sample.image)
        images.append(image)
        labels.append(label)
        names.append(name)
        raws.append((raw, path))
    with torch.no_grad():
        logits = model(torch.stack(images).to(module_device(model)), names).cpu()
    # What the image-level router would have chosen without being told (the adapters' signatures).
    decisions = model.route([raw for raw, _ in raws]) if model.signatures else [None] * len(names)
    for index, name in enumerate(names):
        prediction = logits[index].argmax(0).numpy()
        dice = score_mask(prediction, labels[index], model.modalities[name].num_classes)
        mean_dice = float(np.mean([d["dice"] for d in dice.values()]))
        raw, path = raws[index]
        picture = overlay_png(raw, prediction, labels[index], out / f"batch_{index}_{name}.png",
                              title=f"{name}: Dice {mean_dice:.3f}")
        decision = decisions[index]
        routed = "n/a" if decision is None else (
            f"{decision.modality or 'unknown'} ({decision.confidence:.2g})")
        rows.append({"image": path, "modality": name, "dice": mean_dice, "overlay": picture.name, "routed": routed})
    return rows


def held_out_sample(name: str, info, samples):
    """An image the adapter never trained on: the first of the in-domain test split the zoo builder held out (the
    same split: every training site of its provenance together, seed 0), or ``None``. The pool is the adapter's own
    data, by dataset when its provenance names them (zoo names such as "CT-lung-infection" are finer than the
    manifest's modality column), else by modality."""
    from .protocol import split_in_domain

    sites = set(info.provenance.get("sites") or [])
    datasets = set(info.provenance.get("datasets") or [])
    pool = [s for s in samples if (s.dataset in datasets if datasets else s.modality == name)
            and (not sites or s.site in sites)]
    if not pool:
        return None
    test = split_in_domain(pool, seed=0)[1]
    return test[0] if test else None


def adapt_to_site(model, samples, out: Path, shots: int, steps: int, test_images: int, seed: int, progress: bool):
    from .evaluation import evaluate_samples
    from .segmenters import ModalitySegmenter
    from .training import TrainConfig, train

    case = None
    if samples is not None:
        for modality, site in ADAPTATION_CASES:
            pool = [s for s in samples if s.modality == modality and s.site == site]
            if modality in model.modalities and len(pool) >= shots + 2:
                case = (modality, site, pool)
                break
    if case is None:
        return adapt_synthetic(model, shots, steps, seed, progress)
    modality, site, pool = case
    info = model.modalities[modality]
    train_samples, test_samples = pool[:shots], pool[shots : shots + test_images]

    def score() -> float:
        rows, _ = evaluate_samples(device_predictor(lambda x: model(x, modality), module_device(model)),
                                   test_samples, preset=info.preset,
                                   in_chans=model.backbone.in_chans, num_classes=info.num_classes,
                                   label_names=info.label_names, input_size=info.input_size,
                                   resize_mode=info.provenance.get("resize_mode", "crop"))
        return float(np.mean([r["dice"] for r in rows if r["label"] == "mean"]))

    before = score()
    from .data import SegmentationDataset

    dataset = SegmentationDataset(train_samples, preset=info.preset, in_channels=model.backbone.in_chans,
                                  size=tuple(info.input_size), mode=info.provenance.get("resize_mode", "crop"),
                                  augment=True, seed=seed)
    segmenter = ModalitySegmenter(model, modality)
    train(segmenter, dataset, None, info.num_classes, TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup=5,
                                                                   seed=seed, val_every=0), progress=progress)
    model.eval()
    after = score()
    trained_on = ", ".join(info.provenance.get("sites", []) or ["?"])
    return {"description": f"{modality} adapter trained on {trained_on}, adapted to {site} with {shots} labelled "
                           f"images, scored on {len(test_samples)} other {site} images",
            "before": before, "after": after, "modality": modality, "site": site}


def adapt_synthetic(model, shots: int, steps: int, seed: int, progress: bool):
    """Without real data: teach a new 'synthetic' modality from a few synthetic images."""
    from .metrics import score_mask
    from .segmenters import ModalitySegmenter
    from .training import TrainConfig, train

    images, masks = synthetic_images(shots + 4, model.backbone.in_chans, 224, seed)
    items = [{"image": torch.from_numpy(images[i]), "label": torch.from_numpy(masks[i])[None], "path": f"s{i}"}
             for i in range(len(images))]
    model.add_modality("synthetic", 2, ["background", "ellipse"], seed=seed)

    def score() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(images[shots:]).to(module_device(model)), "synthetic").cpu()
        return float(np.mean([score_mask(l.argmax(0).numpy(), m, 2)[1]["dice"] for l, m in zip(logits, masks[shots:])]))

    before = score()
    train(ModalitySegmenter(model, "synthetic"), items[:shots], None, 2,
          TrainConfig(steps=steps, batch_size=min(4, shots), lr=3e-3, warmup=5, seed=seed, val_every=0),
          progress=progress)
    after = score()
    return {"description": f"a new 'synthetic' modality learnt from {shots} synthetic labelled images",
            "before": before, "after": after, "modality": "synthetic", "site": "synthetic"}
