"""Gradient checkpointing with experts inside: every routing mode, all three backbone families, gradients identical
to the run without checkpointing (bit for bit on CPU: the recomputation runs the same operations on the same
inputs)."""
from __future__ import annotations

import pytest
import torch

from m4oe_adapters import set_gradient_checkpointing

from families import FAMILIES, family_model

MERGING = {"timm": 3, "transformers": 3, "monai": 4}
CASES = {
    "hard": dict(modality="CT"),
    "mixed_batch": dict(modality=["CT", "MRI"]),
    "soft": dict(modality=["CT", "MRI"], routing="soft"),
    "soft_modality_free": dict(routing="soft"),
    "merged": dict(modality="MRI"),
}


def one_step(family: str, case: str, checkpointing: bool):
    """Gradients (and router keys) after one backward of a loss that includes the soft-routing auxiliary losses."""
    model = family_model(family)
    if case == "merged":
        model.merge("MRI")
    forwards = []
    layer = next(iter(model.expert_layers.values()))
    layer.register_forward_hook(lambda *_: forwards.append(1))
    if checkpointing:
        # five Swin blocks in each tiny backbone, its patch-merging layers (MONAI merges after the last stage too)
        # and the two modalities' decoders
        assert set_gradient_checkpointing(model) == 5 + MERGING[family] + 2
    model.train()
    model.routing.collect_aux = True
    model.routing.update_keys = case == "hard"  # hard-routing training moves router keys (once per forward)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    logits = model(x, **CASES[case])
    loss = logits[torch.isfinite(logits)].square().mean()
    for value in model.auxiliary_losses().values():
        loss = loss + value
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    keys = {name: layer.router_key["CT"].detach().clone() for name, layer in model.expert_layers.items()}
    return gradients, keys, len(forwards)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointed_gradients_equal_plain_gradients(family, case):
    plain, plain_keys, plain_forwards = one_step(family, case, checkpointing=False)
    checkpointed, checkpointed_keys, checkpointed_forwards = one_step(family, case, checkpointing=True)
    if case != "merged":  # merged: nothing in the backbone needs a gradient, so nothing is recomputed
        assert checkpointed_forwards == 2 * plain_forwards  # each block really was recomputed during backward
    assert set(checkpointed) == set(plain) and any(".lora_" in name for name in plain) == (case != "merged")
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=0, atol=0, msg=name)
    for name, key in plain_keys.items():  # router keys moved once, not again during the recomputation
        torch.testing.assert_close(checkpointed_keys[name], key, rtol=0, atol=0)


def test_checkpointing_can_be_turned_off_again_and_leaves_inference_alone():
    model = family_model("timm")
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        before = model(x, ["MRI"])
        set_gradient_checkpointing(model)
        during = model(x, ["MRI"])
        set_gradient_checkpointing(model, False)
        after = model(x, ["MRI"])
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not any(hasattr(block, "_m4oe_checkpointed") for block in model.backbone.model.modules())
