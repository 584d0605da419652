"""Mixed-modality micro-batching: tiles from concurrent requests, whatever their modality, go through the model in
one forward pass.

Each request thread runs its own sliding-window (or resize) inference and hands every group of tiles
``[n, C, h, w]`` of one modality to :meth:`MicroBatcher.predict`. One worker thread collects groups until the batch
holds ``max_batch`` tiles or the first group has waited ``max_wait_ms``, concatenates groups of the same tile shape
(ordered by modality), calls ``model(tiles, per_tile_modalities)`` once under the model lock, and gives each group
back exactly its own rows, cut to its own modality's classes. Groups larger than ``max_batch`` run alone, unsplit;
groups of another tile shape wait for the next batch.

The model lock (:attr:`MicroBatcher.lock`) is also what adapter changes take (see :mod:`.registry`): a change
happens between two batches, never during one. The model's routing state is shared by all its layers, so every
forward of the model must hold this lock (the router's included).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import M4oEError
from ..model import SegmentationModel



@dataclass
class _Group:
    tiles: torch.Tensor  # [n, C, h, w]
    slot: str  # the modality's name inside the model
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def shape(self) -> tuple:
        return tuple(self.tiles.shape[1:]) + (self.tiles.dtype,)


@dataclass
class BatchStats:
    """What one forward pass held: ``tiles`` (rows), ``groups`` (requests' tile groups), ``modalities`` (distinct)."""

    tiles: int
    groups: int
    modalities: int
    seconds: float


class MicroBatcher:
    """Groups tile batches of concurrent requests into mixed-modality forward passes.

    Args:
        model: the segmentation model (hard routing; every adapter loaded into it).
        max_batch: most tiles per forward (1 disables batching: each group runs alone).
        max_wait_ms: longest time the first group of a batch waits for others, in milliseconds.
        device: where the forward runs; tiles arrive and results leave on the CPU.
        on_batch: called after each forward with its :class:`BatchStats` (metrics).
        queue_length: called with the number of waiting tiles whenever it changes (metrics).
        submitters: how many threads may submit tiles now (requests past decoding); a batch stops waiting once it
            holds a group from each, so a lone request never waits ``max_wait_ms`` for company that cannot come.
    """

    def __init__(
        self,
        model: SegmentationModel,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        device: str | torch.device = "cpu",
        on_batch: Callable[[BatchStats], None] | None = None,
        queue_length: Callable[[int], None] | None = None,
        submitters: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise M4oEError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.model = model
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.device = torch.device(device)
        self.lock = threading.RLock()
        self._on_batch = on_batch
        self._queue_length = queue_length
        self._submitters = submitters
        self._queue: deque[_Group] = deque()
        self._waiting_tiles = 0
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="m4oe-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- client side
    def submit(self, tiles: torch.Tensor, slot: str) -> Future:
        """Queue ``tiles [n, C, h, w]`` of modality ``slot``; the future gives logits ``[n, K, h, w]`` (CPU), ``K``
        the modality's class count."""
        if tiles.dim() != 4 or tiles.shape[0] == 0:
            raise M4oEError(f"tiles must be [n, C, h, w] with n >= 1, got shape {tuple(tiles.shape)}")
        group = _Group(tiles.detach().to("cpu", torch.float32), slot)
        with self._condition:
            if self._closed:
                raise M4oEError("the batcher is closed (the service is shutting down)")
            self._queue.append(group)
            self._waiting_tiles += group.tiles.shape[0]
            self._report_queue()
            self._condition.notify_all()
        return group.future

    def predict(self, tiles: torch.Tensor, slot: str) -> torch.Tensor:
        """Blocking :meth:`submit`: the logits of ``tiles``."""
        return self.submit(tiles, slot).result()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the queued groups are served."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------- worker side
    def _report_queue(self) -> None:
        if self._queue_length is not None:
            self._queue_length(self._waiting_tiles)

    def _take_batch(self) -> list[_Group] | None:
        """The next batch: the oldest group, plus same-shape groups that fit, waiting at most ``max_wait``."""
        with self._condition:
            while not self._queue:
                if self._closed:
                    return None
                self._condition.wait()
            first = self._queue.popleft()
            batch, count = [first], first.tiles.shape[0]
            deadline = first.enqueued + self.max_wait
            while count < self.max_batch:
                for group in list(self._queue):
                    if group.shape == first.shape and count + group.tiles.shape[0] <= self.max_batch:
                        self._queue.remove(group)
                        batch.append(group)
                        count += group.tiles.shape[0]
                remaining = deadline - time.perf_counter()
                everyone = self._submitters is not None and len(batch) >= self._submitters()
                if count >= self.max_batch or remaining <= 0 or self._closed or everyone:
                    break
                self._condition.wait(remaining)
            self._waiting_tiles -= count
            self._report_queue()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Group]) -> None:
        batch.sort(key=lambda group: group.slot)  # one order per modality set: fewer cached expert stacks
        start = time.perf_counter()
        try:
            tiles = torch.cat([group.tiles for group in batch]).to(self.device)
            names = [group.slot for group in batch for _ in range(group.tiles.shape[0])]
            with self.lock, torch.no_grad():
                logits = self.model(tiles, names, routing="hard")
                classes = [self.model.modalities[group.slot].num_classes for group in batch]
            logits = logits.float().cpu()
        except BaseException as error:  # every waiting request gets the error, the worker goes on
            for group in batch:
                group.future.set_exception(error)
            return
        row = 0
        for group, num_classes in zip(batch, classes):
            count = group.tiles.shape[0]
            group.future.set_result(logits[row : row + count, :num_classes])
            row += count
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(names), len(batch), len({g.slot for g in batch}),
                                      time.perf_counter() - start))

