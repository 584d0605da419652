"""The service without HTTP: one backbone in memory, every adapter loaded onto it, requests segmented through the
mixed-modality batcher. :mod:`.app` puts an HTTP API on it; it can also be used directly from Python.

    upload bytes → decode (:mod:`.uploads`) → modality (given, or the image-level router) → acquire its adapter
    version → preset → sliding windows / resize, tiles through :class:`~.batching.MicroBatcher` → masks → the
    upload's format (PNG, NIfTI, DICOM SEG) + JSON (modality, routing, labels, adapter version, backbone, timings)
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..adapter_file import read_header
from ..config import DecoderConfig, ExpertConfig
from ..data import normalise
from ..evaluation import predict_mask
from ..inference import parse_threshold
from ..model import SegmentationModel
from .batching import MicroBatcher
from .errors import Busy, RoutingUnavailable, UnknownModality
from .metrics import ServiceMetrics
from .registry import AdapterRegistry, AdapterVersion
from .uploads import Upload, decode, encode


@dataclass
class ServeSettings:
    """Limits and batching of a service.

    Attributes:
        max_batch: most tiles per forward pass (1: no batching across requests).
        max_wait_ms: longest wait of a tile group for others to join its batch (milliseconds).
        max_body_bytes: largest request body (bytes); also the unpacked size limit of a zipped DICOM series.
        max_pixels: most pixels per upload, over all slices (checked from headers before decoding).
        max_in_flight: segment requests served at once; more get 503.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (``"auto"``: the GPU when present).
        keep_dtype: hold each adapter in its file's dtype (an fp16 file takes half the memory of fp32 and gives the
            same masks: its values are cast to the backbone's dtype at use); ``False``: widen to the backbone's.
        watch: a folder whose adapter files are served as they are added, replaced and deleted
            (:mod:`.watch`); started by :meth:`Service.from_zoo` / :meth:`Service.from_adapters` once their
            adapters are loaded. ``None``: no folder is watched.
        watch_interval_s: seconds between two looks at the watched folder.
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 64 * 2**20
    max_pixels: int = 50_000_000
    max_in_flight: int = 64
    device: str = "auto"
    keep_dtype: bool = True
    watch: str | None = None
    watch_interval_s: float = 2.0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class Segmentation:
    """A segment request's answer: the mask file in the upload's format, the masks and the JSON about them."""

    data: bytes
    media_type: str
    filename: str
    masks: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def _route(model: SegmentationModel, images: list[np.ndarray]):
    """The image-level router's :class:`~m4oe_adapters.routing.RoutingDecision` for an upload: one raw ``[C, H, W]``
    image, or the slices of a volume or DICOM series, routed as a whole by up to 16 evenly spaced slices
    (``modality`` ``None`` = unknown). The caller holds the model lock.

    Raises:
        RoutingUnavailable: the router cannot decide (no served adapter has a routing signature); 422: pass a
            modality.
    """
    from ..errors import M4oEError
    from ..routing import volume_routing_indices

    try:
        if len(images) == 1:
            return model.route(images)[0]
        return model.route_volume([images[index] for index in volume_routing_indices(len(images))])
    except M4oEError as error:
        raise RoutingUnavailable(f"no modality given and the router cannot decide: {error}") from None


class Service:
    """One model, its served adapters, the batcher and the metrics.

    Args:
        model: a :class:`SegmentationModel`; its backbone is shared by every adapter. Modalities already in it are
            not served: adapters are added with :meth:`add_adapter` (or built by :meth:`from_zoo` /
            :meth:`from_adapters`) so that each one has a file version.
        settings: limits and batching.
    """

    def __init__(self, model: SegmentationModel, settings: ServeSettings | None = None) -> None:
        self.settings = settings or ServeSettings()
        self._submitting = 0  # images being predicted now (each may submit tiles to the batcher)
        self._submitting_lock = threading.Lock()
        self.device = resolve_device(self.settings.device)
        self.model = model.eval().to(self.device)
        self.metrics = ServiceMetrics()
        self.batcher = MicroBatcher(
            self.model, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms, device=self.device,
            on_batch=self.metrics.on_batch, queue_length=self.metrics.queue.set, submitters=lambda: self._submitting,
        )
        self.registry = AdapterRegistry(self.model, self.batcher.lock, on_change=self.metrics.adapters.set,
                                        keep_dtype=self.settings.keep_dtype)
        self._in_flight = threading.BoundedSemaphore(self.settings.max_in_flight)
        self._slices = ThreadPoolExecutor(max_workers=max(2, self.settings.max_batch), thread_name_prefix="m4oe-slice")
        import monai.data  # noqa: F401 — the readers and inferer load now, not during the first request
        import monai.inferers  # noqa: F401

        backbone = self.model.backbone.identity()
        self.backbone = {key: backbone[key] for key in ("family", "name", "fingerprint", "weights")}
        self.watcher = None

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_zoo(cls, folder: str | Path, settings: ServeSettings | None = None) -> "Service":
        """The zoo's reference backbone and every adapter its ``index.json`` lists."""
        from ..zoo import load_reference_backbone, read_index

        folder = Path(folder)
        index = read_index(folder)
        files = [folder / entry["file"] for entry in index["adapters"]]
        return cls.from_adapters(files, None, settings, backbone=load_reference_backbone(folder))

    @classmethod
    def from_adapters(
        cls, files: Sequence[str | Path], weights: str | Path | None, settings: ServeSettings | None = None, *,
        backbone=None,
    ) -> "Service":
        """The backbone the first adapter names (``weights``, unless ``backbone`` is given) and every adapter."""
        from ..backbones import backbone_from_identity

        if not files:
            from ..errors import ConfigError

            raise ConfigError("no adapter to serve: give a zoo folder or at least one adapter file")
        metadata, _ = read_header(files[0])
        if backbone is None:
            backbone = backbone_from_identity(metadata["backbone"], weights)
        model = SegmentationModel(backbone, ExpertConfig.from_dict(metadata["expert"]),
                                  DecoderConfig.from_dict(metadata["decoder"]))
        service = cls(model, settings)
        for path in files:
            service.add_adapter(Path(path).read_bytes(), source=Path(path).name)
        if service.settings.watch is not None:
            service.watch(service.settings.watch, service.settings.watch_interval_s)
        return service

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, data: bytes, *, source: str, name: str | None = None, replace: bool = False
                    ) -> AdapterVersion:
        """Validate and serve an adapter file's bytes (hot swap when ``replace``); see :mod:`.registry`."""
        action = "replace" if replace and name is not None and self.registry.get(name) else "add"
        try:
            version = self.registry.add(data, source=source, name=name, replace=replace)
        except Exception:
            self.metrics.adapter_changes.labels(action, "refused").inc()
            raise
        self.metrics.adapter_changes.labels(action, "ok").inc()
        return version

    def remove_adapter(self, name: str) -> AdapterVersion:
        try:
            version = self.registry.remove(name)
        except Exception:
            self.metrics.adapter_changes.labels("remove", "refused").inc()
            raise
        self.metrics.adapter_changes.labels("remove", "ok").inc()
        return version

    def watch(self, folder: str | Path, interval_s: float = 2.0):
        """Serve the adapter files of ``folder`` as they come and go (:class:`~.watch.FolderWatcher`); files
        this service already serves from there are kept, not loaded again."""
        from .watch import FolderWatcher

        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = FolderWatcher(self, folder, interval_s).start()
        return self.watcher

    @property
    def ready(self) -> bool:
        return self.batcher.alive and len(self.registry) > 0

    # ------------------------------------------------------------------------------------------- segmenting
    def segment(self, data: bytes, *, modality: str | None = None, name: str = "upload",
                threshold: float | str | None = None) -> Segmentation:
        """Segment one upload (image, NIfTI volume, DICOM file or zipped series).

        Args:
            data: the file's bytes.
            modality: a served modality name, or ``None`` to let the router decide.
            name: the upload's name in messages.
            threshold: for a two-class adapter, the foreground where its probability exceeds this (0-1), or
                ``"otsu"`` (each image's own Otsu threshold); ``None``: the most probable class. Adapters of more
                classes keep the most probable class; the answer's ``threshold`` says what was applied.

        Raises:
            Busy (503), PayloadTooLarge (413), UnsupportedMediaType (415), UnknownModality / RoutingUnavailable
            (422), DataError (400).
        """
        if not self._in_flight.acquire(blocking=False):
            raise Busy(f"{self.settings.max_in_flight} requests are being served; retry shortly")
        self.metrics.in_flight.inc()
        try:
            return self._segment(data, modality, name, parse_threshold(threshold))
        finally:
            self.metrics.in_flight.dec()
            self._in_flight.release()

    def _segment(self, data: bytes, modality: str | None, name: str, threshold: float | str | None) -> Segmentation:
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        upload = decode(data, max_pixels=self.settings.max_pixels, max_series_bytes=self.settings.max_body_bytes,
                        name=name)
        timings["decode_ms"] = _since(clock)
        clock = time.perf_counter()
        version, routing = self._choose(upload, modality)
        timings["route_ms"] = _since(clock)
        applied = threshold if version.info.num_classes == 2 else None
        try:
            clock = time.perf_counter()
            masks = self._predict(upload, version, applied)
            timings["predict_ms"] = _since(clock)
        finally:
            self.registry.release(version)
        clock = time.perf_counter()
        body, media_type, filename = encode(upload, masks, list(version.info.label_names),
                                            algorithm=f"m4oe-adapters {version.name}", algorithm_version=version.version)
        timings["encode_ms"] = _since(clock)
        info = {
            "modality": version.name,
            "routing": routing,
            "threshold": applied,
            "labels": list(version.info.label_names),
            "adapter": {key: value for key, value in version.describe().items()
                        if key in ("name", "version", "sha256", "file")},
            "backbone": self.backbone,
            "input": {"kind": upload.kind, "images": len(upload.images),
                      "shape": list(upload.volume_shape or upload.images[0].shape[-2:])},
            "mask": {"media_type": media_type, "filename": filename},
            "timings_ms": timings,
        }
        return Segmentation(body, media_type, filename, masks, info)

    def _choose(self, upload: Upload, modality: str | None) -> tuple[AdapterVersion, dict[str, Any]]:
        """The adapter version to use (acquired: the caller releases it) and how it was chosen."""
        if modality:
            return self.registry.acquire(modality), {"by": "request", "confidence": None, "scores": {}}
        middle = len(upload.images) // 2
        tag = upload.metas[middle].get("dicom_modality")
        if tag:  # a DICOM Modality tag that names a served modality (CT, MR → MRI, ...) decides first
            from ..prediction import DICOM_MODALITY

            wanted = DICOM_MODALITY.get(str(tag).upper(), str(tag)).lower()
            named = [name for name in self.registry.names() if name.lower() == wanted]
            if len(named) == 1:
                try:
                    return self.registry.acquire(named[0]), {"by": "dicom tag", "confidence": None, "scores": {}}
                except UnknownModality:
                    pass  # removed meanwhile: the router decides
        with self.batcher.lock:  # the router runs the backbone: no batch may run meanwhile
            decision = _route(self.model, upload.images)
        scores: dict[str, float] = {}
        for slot, score in dict(getattr(decision, "scores", {}) or {}).items():
            served = self.registry.by_slot(slot)
            if served is not None:
                scores[served.name] = max(float(score), scores.get(served.name, float("-inf")))
        confidence = float(getattr(decision, "confidence", 0.0))
        chosen = self.registry.by_slot(decision.modality) if decision.modality is not None else None
        if chosen is None and getattr(decision, "reason", None) == "noise":
            raise UnknownModality("unknown modality: the image is pixel noise (neighbouring pixels do not correlate), "
                                  "refused whatever the routing scores; pass ?modality=NAME to force one")
        if chosen is None:
            best = max(scores.items(), key=lambda item: item[1], default=None)
            raise UnknownModality(
                "unknown modality: the router found no loaded adapter that fits this image"
                + (f" (closest: {best[0]}, score {best[1]:.3f}, confidence {confidence:.3f})" if best else "")
                + f"; pass ?modality=NAME if you know it (served: {', '.join(self.registry.names()) or 'none'})"
            )
        return self.registry.acquire(chosen.name), {"by": "router", "confidence": confidence, "scores": scores}

    def _predict(self, upload: Upload, version: AdapterVersion, threshold: float | str | None = None
                 ) -> list[np.ndarray]:
        """``[H, W]`` class ids per image: the adapter's preset, then its windows or resize, tiles batched."""
        info = version.info
        in_chans = self.model.backbone.in_chans
        resize_mode = info.provenance.get("resize_mode", "crop")
        dtype = np.uint8 if info.num_classes <= 256 else np.uint16

        def predictor(tiles: torch.Tensor) -> torch.Tensor:
            return self.batcher.predict(tiles, version.slot)

        def one(raw: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
            with self._submitting_lock:
                self._submitting += 1
            try:
                image = torch.from_numpy(np.ascontiguousarray(normalise(raw, meta, info.preset, in_chans))).float()
                return predict_mask(predictor, image, info.input_size, resize_mode,
                                    threshold=threshold).numpy().astype(dtype)
            finally:
                with self._submitting_lock:
                    self._submitting -= 1

        if len(upload.images) == 1:
            return [one(upload.images[0], upload.metas[0])]
        # Slices run side by side so that their tiles share batches (with each other and with other requests).
        return list(self._slices.map(one, upload.images, upload.metas))

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.close()
        self._slices.shutdown(wait=False, cancel_futures=True)


def _since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
