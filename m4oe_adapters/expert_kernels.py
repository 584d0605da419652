"""Fused forward/backward of a frozen linear plus a low-rank update, ``y = W x + b + s · B (A x)``.

Why a hand-written ``autograd.Function`` rather than three ``F.linear`` calls and an add: the composed version makes
two output-sized temporaries per layer (``B h`` and its scaled copy) before adding them to ``W x``, and autograd keeps
one graph node per op. Here the update is accumulated *in place* into ``W x + b`` with ``addmm_``/``baddbmm_``
(``alpha = s``), and backward is written out, so a training step saves exactly what a frozen weight's backward
needs:

* ``x`` — for ``A``'s gradient; a view of the layer input, which the surrounding model saves anyway (LayerNorm,
  GELU), so it costs no copy;
* ``h = x Aᵀ`` — ``[N, r]``, for ``B``'s gradient;
* nothing for ``W`` (frozen) beyond the parameter itself; no dropout masks, no scaled copies.

Backward, with ``g = ∂L/∂y`` and ``g_h = s · g B`` (``[N, r]``)::

    ∂x = g W + g_h A        ∂A = g_hᵀ x        ∂B = s · gᵀ h        (∂W = gᵀ x, ∂b = Σ g if they are trained)

Without autograd (inference) there is nothing to save, and applying the update row by row is the slow part (two
skinny matmuls streaming every row); there the update is folded into a temporary copy of the weight instead, see
:func:`_fold_for_inference`.

Two layouts: one expert for every row (``[N, in]``, hard routing of a single-modality batch) and one expert per
sample (``[S, T, in]`` with per-sample ``A: [S, r, in]``, ``B: [S, out, r]``, a mixed batch). Only the first-order
gradient is implemented (``once_differentiable``). Inputs whose dtypes differ from the experts' fall back to the
composed ops in :mod:`~m4oe_adapters.experts`.

Mixed precision: under ``torch.autocast`` every operand (input, frozen weight and bias, both factors) is cast to the
autocast dtype (bf16 or fp16) with differentiable casts, and the fused function runs with autocast off, so its
in-place accumulation sees one dtype; the factors' gradients come back in their own dtype (fp32) through the casts,
which is what ``GradScaler`` and the optimiser expect. Autocast alone would cast the matmuls but not the in-place
``addmm_``/``baddbmm_``, which then fail ("self and mat2 must have the same dtype", "Bad in-place call").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _base_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` as a fresh contiguous tensor we may add into."""
    return F.linear(x, weight, bias).contiguous()


class LowRankLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` for ``x: [N, in]``, ``A: [r, in]``, ``B: [out, r]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        hidden = torch.mm(x, lora_a.t())  # [N, r]
        output = _base_output(x, weight, bias)
        output.addmm_(hidden, lora_b.t(), alpha=scaling)
        needs = ctx.needs_input_grad
        # x only when a gradient of A or W needs it; h only for B's.
        ctx.save_for_backward(
            x if (needs[3] or needs[1]) else None, hidden if needs[4] else None, weight, lora_a, lora_b
        )
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scaling = ctx.scaling
        grad_output = grad_output.contiguous()
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        grad_hidden = torch.mm(grad_output, lora_b).mul_(scaling) if (needs[0] or needs[3]) else None  # [N, r]
        if needs[0]:
            grad_x = torch.mm(grad_output, weight)
            grad_x.addmm_(grad_hidden, lora_a)
        if needs[1]:
            grad_weight = torch.mm(grad_output.t(), x)
        if needs[2] and ctx.has_bias:
            grad_bias = grad_output.sum(0)
        if needs[3]:
            grad_a = torch.mm(grad_hidden.t(), x)
        if needs[4]:
            grad_b = torch.mm(grad_output.t(), hidden).mul_(scaling)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


class PerSampleLowRankLinearFunction(torch.autograd.Function):
    """``y_s = x_s Wᵀ + b + s · (x_s A_sᵀ) B_sᵀ`` for ``x: [S, T, in]``, ``A: [S, r, in]``, ``B: [S, out, r]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        hidden = torch.bmm(x, lora_a.transpose(1, 2))  # [S, T, r]
        output = _base_output(x, weight, bias)
        output.baddbmm_(hidden, lora_b.transpose(1, 2), alpha=scaling)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(
            x if (needs[3] or needs[1]) else None, hidden if needs[4] else None, weight, lora_a, lora_b
        )
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scaling = ctx.scaling
        grad_output = grad_output.contiguous()
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        grad_hidden = torch.bmm(grad_output, lora_b).mul_(scaling) if (needs[0] or needs[3]) else None  # [S, T, r]
        if needs[0]:
            grad_x = torch.matmul(grad_output, weight)
            grad_x.baddbmm_(grad_hidden, lora_a)
        if needs[1]:
            grad_weight = torch.mm(grad_output.flatten(0, 1).t(), x.flatten(0, 1))
        if needs[2] and ctx.has_bias:
            grad_bias = grad_output.sum((0, 1))
        if needs[3]:
            grad_a = torch.bmm(grad_hidden.transpose(1, 2), x)
        if needs[4]:
            grad_b = torch.bmm(grad_output.transpose(1, 2), hidden).mul_(scaling)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


# Device types with an autocast, found once here: ``torch.amp.is_autocast_available`` is a C builtin that
# torch.compile cannot trace (torch 2.11 breaks the graph on it), a set lookup it can.
_AUTOCAST_DEVICES = frozenset(kind for kind in ("cpu", "cuda", "xpu", "mps", "hpu")
                              if torch.amp.is_autocast_available(kind))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would compute a linear layer in for ``x``'s device, or ``None`` outside autocast."""
    device_type = x.device.type
    if not x.is_floating_point() or device_type not in _AUTOCAST_DEVICES:
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _run_cast(function, dtype: torch.dtype, x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """``function`` on operands cast to ``dtype``, with autocast off inside (see the module docstring)."""
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias, lora_a, lora_b)]
    with torch.autocast(x.device.type, enabled=False):
        return function(*cast, scaling)


def _fusable(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in tensors)


def _fold_for_inference(rows: int, in_features: int, *tensors: torch.Tensor | None) -> bool:
    """Whether to fold ``s · B A`` into a copy of ``W`` for this call instead of applying it to every row.

    Only without autograd (the folded weight would need a full ``out × in`` weight gradient). Folding costs one
    ``out × in`` pass; the low-rank route costs two skinny matmuls that stream all ``rows`` twice (``x`` for ``A x``,
    the output for the in-place update) at a small fraction of the machine's matmul rate. Folding wins once a call
    has more than about ``in / 4`` rows, which every Swin stage has at 224 px except the last stage's windows.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return rows >= in_features // 4


def low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x Wᵀ + b + s · (x Aᵀ) Bᵀ`` for ``x: [..., in]`` (one expert for every row) → ``[..., out]``.

    Inference folds the update into a temporary weight (:func:`_fold_for_inference`), so an unmerged expert runs at
    nearly the frozen backbone's speed while the stored weight stays untouched; training uses the fused
    :class:`LowRankLinearFunction`. Under ``torch.autocast`` it computes in the autocast dtype (module docstring).
    """
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        return _run_cast(low_rank_linear, autocast_dtype, x, weight, bias, lora_a, lora_b, scaling)
    if not _fusable(x, weight, bias, lora_a, lora_b):
        return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling
    rows = x.reshape(-1, x.shape[-1])
    if _fold_for_inference(rows.shape[0], rows.shape[1], x, weight, bias, lora_a, lora_b):
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)
    output = LowRankLinearFunction.apply(rows, weight, bias, lora_a, lora_b, scaling)
    return output.view(*x.shape[:-1], weight.shape[0])


def per_sample_low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Each sample with its own expert: ``x: [S, T, in]``, ``A: [S, r, in]``, ``B: [S, out, r]`` → ``[S, T, out]``.

    Inference with enough rows per sample folds each sample's update into its own temporary weight
    (``[S, out, in]``, one ``baddbmm``) and runs one ``bmm``, as :func:`low_rank_linear` does for one expert.
    Under ``torch.autocast`` it computes in the autocast dtype.
    """
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        return _run_cast(per_sample_low_rank_linear, autocast_dtype, x, weight, bias, lora_a, lora_b, scaling)
    if not _fusable(x, weight, bias, lora_a, lora_b):
        hidden = torch.bmm(x, lora_a.to(x.dtype).transpose(1, 2))
        return F.linear(x, weight, bias) + torch.bmm(hidden, lora_b.to(x.dtype).transpose(1, 2)) * scaling
    samples, rows, in_features = x.shape
    if _fold_for_inference(rows, in_features, x, weight, bias, lora_a, lora_b):
        weights = torch.baddbmm(weight.expand(samples, -1, -1), lora_b, lora_a, alpha=scaling)  # [S, out, in]
        output = torch.bmm(x, weights.transpose(1, 2))
        return output if bias is None else output.add_(bias)
    return PerSampleLowRankLinearFunction.apply(x.contiguous(), weight, bias, lora_a, lora_b, scaling)


__all__ = ["LowRankLinearFunction", "PerSampleLowRankLinearFunction", "low_rank_linear", "per_sample_low_rank_linear"]
