"""Reading third-party backbone checkpoints safely: safetensors natively, ``.pth``/``.pt``/``.bin`` only through
``torch.load(weights_only=True)`` (never a full unpickle)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import BackboneError

NESTED_KEYS = ("state_dict", "model", "module", "network", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from a ``state_dict``/``model`` nesting if present."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone checkpoint not found (give an existing file, or --weights none)")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            checkpoint = safetensors.torch.load_file(str(path))
        else:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as error:
        raise BackboneError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:300]}). "
            "Only safetensors and weights-only torch files are accepted"
        ) from None
    for _ in range(3):
        if isinstance(checkpoint, dict):
            nested = next((key for key in NESTED_KEYS if isinstance(checkpoint.get(key), dict)), None)
            if nested is None:
                break
            checkpoint = checkpoint[nested]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise BackboneError(f"{path}: no state dict found in the checkpoint")
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise BackboneError(f"{path}: the checkpoint holds no tensors")
    return tensors


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` from the start of each key, repeatedly (``module.swinViT.x`` → ``x``)."""
    result = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        result[key] = value
    return result


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first convolution's weight ``[out, C_src, *k]`` to ``in_chans`` inputs the way timm does
    (sum for 1 channel; repeat and rescale otherwise)."""
    from timm.models._manipulate import adapt_input_conv

    if weight.shape[1] == in_chans:
        return weight
    if weight.dim() == 4:
        return adapt_input_conv(in_chans, weight)
    # 3D kernels: same rule, applied over the flattened spatial dims.
    flat = weight.reshape(weight.shape[0], weight.shape[1], weight.shape[2], -1)
    return adapt_input_conv(in_chans, flat).reshape(weight.shape[0], in_chans, *weight.shape[2:])
