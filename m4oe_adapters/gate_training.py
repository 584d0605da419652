"""Gradient-trained token gates: fit every loaded adapter's router keys jointly, experts and decoders frozen.

Soft routing mixes every loaded expert per token with a gate ``softmax(-||x̂ - k_e||² / T)`` over the router keys
``k_e`` (:func:`~m4oe_adapters.routing.gate_probabilities`). Each key starts as the mean normalised token its expert
saw in training. Here the keys of all loaded adapters are trained together on images of each adapter's own modality:

* the gate loss: cross-entropy of every token's gate logits against the image's known modality;
* plus ``balance`` × the Switch/Mixtral load-balancing loss, so that no expert is starved or takes every token.

Only the keys change (each layer's ``router_key`` of each modality). Hard routing and the image-level router do not
use them, so their outputs stay exactly as they were. The images are those each adapter's signature was fitted on,
within the datasets its provenance names (what it trained and validated on; never test images): no label is read.
Unlike everything else about an adapter, trained keys depend on which adapters were trained together; the adapter
records them (``provenance.gate``).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .model import SegmentationModel

GATE_SIZE = 224  # images are resized to this for gate training (the gate sees tokens, not whole-image geometry)


def gate_batch(model: SegmentationModel, arrays: Sequence[np.ndarray], metas: Sequence[dict], names: Sequence[str]
               ) -> torch.Tensor:
    """``[B, C, 224, 224]`` network inputs: each raw image with its own modality's preset, resized."""
    from .data import normalise

    images = []
    for raw, meta, name in zip(arrays, metas, names):
        info = model.modalities[name]
        image = torch.from_numpy(np.ascontiguousarray(normalise(raw, meta, info.preset, model.backbone.in_chans)))
        images.append(F.interpolate(image[None].float(), size=(GATE_SIZE, GATE_SIZE), mode="bilinear",
                                    align_corners=False)[0])
    return torch.stack(images)


def train_gate(
    model: SegmentationModel,
    images: dict[str, list[tuple[np.ndarray, dict]]],
    *,
    steps: int = 60,
    batch_size: int = 9,
    lr: float = 0.01,
    balance: float = 0.01,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Train the router keys of every modality in ``images`` (``{modality: [(raw [C, H, W], meta), ...]}``) with the
    gate and load-balancing losses; returns one row per step (``gate``, ``load_balance``; every 10th step also
    ``accuracy``, see :func:`gate_accuracy`).

    Every parameter of ``model`` is left with ``requires_grad`` off (call :meth:`SegmentationModel.train_only`
    to train a modality afterwards).

    Raises:
        ConfigError: fewer than two modalities, a modality not loaded, or one without images.
    """
    if len(images) < 2:
        raise ConfigError("gate training needs images of at least two loaded modalities")
    for name, items in images.items():
        model._require(name)
        if not items:
            raise ConfigError(f"no images for modality {name!r}")
    if model.merged_modality is not None:
        raise ConfigError(f"gate training needs unmerged experts; call unmerge() (merged: {model.merged_modality})")
    keys = [layer.router_key[name] for layer in model.expert_layers.values() for name in model.modalities]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for key in keys:
        key.requires_grad_(True)
    optimiser = torch.optim.Adam(keys, lr=lr)
    rng = random.Random(seed)
    modalities = list(images)
    loaded = tuple(model.modalities)
    device = next(model.parameters()).device
    history = []
    model.eval()
    state = model.routing
    try:
        for step in range(1, steps + 1):
            names = [modalities[(step * batch_size + index) % len(modalities)] for index in range(batch_size)]
            picks = [rng.choice(images[name]) for name in names]
            batch = gate_batch(model, [raw for raw, _ in picks], [meta for _, meta in picks], names).to(device)
            state.collect_aux = True
            state.record_gates = False
            model(batch, names, routing="soft", top_k=None)
            losses = model.auxiliary_losses()
            loss = losses["gate"] + balance * losses["load_balance"]
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            row = {"step": step, "gate": losses["gate"].item(), "load_balance": losses["load_balance"].item()}
            if step == 1 or step % 10 == 0 or step == steps:
                with torch.no_grad():
                    row["accuracy"] = gate_accuracy(model, batch, names, loaded)
                log(f"gate step {step}/{steps}: gate loss {row['gate']:.3f}, balance {row['load_balance']:.3f}, "
                    f"images whose gate favours their own expert {row['accuracy']:.3f}")
            history.append(row)
    finally:
        state.collect_aux = False
        for key in keys:
            key.requires_grad_(False)
    for layer in model.expert_layers.values():
        for name in images:
            layer.mark_keys_trained(name)
    return history


def gate_accuracy(model: SegmentationModel, batch: torch.Tensor, names: Sequence[str], loaded: tuple[str, ...]
                  ) -> float:
    """Share of images whose mean gate weight (over their tokens) is largest for their own modality, averaged over
    layers: what a modality-free soft forward records, compared with the known modalities."""
    model(batch, None, routing="soft", top_k=None)
    weights = model.routing.gate_weights
    if not weights:
        return float("nan")
    target = torch.tensor([loaded.index(name) for name in names])
    scores = [(per_layer.argmax(-1).cpu() == target).float().mean() for per_layer in weights.values()]
    model.routing.gate_weights = {}
    return float(torch.stack(scores).mean())


def signature_images(metadata: dict, samples: Sequence) -> list:
    """The manifest samples an adapter's signature was fitted on (by the content hashes its file stores)."""
    from .signatures import image_hash

    wanted = set((metadata.get("routing") or {}).get("image_hashes", ()))
    return [s for s in samples if image_hash(s.image, s.slice_index) in wanted]


__all__ = ["gate_accuracy", "gate_batch", "signature_images", "train_gate"]
