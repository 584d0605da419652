"""Evaluating image-level routing on held-out images: which adapter each image goes to, how often that is right,
how often a loaded adapter's own images are refused (false rejection), and — leave one adapter out — how often the
images of a missing adapter are flagged unknown instead of being sent to another adapter.

Images used to fit any signature (their content hashes are stored in the signature) are never scored. An adapter's
scores depend only on its own signature, so one score matrix ``[images, adapters]`` answers every question: leaving an
adapter out is dropping its column.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .routing import decide, refuse_noise, view_scores, volume_is_noise, volume_routing_indices
from .signatures import ImageSignature, image_hash, looks_like_noise, routing_descriptors

SYNTHETIC_UNKNOWNS = ("uniform noise", "blank frame", "grey ramp", "checkerboard")
# thresholds whose false rejection / unknown rates are reported
SWEEP = (0.1, 0.05, 0.03, 0.02, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9, 1e-15)


@dataclass
class RoutedImage:
    source: str
    dataset: str
    expected: str | None  # the adapter it belongs to; None: no loaded adapter is made for it
    views: torch.Tensor  # [V, D]: signatures.routing_descriptors of the image
    volume: list[torch.Tensor] | None = None  # a slice: its volume's routing slices (view stacks), which decide it
    noise: bool = False  # pixel noise (signatures.looks_like_noise; for a slice, its volume's): refused as predict does


def synthetic_unknowns(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``count`` images that belong to no medical modality: noise, blank frames, ramps, checkerboards (RGB and grey,
    several sizes)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = SYNTHETIC_UNKNOWNS[index % len(SYNTHETIC_UNKNOWNS)]
        channels = 3 if index % 2 else 1
        height, width = int(rng.integers(64, 600)), int(rng.integers(64, 600))
        if kind == "uniform noise":
            image = rng.uniform(0, 255, (channels, height, width))
        elif kind == "blank frame":
            image = np.full((channels, height, width), float(rng.uniform(0, 255)))
        elif kind == "grey ramp":
            image = np.broadcast_to(np.linspace(0, 255, width), (channels, height, width)).copy()
        else:
            square = int(rng.integers(4, 64))
            grid = (np.add.outer(np.arange(height) // square, np.arange(width) // square) % 2) * 255.0
            image = np.broadcast_to(grid, (channels, height, width)).copy()
        images.append((f"synthetic:{kind}:{index}", image.astype(np.float32)))
    return images


def describe_samples(samples: Sequence, expected: Mapping[str, str | None], signatures: Mapping[str, ImageSignature],
                     max_per_dataset: int | None = None, seed: int = 0, progress: bool = True) -> list[RoutedImage]:
    """Descriptors of every distinct held-out image (slices count as images), at most ``max_per_dataset`` per
    dataset (a seeded sample). Images whose hash is in a signature are skipped (they trained it)."""
    from .data import read_image

    seen_by_signatures = {h for signature in signatures.values() for h in signature.image_hashes}
    by_dataset: dict[str, list] = {}
    for sample in samples:
        by_dataset.setdefault(sample.dataset, []).append(sample)
    chosen = []
    for dataset, members in sorted(by_dataset.items()):
        unique = list({(str(s.image), s.slice_index): s for s in members}.values())
        random.Random(seed).shuffle(unique)
        kept = 0
        for sample in unique:
            if max_per_dataset is not None and kept >= max_per_dataset:
                break
            if image_hash(sample.image, sample.slice_index) in seen_by_signatures:
                continue
            chosen.append(sample)
            kept += 1
    routed = []
    iterator = chosen
    if progress:
        from tqdm import tqdm

        iterator = tqdm(chosen, desc="describing images", unit="image")
    volumes: dict[tuple[str, int], torch.Tensor] = {}
    volume_noise: dict[tuple[str, int], bool] = {}
    for sample in iterator:
        axis = getattr(sample, "slice_axis", 2)
        record = read_image(sample.image, slice_axis=axis, slice_index=sample.slice_index)
        views = routing_descriptors([record.array])[0]
        source = str(sample.image) + ("" if sample.slice_index is None else f"#slice{sample.slice_index}")
        volume, noise = None, looks_like_noise(record.array)
        if sample.slice_index is not None and "volume_shape" in record.meta:  # routed with its whole volume
            key = (str(sample.image), record.meta["slice_axis"])
            if key not in volumes:
                slices = volume_routing_slices(sample, record.meta)
                volumes[key] = routing_descriptors(slices)
                volume_noise[key] = volume_is_noise([looks_like_noise(image) for image in slices])
            volume, noise = volumes[key], volume_noise[key]
        routed.append(RoutedImage(source, sample.dataset, expected.get(sample.dataset), views, volume, noise))
    return routed


def image_scores(signatures: Mapping[str, ImageSignature], images: Sequence[RoutedImage]) -> torch.Tensor:
    """``[images, adapters]`` scores as ``m4oe predict`` gets them: an image's own (its best view), or for a slice
    of a volume its volume's (each adapter's median over the volume's routing slices)."""
    plain = view_scores(signatures, [image.views for image in images])
    by_volume: dict[int, torch.Tensor] = {}
    rows = []
    for index, image in enumerate(images):
        if image.volume is None:
            rows.append(plain[index])
            continue
        if id(image.volume) not in by_volume:
            by_volume[id(image.volume)] = view_scores(signatures, image.volume).median(0).values
        rows.append(by_volume[id(image.volume)])
    return torch.stack(rows)


def evaluate_routing(signatures: Mapping[str, ImageSignature], images: Sequence[RoutedImage],
                     min_confidence: float | None = None) -> dict[str, Any]:
    """Top-1 accuracy, confusion, false rejection and leave-one-adapter-out unknown detection.

    Returns: a JSON-able report (``rows``: one per image with the decision and every adapter's confidence).
    """
    names = list(signatures)
    scores = image_scores(signatures, images)  # an adapter's column depends on its signature only
    noise = [image.noise for image in images]
    decisions = refuse_noise(decide(signatures, scores, min_confidence), noise)
    rows, confusion = [], {}
    for image, decision in zip(images, decisions):
        chosen = decision.modality or "unknown"
        truth = image.expected or "no adapter"
        confusion.setdefault(truth, {}).setdefault(chosen, 0)
        confusion[truth][chosen] += 1
        rows.append({"image": image.source, "dataset": image.dataset, "expected": truth, "chosen": chosen,
                     "nearest": decision.nearest, "confidence": decision.confidence,
                     **{f"confidence_{name}": decision.scores[name] for name in names}})
    known = [(image, decision) for image, decision in zip(images, decisions) if image.expected in signatures]
    correct = sum(decision.nearest == image.expected for image, decision in known)
    accepted_correct = sum(decision.modality == image.expected for image, decision in known)
    rejected = sum(decision.unknown for _, decision in known)
    leave_one_out = {}
    def without(name: str, rows: list[int], threshold: float | None) -> list:
        """Decisions for ``rows`` with adapter ``name`` left out: its column dropped."""
        others = {other: signatures[other] for other in names if other != name}
        columns = [names.index(other) for other in others]
        return refuse_noise(decide(others, scores[rows][:, columns], threshold), [noise[row] for row in rows])

    for name in names:
        own = [i for i, image in enumerate(images) if image.expected == name]
        if not own or len(names) < 2:
            continue
        left = without(name, own, min_confidence)
        leave_one_out[name] = {"images": len(own), "flagged_unknown": sum(d.unknown for d in left),
                               "sent_to": _counts(d.modality for d in left if not d.unknown)}
    flagged = sum(v["flagged_unknown"] for v in leave_one_out.values())
    total = sum(v["images"] for v in leave_one_out.values())
    foreign = [decision for image, decision in zip(images, decisions) if image.expected not in signatures]
    per_dataset = {}
    for image, decision in known:
        entry = per_dataset.setdefault(image.dataset, {"images": 0, "correct": 0, "rejected": 0})
        entry["images"] += 1
        entry["correct"] += int(decision.nearest == image.expected)
        entry["rejected"] += int(decision.unknown)
    sweep = []
    for threshold in SWEEP:
        strict = refuse_noise(decide(signatures, scores, threshold), noise)
        own = [d.unknown for image, d in zip(images, strict) if image.expected in signatures]
        left_out = []
        for name in names:
            rows_of = [i for i, image in enumerate(images) if image.expected == name]
            if rows_of and len(names) > 1:
                left_out += [d.unknown for d in without(name, rows_of, threshold)]
        no_adapter = [d.unknown for image, d in zip(images, strict) if image.expected not in signatures]
        sweep.append({"min_confidence": threshold, "false_rejection_rate": float(np.mean(own)) if own else None,
                      "leave_one_out_unknown_rate": float(np.mean(left_out)) if left_out else None,
                      "no_adapter_unknown_rate": float(np.mean(no_adapter)) if no_adapter else None})
    return {
        "adapters": names,
        "threshold_sweep": sweep,
        "min_confidence": min_confidence if min_confidence is not None else {n: s.min_confidence
                                                                             for n, s in signatures.items()},
        "images": len(images),
        "known_images": len(known),
        "top1_accuracy": correct / len(known) if known else None,
        "accepted_and_correct": accepted_correct / len(known) if known else None,
        "false_rejection_rate": rejected / len(known) if known else None,
        "leave_one_out_unknown_rate": flagged / total if total else None,
        "leave_one_out": leave_one_out,
        "no_adapter_images": len(foreign),
        "no_adapter_flagged_unknown": sum(d.unknown for d in foreign),
        "per_dataset": per_dataset,
        "confusion": confusion,
        "rows": rows,
    }


def volume_routing_slices(sample, meta: dict) -> list[np.ndarray] | None:
    """The slices that route ``sample``'s volume in ``m4oe predict`` (``meta``: the sample's slice as
    :func:`~m4oe_adapters.data.read_image` read it); ``None`` for a 2D image."""
    from .data import read_image

    if sample.slice_index is None or "volume_shape" not in meta:
        return None
    count = meta["volume_shape"][meta["slice_axis"]]
    return [read_image(sample.image, slice_axis=getattr(sample, "slice_axis", 2), slice_index=index).array
            for index in volume_routing_indices(count)]


def _route_sample(model, sample, raw: np.ndarray, min_confidence: float | None):
    """The decision ``m4oe predict`` makes for this sample: its own for an image, its volume's for a slice."""
    from .data import read_image

    meta = read_image(sample.image, slice_axis=getattr(sample, "slice_axis", 2), slice_index=sample.slice_index).meta
    slices = volume_routing_slices(sample, meta)
    if slices is None:
        return model.route([raw], min_confidence)[0]
    return model.route_volume(slices, min_confidence)


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


REPORT_FILES = ("routing.csv", "confusion.csv", "confusion.png", "summary.json", "report.md")


def check_report_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse (before any work) a folder that already holds one of the report's files, unless ``overwrite``."""
    from .errors import ConfigError

    existing = [Path(out_dir) / name for name in REPORT_FILES if (Path(out_dir) / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; choose another --out or pass --overwrite to replace the report")


def write_routing_report(report: dict[str, Any], out_dir: str | Path, command: str = "") -> list[Path]:
    """``routing.csv`` (per image), ``confusion.csv``, ``confusion.png``, ``summary.json``, ``report.md``."""
    from .adapter_file import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = report["rows"]

    def write_rows(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    if rows:
        written.append(atomic_write(out / "routing.csv", write_rows))
    columns = report["adapters"] + ["unknown"]
    truths = [name for name in report["adapters"] if name in report["confusion"]] + [
        name for name in report["confusion"] if name not in report["adapters"]]

    def write_confusion(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["expected \\ chosen"] + columns)
            for truth in truths:
                writer.writerow([truth] + [report["confusion"][truth].get(c, 0) for c in columns])

    written.append(atomic_write(out / "confusion.csv", write_confusion))
    written.append(_confusion_png(report, truths, columns, out / "confusion.png"))
    summary = {k: v for k, v in report.items() if k != "rows"}
    written.append(atomic_write(out / "summary.json", lambda t: Path(t).write_text(json.dumps(summary, indent=2) + "\n")))
    lines = [
        "# Image-level routing", "", f"Command: `{command}`" if command else "", "",
        f"- adapters: {', '.join(report['adapters'])}",
        f"- held-out images of loaded adapters: {report['known_images']}; top-1 (nearest adapter) "
        f"{_percent(report['top1_accuracy'])}; accepted and right {_percent(report['accepted_and_correct'])}",
        f"- false rejection (own adapter loaded, flagged unknown): {_percent(report['false_rejection_rate'])}",
        f"- leave one adapter out, its images flagged unknown: {_percent(report['leave_one_out_unknown_rate'])}",
        f"- images no loaded adapter is made for: {report['no_adapter_images']}, flagged unknown "
        f"{report['no_adapter_flagged_unknown']}", "",
        "| dataset | images | top-1 | rejected |", "|---|---|---|---|",
    ] + [f"| {d} | {e['images']} | {_percent(e['correct'] / e['images'])} | {e['rejected']} |"
         for d, e in sorted(report["per_dataset"].items())] + [
        "", "| min confidence | false rejection | left-out adapter's images flagged unknown | no-adapter images "
        "flagged unknown |", "|---|---|---|---|",
    ] + [f"| {e['min_confidence']:g} | {_percent(e['false_rejection_rate'])} | "
         f"{_percent(e['leave_one_out_unknown_rate'])} | {_percent(e['no_adapter_unknown_rate'])} |"
         for e in report["threshold_sweep"]] + [
        "", "| left out | its images | flagged unknown | sent to |", "|---|---|---|---|",
    ] + [f"| {n} | {e['images']} | {e['flagged_unknown']} | {e['sent_to']} |" for n, e in report["leave_one_out"].items()]
    if "dice" in report:
        dice = report["dice"]
        lines += ["", f"Dice on {dice['images']} held-out images (mean over images of the mean foreground-class Dice):",
                  "", "| hard, true modality | hard, image-level router | soft token gate, true decoder |",
                  "|---|---|---|", f"| {dice['true_mean']:.4f} | {dice['routed_mean']:.4f} | {dice['soft_mean']:.4f} |"]
    written.append(atomic_write(out / "report.md", lambda t: Path(t).write_text("\n".join(lines) + "\n")))
    return written


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _confusion_png(report, truths, columns, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .adapter_file import atomic_write

    matrix = np.array([[report["confusion"][t].get(c, 0) for c in columns] for t in truths], dtype=float)
    shares = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    figure, axes = plt.subplots(figsize=(1.0 + 0.7 * len(columns), 1.0 + 0.5 * len(truths)))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(truths)):
        for j in range(len(columns)):
            if matrix[i, j]:
                axes.text(j, i, int(matrix[i, j]), ha="center", va="center",
                          color="white" if shares[i, j] > 0.6 else "black", fontsize=8)
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(truths)), truths, fontsize=8)
    axes.set_xlabel("chosen adapter")
    axes.set_ylabel("image belongs to")
    figure.tight_layout()
    try:
        return atomic_write(path, lambda t: figure.savefig(t, format="png", dpi=120))
    finally:
        plt.close(figure)


def routed_dice(files: Mapping[str, Path], weights, samples: Sequence, expected: Mapping[str, str],
                signatures: Mapping[str, ImageSignature], per_adapter: int, seed: int = 0,
                min_confidence: float | None = None, progress: bool = True, device=None,
                precision: str = "32") -> dict[str, Any]:
    """Segment ``per_adapter`` held-out images of each adapter three ways — hard routing to where the image-level
    router says (as ``m4oe predict`` without ``--modality`` does), hard routing with the true modality, and soft
    token-level routing (every expert mixed by the gate) with the true modality's decoder — and compare mean Dice.
    An image routed to *unknown* gets no mask: Dice 0 for the routed run. A wrong adapter's mask is scored against
    the image's own labels (classes beyond the right adapter's count count as background). ``device`` and
    ``precision``: where and how the model runs (see :func:`~m4oe_adapters.prediction.predict_array`).
    """
    from .adapter_file import load_adapter, model_from_adapter
    from .data import load_pair
    from .metrics import score_mask
    from .prediction import predict_array

    names = list(files)
    model = model_from_adapter(files[names[0]], weights)
    for name in names[1:]:
        load_adapter(model, files[name])
    model.eval()
    if device is not None:
        model.to(device)
    run = dict(device=device, precision=precision)
    seen = {h for signature in signatures.values() for h in signature.image_hashes}
    chosen = []
    for name in names:
        pool = [s for s in samples if expected.get(s.dataset) == name and s.mask is not None]
        pool = list({(str(s.image), s.slice_index): s for s in pool}.values())
        random.Random(seed).shuffle(pool)
        picked = [s for s in pool if image_hash(s.image, s.slice_index) not in seen][:per_adapter]
        chosen += [(name, s) for s in picked]
    iterator = chosen
    if progress:
        from tqdm import tqdm

        iterator = tqdm(chosen, desc="segmenting routed vs true", unit="image")
    rows = []
    for name, sample in iterator:
        raw, label, meta = load_pair(sample)
        classes = model.modalities[name].num_classes
        decision = _route_sample(model, sample, raw, min_confidence)
        true_mask = predict_array(model, raw, name, meta, **run)
        true_dice = _mean_dice(score_mask(true_mask, label, classes))
        if decision.unknown:
            routed_dice_value = 0.0
        elif decision.modality == name:
            routed_dice_value = true_dice
        else:
            routed_mask = predict_array(model, raw, decision.modality, meta, **run)
            routed_dice_value = _mean_dice(score_mask(np.where(routed_mask < classes, routed_mask, 0), label, classes))
        soft_mask = predict_array(model, raw, name, meta, routing="soft", **run)  # the token gate mixes every expert
        rows.append({"image": str(sample.image), "adapter": name, "routed_to": decision.modality or "unknown",
                     "dice_true_modality": true_dice, "dice_routed": routed_dice_value,
                     "dice_soft_true_decoder": _mean_dice(score_mask(soft_mask, label, classes))})

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    return {"images": len(rows), "true_mean": mean("dice_true_modality"), "routed_mean": mean("dice_routed"),
            "soft_mean": mean("dice_soft_true_decoder"), "rows": rows}


def _mean_dice(scores: dict[int, dict[str, float]]) -> float:
    return float(np.mean([entry["dice"] for entry in scores.values()])) if scores else 0.0
