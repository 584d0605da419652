"""Where and in what precision a model runs: the device (``auto``, ``cpu``, ``cuda``, ``mps``) and the arithmetic
(``32``: fp32; ``bf16``; ``16``: fp16 with a gradient scaler), shared by training, evaluation, prediction and bench.

Mixed precision is ``torch.autocast``: parameters stay fp32 (optimiser updates and adapter files are fp32), matmuls
and convolutions run in the low-precision dtype. fp16 has a narrow exponent range, so its training also scales the
loss (``torch.amp.GradScaler``) to keep small gradients from flushing to zero; bf16 has fp32's range and needs none.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) is CUDA when a GPU is visible, else the CPU; ``"mps"`` must be asked for by name.

    Raises :class:`~m4oe_adapters.errors.ConfigError` when the named device is not available here.
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ConfigError(f"--device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu or auto")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def check_precision(precision: str) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use 32, bf16 or 16")
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``16`` on ``device``; a no-op for ``32``."""
    precision = check_precision(precision)
    if precision == "32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=PRECISIONS[precision])


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A ``GradScaler`` that is active for fp16 (``16``) and a pass-through otherwise."""
    precision = check_precision(precision)
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=precision == "16")


def device_predictor(
    function: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str, precision: str = "32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``images → logits`` so it runs on ``device`` under ``precision`` and hands back fp32 logits on the
    caller's device (sliding-window inference keeps whole images on the CPU and sends one window batch at a time)."""
    device = torch.device(device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            logits = function(images.to(device, non_blocking=True))
        return logits.float().to(images.device)

    return predict


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def available_devices() -> list[str]:
    """``["cpu"]`` plus ``"cuda"`` and ``"mps"`` where present (tests are parametrised over these)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


__all__ = ["DEVICES", "PRECISIONS", "autocast", "available_devices", "device_predictor", "grad_scaler",
           "module_device", "resolve_device"]
