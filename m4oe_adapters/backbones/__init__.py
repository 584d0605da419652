"""Backbone loaders, one per family, behind one entry point: :func:`load_backbone`.

A backbone spec is ``FAMILY:NAME``: ``timm:swin_tiny_patch4_window7_224``, ``transformers:swin``,
``monai:swin_unetr``. Weights are a local path in the family's native format, or ``None``/``"none"`` for a random
initialisation, which the backbone's identity (and so every adapter file) records as not pretrained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackboneError
from .base import FEATURE_STRIDES, Backbone, weight_fingerprint
from .hf_swin import TransformersSwinBackbone, build_transformers_swin
from .monai_swin import MonaiSwinBackbone, build_monai_swin
from .timm_swin import TimmSwinBackbone, build_timm_swin

BUILDERS = {
    "timm": build_timm_swin,
    "transformers": build_transformers_swin,
    "hf": build_transformers_swin,
    "monai": build_monai_swin,
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"timm:swin_tiny_patch4_window7_224"`` → ``("timm", "swin_tiny_patch4_window7_224")``."""
    family, _, name = spec.partition(":")
    if family not in BUILDERS:
        raise BackboneError(f"unknown backbone family {family!r} in {spec!r}; use one of timm, transformers, monai")
    return ("transformers" if family == "hf" else family), (name or None)


def load_backbone(
    spec: str,
    weights: str | Path | None,
    *,
    in_chans: int | None = None,
    img_size: int = 224,
    model_args: dict[str, Any] | None = None,
    random_seed: int = 0,
) -> Backbone:
    """Build a frozen Swin backbone from a spec and local weights.

    Args:
        spec: ``FAMILY:NAME``.
        weights: local checkpoint (file or folder), or ``None``/``"none"`` for random weights.
        in_chans: input channels (default: the checkpoint's, or 3 for timm/transformers and 1 for MONAI at random).
        img_size: nominal input size in pixels (any multiple of 32 runs).
        model_args: architecture arguments (needed for random weights; checkpoints carry their own).
        random_seed: random weights are drawn from this seed (without touching the caller's RNG), so the same
            random backbone, and its fingerprint, can be rebuilt in another process.
    """
    family, name = parse_spec(spec)
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    if weights is not None and not Path(weights).exists():
        raise BackboneError(f"{weights}: backbone weights not found (pass a local checkpoint, or 'none' for random)")
    if weights is not None:
        return BUILDERS[family](name, weights, in_chans=in_chans, img_size=img_size, model_args=model_args)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_seed)
        return BUILDERS[family](name, weights, in_chans=in_chans, img_size=img_size, model_args=model_args)


def guess_backbone(weights: str | Path) -> tuple[str, dict[str, Any] | None]:
    """``(FAMILY:NAME, model_args)`` for a checkpoint given without ``--backbone``.

    A folder says it in its ``config.json`` (timm ``architecture``, transformers ``model_type``); a single file is
    read: MONAI key layouts give ``monai:swin_unetr`` (which reads its architecture itself), timm/Microsoft layouts
    give a timm Swin name with the embed dim, depths, heads and window read from the tensor shapes.

    Raises:
        BackboneError: the family or architecture cannot be read; pass ``--backbone`` (and ``--model-args``).
    """
    import json

    from .checkpoints import guess_family, read_checkpoint
    from .timm_swin import infer_timm_arguments

    path = Path(weights)
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BackboneError(f"{config_path}: not valid JSON ({error})") from None
        if isinstance(config, dict) and config.get("architecture"):
            return f"timm:{config['architecture']}", None
        if isinstance(config, dict) and config.get("model_type") in ("swin", "swinv2"):
            return f"transformers:{config['model_type']}", None
    elif path.is_file():
        tensors = read_checkpoint(path).tensors
        family = guess_family(tensors)
        if family == "monai":
            return "monai:swin_unetr", None
        inferred = infer_timm_arguments(tensors) if family == "timm" else None
        if inferred is not None:
            return f"timm:{inferred[0]}", inferred[1]
    raise BackboneError(
        f"{weights}: cannot tell the backbone family and architecture from the file alone; pass --backbone "
        "FAMILY:NAME (timm:swin_tiny_patch4_window7_224, transformers:swin, monai:swin_unetr...) and, for a "
        "non-standard size, --model-args"
    )


def check_backbone(
    weights: str | Path,
    spec: str | None = None,
    *,
    in_chans: int | None = None,
    img_size: int = 224,
    model_args: dict[str, Any] | None = None,
    forward: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint as a backbone and say what it is, without training anything (the test forward runs on
    ``device``).

    Returns :meth:`Backbone.describe` (family, architecture, source, ``loaded N/N`` report, fingerprint) plus
    ``load_seconds`` and, with ``forward``, the feature-map shapes ``[C, H, W]`` of one zero image of
    ``img_size`` pixels. Raises :class:`BackboneError` with the cause when the file is refused.
    """
    import time

    import torch

    if spec is None:
        spec, guessed_args = guess_backbone(weights)
        model_args = model_args or guessed_args
    start = time.perf_counter()
    backbone = load_backbone(spec, weights, in_chans=in_chans, img_size=img_size, model_args=model_args)
    report = backbone.describe()
    report["load_seconds"] = round(time.perf_counter() - start, 3)
    if forward:
        backbone.to(device)
        with torch.no_grad():
            features = backbone(torch.zeros(1, backbone.in_chans, img_size, img_size, device=device))
        report["feature_shapes"] = [list(feature.shape[1:]) for feature in features]
    return report


def backbone_from_identity(identity: dict[str, Any], weights: str | Path | None) -> Backbone:
    """Rebuild the backbone an adapter's metadata describes (the weights file must be supplied)."""
    spec = f"{identity['family']}:{identity['name']}"
    args = dict(identity.get("model_args") or {})
    img_size = args.pop("img_size", args.pop("image_size", 224))
    if isinstance(img_size, list):
        img_size = tuple(img_size)
    return load_backbone(spec, weights, in_chans=identity.get("in_chans"), img_size=img_size, model_args=args)


__all__ = [
    "Backbone",
    "FEATURE_STRIDES",
    "MonaiSwinBackbone",
    "TimmSwinBackbone",
    "TransformersSwinBackbone",
    "backbone_from_identity",
    "check_backbone",
    "guess_backbone",
    "load_backbone",
    "parse_spec",
    "weight_fingerprint",
]
