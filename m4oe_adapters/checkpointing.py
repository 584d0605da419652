"""Gradient checkpointing of the backbone's Swin blocks with experts inside, for the three families alike.

Checkpointing keeps only each block's input during the forward pass and recomputes the block during backward. With
experts inside, the recomputation must route exactly as the forward did, but routing lives in the model's shared
:class:`~m4oe_adapters.routing.RoutingState`, which the model clears as soon as its forward returns (and a second
forward before ``backward()`` would overwrite). The families' own switches (timm ``set_grad_checkpointing``,
transformers ``gradient_checkpointing_enable``, MONAI ``use_checkpoint``) know nothing of that state, so a
recomputation would run without experts (``CheckpointError``, or wrong gradients with re-entrant checkpointing).

Here each block's ``forward`` is wrapped in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with a
``context_fn`` that snapshots the routing decision when the block runs and puts that snapshot in place while the
block is recomputed. The recomputation collects its auxiliary losses and gate records into throw-away lists (the
forward's are the ones the loss uses) and does not move router keys a second time, so gradients equal the
non-checkpointed run's. Blocks are found the same way in every family: the children of each ``blocks`` container
(timm ``layers.N.blocks``, transformers ``encoder.layers.N.blocks``, MONAI ``layersN.0.blocks``).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .routing import RoutingState

_MARK = "_m4oe_checkpointed"


def swin_blocks(module: nn.Module) -> list[nn.Module]:
    """Every Swin block of a family's model: the children of containers named ``blocks``."""
    blocks = []
    for name, child in module.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks.extend(child)
    return blocks


def checkpointed_modules(model) -> list[nn.Module]:
    """What :func:`set_gradient_checkpointing` wraps in a :class:`~m4oe_adapters.model.SegmentationModel`: every
    Swin block, every patch-merging layer (``downsample``) and every modality's decoder (which, upsampling to the
    input's size, holds most of what a training step saves once the blocks are checkpointed)."""
    backbone = model.backbone.model
    merging = [child for name, child in backbone.named_modules()
               if name.rsplit(".", 1)[-1] == "downsample" and child is not None and not isinstance(child, nn.Identity)]
    return swin_blocks(backbone) + merging + list(model.decoders.values())


def _snapshot(state: RoutingState) -> RoutingState:
    """The routing decision as it is now, with fresh record lists and no router-key updates (for recomputation)."""
    return dataclasses.replace(state, aux_losses=[], gate_losses=[], gate_weights={}, update_keys=False)


@contextlib.contextmanager
def _routing_as(state: RoutingState, snapshot: RoutingState):
    saved = dict(vars(state))
    vars(state).update(vars(snapshot))
    try:
        yield
    finally:
        vars(state).clear()
        vars(state).update(saved)


def _checkpointed_forward(original, state: RoutingState):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # inference: nothing to save, nothing to recompute
            return original(*args, **kwargs)
        snapshot = _snapshot(state)
        return checkpoint(
            original, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _routing_as(state, snapshot)), **kwargs,
        )

    return forward


def set_gradient_checkpointing(model, enabled: bool = True) -> int:
    """Turn gradient checkpointing of ``model``'s backbone blocks, patch-merging layers and decoders on or off;
    returns how many modules are wrapped (:func:`checkpointed_modules`; a modality added afterwards is not: call
    this again).

    Args:
        model: a :class:`~m4oe_adapters.model.SegmentationModel` (any routing mode, merged or not, any family).
        enabled: ``False`` restores the blocks' own ``forward``.

    Memory: a training step then keeps each wrapped module's input instead of every activation inside it, at the
    cost of running its forward twice (``m4oe bench`` measures both).
    """
    if not swin_blocks(model.backbone.model):
        raise ConfigError(f"{model.backbone.family}:{model.backbone.name}: no Swin 'blocks' found to checkpoint")
    blocks = checkpointed_modules(model)
    for block in blocks:
        if getattr(block, _MARK, False):
            del block.forward  # the instance attribute; the class's forward shows through again
            delattr(block, _MARK)
        if enabled:
            block.forward = _checkpointed_forward(block.forward, model.routing)
            setattr(block, _MARK, True)
    return len(blocks)


__all__ = ["checkpointed_modules", "set_gradient_checkpointing", "swin_blocks"]
