"""Helpers of the service tests: tiny random models and adapters made on the spot (not pretrained), a live uvicorn
server on a free loopback port that stops by itself, and upload builders (PNG, NIfTI, DICOM)."""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from m4oe_adapters import ExpertConfig, SegmentationModel, save_adapter
from m4oe_adapters.serve import ServeSettings, Service, Tokens, create_app

from conftest import tiny_backbone

TOKENS = Tokens(predict="predict-token-0123456789", admin="admin-token-0123456789ab")
AUTH = {"Authorization": f"Bearer {TOKENS.predict}"}
ADMIN = {"Authorization": f"Bearer {TOKENS.admin}"}


def random_adapters(classes: dict[str, int], *, seed: int = 0, resize: tuple[str, ...] = ()) -> SegmentationModel:
    """A tiny model whose modalities have random non-zero experts and random decoders (64×64 windows); names in
    ``resize`` predict by resizing instead of sliding windows. Random weights: a stand-in, not a trained model."""
    model = SegmentationModel(tiny_backbone(), ExpertConfig(rank=4))
    for index, (name, count) in enumerate(classes.items()):
        model.add_modality(name, count, input_size=(64, 64), seed=seed * 100 + index)
        generator = torch.Generator().manual_seed(seed * 100 + index + 7)
        with torch.no_grad():
            for layer in model.expert_layers.values():
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=generator) * 0.1)
        if name in resize:
            model.modalities[name].provenance["resize_mode"] = "resize"
    return model.eval()


def adapter_bytes(model: SegmentationModel, name: str, folder: Path) -> bytes:
    return save_adapter(model, name, folder / f"{name}-{id(model)}.safetensors").read_bytes()


def empty_service(**settings) -> Service:
    """A service on the same tiny backbone as :func:`random_adapters`, serving nothing yet."""
    return Service(SegmentationModel(tiny_backbone(), ExpertConfig(rank=4)), ServeSettings(device="cpu", **settings))


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_png(height: int, width: int, seed: int) -> tuple[bytes, np.ndarray]:
    """A smooth random grey image (so masks are not noise) as PNG bytes, and its ``[1, H, W]`` float array."""
    generator = np.random.default_rng(seed)
    small = generator.random((max(2, height // 8), max(2, width // 8)))
    image = np.kron(small, np.ones((8, 8)))[:height, :width]
    image = np.pad(image, ((0, max(0, height - image.shape[0])), (0, max(0, width - image.shape[1]))), mode="edge")
    pixels = (image * 255).astype(np.uint8)
    return png_bytes(pixels), pixels[None].astype(np.float32)


class LiveServer:
    """uvicorn serving ``service`` in a thread on a free 127.0.0.1 port; stops (and closes the service) on exit."""

    def __init__(self, service: Service, tokens: Tokens = TOKENS) -> None:
        import uvicorn

        self.service = service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(create_app(service, tokens), log_level="error", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 20 s")
            time.sleep(0.02)
        return self

    def client(self, headers: dict | None = None):
        import httpx

        return httpx.Client(base_url=self.url, headers=headers or AUTH, timeout=60.0, trust_env=False)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.socket.close()
        self.service.close()


def dicom_series(count: int, seed: int = 0) -> list:
    """``count`` single-frame CT instances of one series (pydicom's bundled CT_small.dcm with new UIDs, positions
    and pixels), in slice order."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    generator = np.random.default_rng(seed)
    series, frame = generate_uid(), generate_uid()
    datasets = []
    for index in range(count):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SeriesInstanceUID = series
        dataset.FrameOfReferenceUID = frame
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = index + 1
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, float(index * 5)]
        small = generator.integers(0, 1200, (16, 16))
        pixels = np.kron(small, np.ones((8, 8))).astype(np.int16)
        dataset.PixelData = pixels.tobytes()
        datasets.append(dataset)
    return datasets


def dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
