"""The training loop shared by every mode: DiceCE loss, validation Dice, early stopping, resumable checkpoints,
deterministic data order, optional multi-process data parallelism (torchrun + DDP, gloo on CPU).

Determinism: the sample order of epoch ``e`` is a permutation drawn from ``seed + e``; each sample's augmentation
is seeded from ``(seed, e, index)``. A checkpoint therefore only needs the step, the epoch and the position in it
(plus model, optimiser, scheduler and RNG states) to continue exactly where a killed run stopped.
"""
from __future__ import annotations

import collections
import csv
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .adapter_file import atomic_write
from .errors import ConfigError, DataError
from .runtime import autocast, check_precision, grad_scaler, module_device, resolve_device

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Optimisation settings (every field has a default that works for few-shot adapters on CPU).

    Attributes:
        steps: optimiser steps.
        batch_size: images per step (per process under DDP).
        lr: peak learning rate (AdamW), cosine decay after ``warmup`` steps.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps.
        val_every: validate every this many steps (0: only at the end).
        patience: stop after this many validations without a better Dice (``None``: never stop early).
        seed: makes two runs identical.
        checkpoint_every: write ``checkpoint.pt`` every this many steps (0: never).
        log_every: write a CSV row every this many steps.
        precision: ``"32"`` (fp32), ``"bf16"`` or ``"16"`` (fp16 with a gradient scaler): ``torch.autocast`` for the
            forward pass, see :mod:`~m4oe_adapters.runtime`. Parameters and saved adapters stay fp32.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``; ``None`` trains where the segmenter already is.
        gradient_checkpointing: recompute each backbone block during backward instead of keeping its activations
            (modes ``experts`` and ``decoder``; see :mod:`~m4oe_adapters.checkpointing`).
        prefetch: batches read and augmented ahead by one background thread while the current step runs (0: read
            each batch when it is needed). The batches are identical either way (each item is seeded by its own
            ``(seed, epoch, index)``), and so is a resumed run; the training dataset must not be read elsewhere
            meanwhile (it is not: validation has its own). Helps where reading images is a sizeable part of a step
            (large images, fast accelerator); on a busy CPU the thread competes with the model for cores.
        max_minutes: stop after this much wall time (a stated CPU budget; ``None``: no limit). A run stopped by it
            is not repeatable step for step; ``stopped_early`` is set.
        validate_start: also validate the starting weights (step 0), so that a run starting from a trained adapter
            (``m4oe train --init``) ends with them, unchanged, when no step validates better (``best_step`` 0).
    """

    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    val_every: int = 50
    patience: int | None = None
    seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    precision: str = "32"
    device: str | None = None
    gradient_checkpointing: bool = False
    max_minutes: float | None = None
    prefetch: int = 0
    validate_start: bool = False


@dataclass
class TrainResult:
    best_val_dice: float | None
    best_step: int
    steps_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index * 101) % (2**31 - 1)


class EpochSampler:
    """Infinite, resumable sample order: epoch ``e`` is ``randperm(n, seed + e)``, sharded across processes."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if size == 0:
            raise DataError("the training set is empty")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return order[self.rank :: self.world] or order[:1]

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next ``count`` ``(epoch, index)`` pairs."""
        taken = []
        while len(taken) < count:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            taken.append((self.epoch, order[self.position]))
            self.position += 1
        return taken

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchLoader:
    """Training batches in the sampler's order, optionally read ``prefetch`` batches ahead in one background thread.

    :meth:`state` is the sampler state after the batches already handed out (not after those read ahead), so a
    checkpoint taken between steps resumes exactly where the run was. On CUDA the batches come in pinned memory, so
    the copy to the GPU (``non_blocking``) overlaps the computation.
    """

    def __init__(self, dataset, sampler: EpochSampler, batch_size: int, seed: int, prefetch: int = 0,
                 pin: bool = False) -> None:
        self.dataset, self.sampler, self.batch_size, self.seed = dataset, sampler, batch_size, seed
        self.prefetch, self.pin = max(0, int(prefetch)), pin
        self.consumed = sampler.state()
        self.pending: collections.deque = collections.deque()
        self.pool = None
        if self.prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m4oe-batches")

    def _read(self, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        batch = collate([fetch(self.dataset, index, sample_seed(self.seed, epoch, index)) for epoch, index in pairs])
        if self.pin:
            batch["image"], batch["label"] = batch["image"].pin_memory(), batch["label"].pin_memory()
        return batch

    def _plan(self) -> None:
        pairs = self.sampler.take(self.batch_size)
        after = self.sampler.state()
        work = self.pool.submit(self._read, pairs) if self.pool is not None else pairs
        self.pending.append((work, after))

    def next(self) -> dict[str, Any]:
        while len(self.pending) < max(1, self.prefetch):
            self._plan()
        work, after = self.pending.popleft()
        batch = work.result() if self.pool is not None else self._read(work)
        self.consumed = after
        if self.pool is not None:
            self._plan()  # keep reading ahead while the caller computes
        return batch

    def state(self) -> dict[str, int]:
        return dict(self.consumed)

    def close(self) -> None:
        if self.pool is not None:
            for work, _ in self.pending:
                work.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
        self.pending.clear()


def fetch(dataset, index: int, seed: int) -> dict[str, Any]:
    """``dataset[index]`` with its random augmentation seeded by ``seed`` (reproducible and resumable)."""
    if hasattr(dataset, "set_sample_seed"):
        dataset.set_sample_seed(seed)
    else:
        transform = getattr(dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
    return dataset[index]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(f"cannot batch {key} tensors of shapes {sorted(shapes)}; set a training size")
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            batch[key] = values
    return batch


def dice_ce_loss(num_classes: int):
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=num_classes == 1)


@torch.no_grad()
def validation_dice(segmenter: nn.Module, dataset, num_classes: int, batch_size: int = 4, precision: str = "32") -> float:
    """Mean foreground Dice (MONAI ``DiceMetric``, background excluded) over a validation dataset, computed on the
    segmenter's device under ``precision`` (see :mod:`~m4oe_adapters.runtime`)."""
    from monai.metrics import DiceMetric

    if dataset is None or len(dataset) == 0:
        return float("nan")
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    was_training = segmenter.training
    segmenter.eval()
    device = module_device(segmenter)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        with autocast(device, precision):
            logits = segmenter(batch["image"].to(device))
        prediction = one_hot(logits.argmax(1, keepdim=True), num_classes)
        metric(prediction, one_hot(batch["label"].to(device), num_classes))
    segmenter.train(was_training)
    value = metric.aggregate().item()
    return float(value)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, 1, H, W]`` class ids → ``[B, K, H, W]`` one-hot."""
    from monai.networks.utils import one_hot as monai_one_hot

    return monai_one_hot(labels.long(), num_classes, dim=1)


def cosine_schedule(optimizer, warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group when launched by torchrun: gloo for CPU tensors and,
    where CUDA is present, NCCL for CUDA tensors (a run on the CPU of a GPU machine needs gloo: with NCCL alone DDP
    failed there, "No backend type associated with device type cpu")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def process_gpu() -> torch.device:
    """The GPU of this torchrun process (one per process: ``LOCAL_RANK``); a typed error when there are more
    processes than GPUs."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError(f"torchrun process {local} has no GPU of its own ({count} visible): start at most "
                          f"{count} per machine (--nproc_per_node {count}), or train on the CPU with --device cpu")
    return torch.device("cuda", local)


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_position"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def save_checkpoint(path: Path, segmenter, optimizer, scheduler, sampler, step, best, best_state, history,
                    scaler=None) -> None:
    state = {
        "model": segmenter.checkpoint_state(),
        "best_model": best_state if best_state is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state(),
        "step": step,
        "best": best,
        "rng": rng_state(),
        "history": [{k: float(v) for k, v in row.items()} for row in history],
    }
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()  # fp16: the loss scale continues where it was
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise DataError(f"{path}: cannot resume from this checkpoint ({type(error).__name__}: {error})") from None


def train(
    segmenter: nn.Module,
    train_dataset,
    val_dataset,
    num_classes: int,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
) -> TrainResult:
    """Train ``segmenter`` (built by :func:`~m4oe_adapters.segmenters.build_segmenter`) in place.

    The best validation state (by mean foreground Dice) is restored at the end. With ``out_dir``, writes
    ``log.csv`` (step, loss, lr, val_dice, seconds) and, every ``checkpoint_every`` steps, ``checkpoint.pt``;
    ``resume=True`` continues from that checkpoint and ends with the same weights as an uninterrupted run.
    ``on_step(step, row)`` is called after every step (progress reporting, tests that interrupt a run).
    """
    if config.steps < 1 or config.batch_size < 1:
        raise ConfigError("steps and batch_size must be at least 1")
    rank, world = distributed_context()
    seed_everything(config.seed)
    check_precision(config.precision)
    device = resolve_device(config.device) if config.device else module_device(segmenter)
    if world > 1 and device.type == "cuda":
        device = process_gpu()
        torch.cuda.set_device(device)
    segmenter.to(device)
    if config.gradient_checkpointing:
        from .checkpointing import set_gradient_checkpointing

        if not hasattr(getattr(segmenter, "model", None), "routing"):
            raise ConfigError(f"gradient checkpointing is available in modes experts and decoder, not "
                              f"{getattr(segmenter, 'mode', type(segmenter).__name__)}")
        set_gradient_checkpointing(segmenter.model)
    parameters = segmenter.trainable_parameters()
    model: nn.Module = segmenter
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(segmenter, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = grad_scaler(device, config.precision)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    sampler = EpochSampler(len(train_dataset), config.seed, rank, world)
    loss_function = dice_ce_loss(num_classes)
    out_dir = Path(out_dir) if out_dir is not None else None
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir else None
    step, best, best_step, best_state, history = 0, -1.0, 0, None, []
    if resume:
        if checkpoint_path is None or not checkpoint_path.exists():
            raise DataError(f"--resume: no checkpoint at {checkpoint_path}")
        state = load_checkpoint(checkpoint_path)
        segmenter.load_checkpoint_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state(state["sampler"])
        step, best, history = int(state["step"]), float(state["best"]), list(state["history"])
        best_step = int(max((row["step"] for row in history if row.get("val_dice") == best), default=0))
        set_rng_state(state["rng"])
        best_state = state["best_model"] or None
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {getattr(segmenter, 'mode', '')}", unit="step")
    started = time.perf_counter()
    validations_without_gain = 0
    stopped_early = False
    if config.validate_start and step == 0 and val_dataset is not None and len(val_dataset) > 0:
        segmenter.set_training_behaviour(False)
        best = validation_dice(segmenter, val_dataset, num_classes, config.batch_size, config.precision)
        best_step, best_state = 0, segmenter.checkpoint_state()
        history.append({"step": 0, "loss": float("nan"), "lr": 0.0, "seconds": 0.0, "val_dice": best})
    segmenter.train()
    segmenter.set_training_behaviour(True)
    last_dice = float("nan")
    loader = BatchLoader(train_dataset, sampler, config.batch_size, config.seed, config.prefetch,
                         pin=device.type == "cuda")  # pinned pages copy to the GPU asynchronously
    try:
        while step < config.steps:
            batch = loader.next()
            images, labels = batch["image"], batch["label"]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, config.precision):
                logits = model(images)
            loss = loss_function(logits.float(), labels)  # the loss in fp32 (softmax and log of small probabilities)
            if not torch.isfinite(loss):
                raise DataError(f"training loss became {loss.item()} at step {step}; check the images "
                                f"({batch['path']})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # fp16: the scaled loss; otherwise unchanged
            scaler.step(optimizer)  # skips the step if the scaled gradients overflowed
            scaler.update()
            scheduler.step()
            step += 1
            row = {"step": step, "loss": float(loss.item()), "lr": scheduler.get_last_lr()[0],
                   "seconds": time.perf_counter() - started}
            validate = config.val_every and step % config.val_every == 0 or step == config.steps
            if validate and val_dataset is not None and len(val_dataset) > 0:
                segmenter.set_training_behaviour(False)
                last_dice = validation_dice(segmenter, val_dataset, num_classes, config.batch_size, config.precision)
                segmenter.set_training_behaviour(True)
                row["val_dice"] = last_dice
                if last_dice > best:
                    best, best_step, best_state = last_dice, step, segmenter.checkpoint_state()
                    validations_without_gain = 0
                else:
                    validations_without_gain += 1
            if step % config.log_every == 0 or "val_dice" in row or step == config.steps:
                history.append(row)
            if bar is not None:
                bar.update(1)
                postfix = {"loss": f"{row['loss']:.3f}"}
                if not math.isnan(last_dice):  # no validation yet: no Dice to show (was "dice=nan")
                    postfix["dice"] = f"{last_dice:.3f}"
                bar.set_postfix(postfix)
            if checkpoint_path and config.checkpoint_every and step % config.checkpoint_every == 0 and rank == 0:
                save_checkpoint(
                    checkpoint_path, segmenter, optimizer, scheduler, loader, step, best, best_state, history, scaler
                )
            if on_step is not None:
                on_step(step, row)
            if config.patience is not None and validations_without_gain >= config.patience:
                stopped_early = True
                break
            if config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes:
                stopped_early = True
                break
    finally:
        loader.close()
    if bar is not None:
        bar.close()
    segmenter.set_training_behaviour(False)
    segmenter.eval()
    if world > 1:
        synchronise_untrained_state(segmenter)
    if best_state is not None:
        segmenter.load_checkpoint_state(best_state)
    if out_dir is not None and rank == 0:
        write_log(out_dir / "log.csv", history)
    return TrainResult(best if best >= 0 else None, best_step, step, history, stopped_early)


def synchronise_untrained_state(segmenter: nn.Module) -> None:
    """Average what DDP does not synchronise (router keys moved by moving averages) across processes."""
    import torch.distributed as dist

    model = getattr(segmenter, "model", None)
    layers = getattr(model, "expert_layers", {})
    for layer in layers.values():
        key = layer.router_key[segmenter.modality]
        with torch.no_grad():
            dist.all_reduce(key.data)
            key.data /= dist.get_world_size()


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    columns = ["step", "loss", "lr", "val_dice", "seconds"]

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({key: row.get(key, "") for key in columns})

    atomic_write(path, write)


__all__ = ["TrainConfig", "TrainResult", "train", "validation_dice"]
