"""The fused expert linear (``expert_kernels``) has the gradients of the plain composition and saves no more."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from m4oe_adapters.expert_kernels import (
    LowRankLinearFunction,
    PerSampleLowRankLinearFunction,
    low_rank_linear,
    per_sample_low_rank_linear,
)
from m4oe_adapters.experts import ModalityExpertLinear
from m4oe_adapters.routing import RoutingState


def _tensors(shape_x, shape_a, shape_b, out_features, in_features, grads=(True, True, True, True, True)):
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    tensors = [make(*shape_x), make(out_features, in_features), make(out_features), make(*shape_a), make(*shape_b)]
    return [tensor.requires_grad_(flag) for tensor, flag in zip(tensors, grads)]


def test_single_expert_gradients_pass_gradcheck():
    for grads in [(True,) * 5, (True, False, False, True, True), (False, False, False, True, True)]:
        x, weight, bias, lora_a, lora_b = _tensors((6, 5), (3, 5), (4, 3), 4, 5, grads)
        function = lambda *t: LowRankLinearFunction.apply(*t, 0.7)  # noqa: E731
        assert torch.autograd.gradcheck(function, (x, weight, bias, lora_a, lora_b))


def test_per_sample_expert_gradients_pass_gradcheck():
    for grads in [(True,) * 5, (True, False, False, True, True)]:
        x, weight, bias, lora_a, lora_b = _tensors((2, 3, 5), (2, 3, 5), (2, 4, 3), 4, 5, grads)
        function = lambda *t: PerSampleLowRankLinearFunction.apply(*t, 1.5)  # noqa: E731
        assert torch.autograd.gradcheck(function, (x, weight, bias, lora_a, lora_b))


def test_fused_layer_matches_plain_composition_values_and_gradients():
    torch.manual_seed(0)
    layer = ModalityExpertLinear(nn.Linear(12, 20).requires_grad_(False), rank=4, alpha=8)
    for name in ("CT", "MRI"):
        layer.add_expert(name)
        nn.init.normal_(layer.lora_B[name], std=0.1)
    layer.routing = RoutingState(mode="hard", expert_names=("CT",), batch_size=2)
    x = torch.randn(2, 7, 12, requires_grad=True)
    fused = layer(x)
    fused.square().sum().backward()
    a, b = layer.lora_A["CT"], layer.lora_B["CT"]
    fused_grads = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for tensor in (x, a, b):
        tensor.grad = None
    plain = layer.base_layer(x) + F.linear(F.linear(x, a), b) * layer.scaling
    plain.square().sum().backward()
    torch.testing.assert_close(fused, plain)
    for got, expected in zip(fused_grads, [x.grad, a.grad, b.grad]):
        torch.testing.assert_close(got, expected)


def test_mixed_batch_gradients_reach_only_each_samples_expert():
    torch.manual_seed(0)
    layer = ModalityExpertLinear(nn.Linear(6, 5).requires_grad_(False), rank=2, alpha=2)
    for name in ("CT", "MRI", "US"):
        layer.add_expert(name)
        nn.init.normal_(layer.lora_B[name], std=0.1)
    layer.routing = RoutingState(mode="hard", expert_names=("CT", "MRI"), batch_size=3,
                                 sample_expert=torch.tensor([0, 1, 0]))
    x = torch.randn(3, 4, 6)
    layer(x).sum().backward()
    assert layer.lora_A["CT"].grad is not None and layer.lora_A["MRI"].grad is not None
    assert layer.lora_A["US"].grad is None
    expected = sum(torch.autograd.grad(
        (layer.base_layer(x[i]) + F.linear(F.linear(x[i], layer.lora_A["CT"]), layer.lora_B["CT"]) * layer.scaling
         ).sum(), layer.lora_B["CT"])[0] for i in (0, 2))
    torch.testing.assert_close(layer.lora_B["CT"].grad, expected)


def test_fused_layer_saves_only_input_and_low_rank_hidden():
    layer = nn.Linear(16, 32).requires_grad_(False)
    lora_a = torch.randn(4, 16, requires_grad=True)
    lora_b = torch.randn(32, 4, requires_grad=True)
    x = torch.randn(10, 16, requires_grad=True)
    parameters = {t.untyped_storage().data_ptr() for t in (layer.weight, layer.bias, lora_a, lora_b)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        low_rank_linear(x, layer.weight, layer.bias, lora_a, lora_b, 2.0)
    assert sum(saved.values()) == x.numel() * 4 + 10 * 4 * 4  # x and h = x Aᵀ, nothing output-sized


def test_mismatched_dtypes_fall_back_to_plain_ops():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    weight, bias = torch.randn(5, 8, dtype=torch.float64), None
    lora_a, lora_b = torch.randn(2, 8), torch.randn(5, 2)
    expected = F.linear(x, weight) + F.linear(F.linear(x, lora_a.double()), lora_b.double()) * 0.5
    torch.testing.assert_close(low_rank_linear(x, weight, bias, lora_a, lora_b, 0.5), expected)
    per_sample = per_sample_low_rank_linear(x, weight, bias, lora_a.expand(2, 2, 8), lora_b.expand(2, 5, 2), 0.5)
    torch.testing.assert_close(per_sample, expected)


def test_inference_folding_matches_the_training_path():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 40, 16), torch.randn(24, 16), torch.randn(24)
    lora_a, lora_b = torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    trained = low_rank_linear(x, weight, bias, lora_a, lora_b, 0.5)  # autograd: fused function
    assert trained.grad_fn is not None
    with torch.no_grad():
        folded = low_rank_linear(x, weight, bias, lora_a, lora_b, 0.5)
    torch.testing.assert_close(folded, trained.detach(), atol=1e-5, rtol=1e-5)
    sample_a = torch.stack([lora_a, 2 * lora_a, -lora_a]).detach()
    sample_b = torch.stack([lora_b, lora_b, 3 * lora_b]).detach()
    expected = PerSampleLowRankLinearFunction.apply(x, weight, bias, sample_a, sample_b, 0.5)
    with torch.no_grad():
        folded = per_sample_low_rank_linear(x, weight, bias, sample_a, sample_b, 0.5)
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["one expert", "per sample"])
def test_under_autocast_the_fused_kernels_see_one_dtype_with_autocast_off(monkeypatch, layout):
    """The module docstring's mixed-precision rule, for both kernels: every operand arrives in the autocast dtype
    and autocast is off inside, so the in-place ``addmm_``/``baddbmm_`` never mix dtypes. CUDA's autocast does not
    cast in-place ops: before this held for the one-expert kernel, every bf16 training step on a GPU failed with
    "self and mat2 must have the same dtype" (seen on an H200); CPU autocast happened to hide it."""
    from m4oe_adapters import expert_kernels

    function = expert_kernels.LowRankLinearFunction if layout == "one expert" else \
        expert_kernels.PerSampleLowRankLinearFunction
    original = function.forward
    seen = []

    def spy(ctx, x, weight, bias, lora_a, lora_b, scaling):
        seen.append(({t.dtype for t in (x, weight, bias, lora_a, lora_b)}, torch.is_autocast_enabled("cpu")))
        return original(ctx, x, weight, bias, lora_a, lora_b, scaling)

    monkeypatch.setattr(function, "forward", staticmethod(spy))
    generator = torch.Generator().manual_seed(0)
    samples = 1 if layout == "one expert" else 2
    x = torch.randn(samples, 5, 16, generator=generator)
    weight, bias = torch.randn(12, 16, generator=generator), torch.randn(12, generator=generator)
    lora_a = torch.randn(samples, 4, 16, generator=generator).requires_grad_()
    lora_b = torch.randn(samples, 12, 4, generator=generator).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if layout == "one expert":
            out = expert_kernels.low_rank_linear(x[0], weight, bias, lora_a[0], lora_b[0], 2.0)
        else:
            out = expert_kernels.per_sample_low_rank_linear(x, weight, bias, lora_a, lora_b, 2.0)
    out.float().sum().backward()
    assert seen == [({torch.bfloat16}, False)]
    assert out.dtype == torch.bfloat16 and lora_a.grad.dtype == torch.float32 and lora_b.grad is not None
