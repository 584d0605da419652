"""Self-supervised pretraining of a Swin backbone without internet: SimMIM (Xie et al., CVPR 2022), Swin's own
masked-image-modelling method, on unlabeled images of any modality.

    image → preset → random resized crop → patch embedding with 32-px blocks replaced by a learned mask token
          → Swin stages → 1×1 conv → PixelShuffle(32) → reconstruction; L1 loss on the masked pixels only

Every step draws its batch from a generator seeded with ``(seed, step)``, so a run killed and restarted with
``resume=True`` continues exactly (model, optimiser, schedule and RNG come from the checkpoint). The result is a timm
hub folder (``model.safetensors`` + ``config.json``) that :func:`m4oe_adapters.load_backbone` and plain
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))`` load.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_file import atomic_write
from .errors import ConfigError, DataError
from .runtime import resolve_device

MASK_PATCH = 32
CHECKPOINT_NAME = "pretrain_checkpoint.pt"


def build_swin(arch: str, in_chans: int, img_size: int, model_args: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size,
                             strict_img_size=False, **model_args)


class SimMIM(nn.Module):
    """A timm Swin encoder with SimMIM's mask token and one-layer reconstruction head.

    ``forward(images [B, C, H, W], mask [B, H/32, W/32] bool) → (loss, reconstruction [B, C, H, W])``.
    """

    def __init__(self, encoder: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.in_chans = in_chans
        embed_dim = encoder.patch_embed.proj.out_channels
        self.patch_size = encoder.patch_embed.proj.kernel_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, MASK_PATCH**2 * in_chans, 1), nn.PixelShuffle(MASK_PATCH)
        )

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder.patch_embed(images)  # [B, H/4, W/4, D] (timm Swin is NHWC)
        scale = MASK_PATCH // self.patch_size
        token_mask = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - token_mask) + self.mask_token * token_mask
        features = self.encoder.norm(self.encoder.layers(tokens))  # [B, H/32, W/32, F]
        reconstruction = self.decoder(features.permute(0, 3, 1, 2))
        pixel_mask = mask.repeat_interleave(MASK_PATCH, 1).repeat_interleave(MASK_PATCH, 2).unsqueeze(1).float()
        error = F.l1_loss(reconstruction, images, reduction="none")
        loss = (error * pixel_mask).sum() / (pixel_mask.sum() * self.in_chans + 1e-5)
        return loss, reconstruction


def random_mask(batch: int, height: int, width: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``[B, H/32, W/32]`` bool: exactly ``round(ratio * blocks)`` masked 32-px blocks per image."""
    rows, cols = height // MASK_PATCH, width // MASK_PATCH
    count = int(round(ratio * rows * cols))
    scores = torch.rand(batch, rows * cols, generator=generator)
    chosen = scores.argsort(dim=1)[:, :count]
    return torch.zeros(batch, rows * cols, dtype=torch.bool).scatter(1, chosen, True).view(batch, rows, cols)


@dataclass
class PretrainImage:
    array: np.ndarray  # [C, H, W] float16, preprocessed, longer side at most ``max_side``
    dataset: str
    modality: str


    name: str = ""  # path relative to its source's root, "#<slice>" added for a volume slice (``images.txt``)


def collect_images(
    sources: Sequence[str | Path], in_chans: int, max_side: int = 512, log: Callable[[str], None] = print,
    exclude_sites: Sequence[str] = (), excluded: dict[str, int] | None = None, slice_axis: int | None = None,
) -> tuple[list[PretrainImage], list[tuple[str, str]]]:
    """Read every image of the sources (manifest CSVs, folders or files), masks unused; bad files are skipped
    and returned as ``(path, reason)``.

    ``exclude_sites`` names sites (a manifest's ``site`` column) or datasets (its ``dataset`` column, or an image
    folder's name) that pretraining must never see, e.g. the sites a report calls unseen; their images are not read
    at all, and ``excluded`` (if given) receives how many were left out per dataset. Volumes are cut into every
    slice along ``slice_axis`` (``None``: a known dataset's axis, else the header's coarsest-spacing axis).
    """
    from .data import Sample, normalise, read_image, read_manifest
    from .data.manifest import expand_volume
    from .data.readers import IMAGE_SUFFIXES_ALL, suffix
    from .presets import default_preset

    entries: list[tuple[Path, str, str, int | None, int, Path]] = []  # file, dataset, modality, slice, axis, root
    skipped_early: list[tuple[str, str]] = []
    banned = {name.strip() for name in exclude_sites if name.strip()}
    excluded = excluded if excluded is not None else {}
    for source in sources:
        path = Path(source)
        if path.is_dir() and (path / "manifest.csv").is_file():
            path = path / "manifest.csv"
        if path.suffix.lower() == ".csv":
            for sample in read_manifest(path, nonempty_slices=False, slice_axis=slice_axis):
                if sample.site in banned or sample.dataset in banned:
                    excluded[sample.dataset] = excluded.get(sample.dataset, 0) + 1
                    continue
                entries.append((sample.image, sample.dataset, sample.modality, sample.slice_index, sample.slice_axis,
                                path.parent))
        elif path.is_dir():
            if path.name in banned:
                excluded[path.name] = excluded.get(path.name, 0) + 1
                continue
            for file in sorted(p for p in path.rglob("*") if p.is_file() and suffix(p) in IMAGE_SUFFIXES_ALL):
                try:  # volumes become one entry per slice
                    slices = expand_volume(Sample(path.name, "unknown", "", file, None), False, slice_axis)
                except DataError as error:
                    skipped_early.append((str(file), str(error)))
                    continue
                entries += [(s.image, path.name, "unknown", s.slice_index, s.slice_axis, path.parent) for s in slices]
        elif path.is_file():
            if path.parent.name in banned:
                excluded[path.parent.name] = excluded.get(path.parent.name, 0) + 1
                continue
            entries.append((path, path.parent.name, "unknown", None, 2, path.parent.parent))
        else:
            raise DataError(f"{path}: no such manifest, folder or file")
    seen, images, skipped = set(), [], skipped_early
    for file, dataset, modality, slice_index, axis, root in entries:
        key = (str(file), slice_index)
        if key in seen:
            continue
        seen.add(key)
        try:
            record = read_image(file, slice_axis=axis, slice_index=slice_index)
        except DataError as error:
            skipped.append((str(file), str(error)))
            continue
        array = normalise(record.array, record.meta, default_preset(modality), in_chans)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        longest = max(tensor.shape[-2:])
        if longest > max_side:
            factor = max_side / longest
            size = [max(1, round(s * factor)) for s in tensor.shape[-2:]]
            tensor = F.interpolate(tensor[None], size=size, mode="area")[0]
        try:
            relative = file.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            relative = f"{dataset}/{file.name}"
        name = relative + (f"#{slice_index}" if slice_index is not None else "")
        images.append(PretrainImage(tensor.numpy().astype(np.float16), dataset, modality, name))
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    if not images:
        raise DataError("no readable images to pretrain on")
    return images, skipped


def make_batch(images: list[PretrainImage], batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Dataset-balanced random resized crops (area 30–100%, aspect 3/4–4/3) with random horizontal flips."""
    datasets = sorted({image.dataset for image in images})
    by_dataset = {name: [i for i, image in enumerate(images) if image.dataset == name] for name in datasets}
    crops = []
    for _ in range(batch):
        members = by_dataset[datasets[int(torch.randint(len(datasets), (1,), generator=generator))]]
        image = torch.from_numpy(images[members[int(torch.randint(len(members), (1,), generator=generator))]].array)
        height, width = image.shape[-2:]
        area = float(torch.empty(1).uniform_(0.3, 1.0, generator=generator)) * height * width
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
        crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
        crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
        crop = image[:, top : top + crop_h, left : left + crop_w].float()[None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


def save_backbone(encoder: nn.Module, folder: Path, arch: str, model_args: dict[str, Any], in_chans: int,
                  img_size: int, provenance: dict[str, Any], dtype: str = "fp32") -> Path:
    """timm hub layout: ``model.safetensors`` + ``config.json`` (architecture, model_args, pretrained_cfg)."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    cast = torch.float16 if dtype == "fp16" else torch.float32
    state = {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype).contiguous()
             for k, v in encoder.state_dict().items() if "relative_position_index" not in k and "attn_mask" not in k}
    atomic_write(folder / "model.safetensors", lambda t: safetensors.torch.save_file(state, t))
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(encoder.num_features),
        "model_args": {**model_args, "in_chans": in_chans, "img_size": img_size},
        "pretrained_cfg": {"input_size": [in_chans, img_size, img_size], "first_conv": "patch_embed.proj",
                           "classifier": "head.fc", "num_classes": 0, "mean": [0.0] * in_chans,
                           "std": [1.0] * in_chans, "license": "see m4oe card: trained on public medical images"},
        "m4oe": provenance,
    }
    text = json.dumps(config, indent=2, default=list)
    atomic_write(folder / "config.json", lambda t: Path(t).write_text(text + "\n"))
    return folder


def pretrain(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    arch: str = "swin_tiny_patch4_window7_224",
    model_args: dict[str, Any] | None = None,
    in_chans: int = 3,
    img_size: int = 224,
    crop_size: int = 128,
    batch_size: int = 16,
    steps: int = 1000,
    lr: float = 1.5e-4,
    weight_decay: float = 0.05,
    warmup: int = 50,
    mask_ratio: float = 0.6,
    seed: int = 0,
    exclude_sites: Sequence[str] = (),
    checkpoint_every: int = 100,
    preview_every: int = 250,
    resume: bool = False,
    dtype: str = "fp32",
    progress: bool = True,
    num_threads: int | None = None,
    slice_axis: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    device: str = "auto",
) -> Path:
    """Pretrain and write ``out_dir/backbone`` (timm hub folder); returns its path.

    Args:
        sources: manifest CSVs, data folders (with ``manifest.csv``), image folders or files; masks are unused.
        model_args: Swin arguments (``embed_dim``, ``depths``, ``num_heads``, ``window_size``).
        img_size: the size the backbone is configured for (downstream training size).
        crop_size: pretraining crop size (multiple of 32; smaller is faster, Swin runs at any multiple of 32).
        checkpoint_every: steps between checkpoints (``pretrain_checkpoint.pt``, written atomically).
        preview_every: steps between reconstruction previews (``preview.png``).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``mps``; batches and masks are drawn on the CPU from
            the step's seed, so a run is the same data on any device.
        exclude_sites: sites or datasets never to pretrain on (see :func:`collect_images`); the list, the images
            left out per dataset and the names of the images used (``images.txt``) go into the backbone folder.
    """
    if crop_size % MASK_PATCH or img_size % MASK_PATCH:
        raise ConfigError(f"crop_size and img_size must be multiples of {MASK_PATCH}")
    if num_threads:
        torch.set_num_threads(num_threads)
    model_args = dict(model_args or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    excluded: dict[str, int] = {}
    images, skipped = collect_images(sources, in_chans, log=log, exclude_sites=exclude_sites, excluded=excluded,
                                     slice_axis=slice_axis)
    counts: dict[str, int] = {}
    for image in images:
        counts[image.dataset] = counts.get(image.dataset, 0) + 1
    log(f"pretraining on {len(images)} images from {len(counts)} datasets ({len(skipped)} skipped)"
        + (f"; excluded sites {sorted(set(exclude_sites))}: {sum(excluded.values())} entries left out"
           if exclude_sites else ""))
    torch.manual_seed(seed)
    model = SimMIM(build_swin(arch, in_chans, img_size, model_args), in_chans).to(resolve_device(device))
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    checkpoint = out / CHECKPOINT_NAME
    step, history = 0, []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), [dict(row) for row in state["history"]]
        set_rng_states(state.get("rng"))
        log(f"resumed from {checkpoint} at step {step}")
    elif resume:
        raise DataError(f"--resume: no checkpoint at {checkpoint}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc="pretrain (SimMIM)", unit="step")
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    model.train()
    while step < steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = make_batch(images, batch_size, crop_size, generator).to(device)
        mask = random_mask(batch_size, crop_size, crop_size, mask_ratio, generator).to(device)
        loss, reconstruction = model(batch, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        history.append({"step": step, "loss": float(loss.item()), "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - started})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step(step, float(loss.item()))
        if preview_every and (step % preview_every == 0 or step == steps):
            write_preview(out / "preview.png", batch.cpu(), mask.cpu(), reconstruction.detach().cpu())
        if checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": step, "history": history,
                     "rng": rng_states()}
            atomic_write(checkpoint, lambda t: torch.save(state, t))
            write_log(out, history)
    if bar is not None:
        bar.close()
    write_log(out, history)
    tail = [row["loss"] for row in history[-50:]]
    provenance = {
        "method": "SimMIM (masked image modelling, 32-px blocks, ratio %.2f, L1 on masked pixels)" % mask_ratio,
        "data": counts, "images": len(images), "skipped": len(skipped),
        "excluded_sites": sorted({name.strip() for name in exclude_sites if name.strip()}),
        "excluded_entries": excluded, "steps": steps, "batch_size": batch_size,
        "crop_size": crop_size, "lr": lr, "seed": seed, "final_loss_mean_last_50": float(np.mean(tail)),
        "first_loss": history[0]["loss"] if history else None, "seconds": history[-1]["seconds"] if history else 0,
        "date": time.strftime("%Y-%m-%d"), "loss_curve": loss_curve(history),
    }
    folder = save_backbone(model.encoder, out / "backbone", arch, model_args, in_chans, img_size, provenance, dtype)
    listing = "".join(f"{image.name}\n" for image in images)
    atomic_write(folder / "images.txt", lambda t: Path(t).write_text(listing))
    return folder


def loss_curve(history: list[dict[str, float]], points: int = 100) -> list[list[float]]:
    """The training curve the backbone carries in its ``config.json``: ``[last step, mean loss]`` per window, for at
    most ``points`` equal windows of the history (so the card can be drawn without the run folder)."""
    if not history:
        return []
    window = max(1, math.ceil(len(history) / points))
    return [[int(history[min(i + window, len(history)) - 1]["step"]),
             round(float(np.mean([row["loss"] for row in history[i : i + window]])), 5)]
            for i in range(0, len(history), window)]


def rng_states() -> dict[str, Any]:
    """The global generators as types ``torch.load(weights_only=True)`` accepts (tensors, ints, tuples).

    Batches and masks come from a per-step generator; the global ones still matter for stochastic depth (torch) and
    for any augmentation that draws from numpy or ``random``.
    """
    import random

    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_states(states: dict[str, Any] | torch.Tensor | None) -> None:
    """Restore :func:`rng_states`; also accepts older checkpoints (a bare torch state, or none)."""
    import random

    if states is None:
        return
    if isinstance(states, torch.Tensor):
        torch.set_rng_state(states)
        return
    torch.set_rng_state(states["torch"])
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))


def write_log(out: Path, history: list[dict[str, float]]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["step", "loss", "lr", "seconds"])
            writer.writeheader()
            writer.writerows(history)

    atomic_write(out / "log.csv", write)
    if len(history) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [row["step"] for row in history]
        losses = np.asarray([row["loss"] for row in history])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        figure, axis = plt.subplots(figsize=(5, 3))
        axis.plot(steps, losses, alpha=0.3, label="loss")
        axis.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
        axis.set_xlabel("step")
        axis.set_ylabel("masked L1")
        axis.legend()
        figure.tight_layout()
        atomic_write(out / "loss_curve.png", lambda t: figure.savefig(t, format="png", dpi=100))
        plt.close(figure)


def write_preview(path: Path, batch: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor) -> None:
    """Rows: original | masked input | reconstruction (masked blocks filled), for up to 4 images."""
    from PIL import Image

    rows = []
    for index in range(min(4, batch.shape[0])):
        pixel_mask = mask[index].repeat_interleave(MASK_PATCH, 0).repeat_interleave(MASK_PATCH, 1)
        original = batch[index]
        masked = original * (~pixel_mask)
        filled = torch.where(pixel_mask, reconstruction[index], original)
        tiles = [to_display(t) for t in (original, masked, filled)]
        rows.append(np.concatenate(tiles, axis=1))
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    atomic_write(path, lambda t: picture.save(t, format="PNG"))


def to_display(image: torch.Tensor) -> np.ndarray:
    data = image.float().numpy()
    data = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    low, high = np.percentile(data, [1, 99])
    return (np.clip((data - low) / max(high - low, 1e-6), 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)
