"""Where routing happens: which expert(s) each token of each sample goes through.

A :class:`RoutingState` is shared by every expert layer of one model. The model fills it before a forward pass
(``SegmentationModel.forward``) and every :class:`~m4oe_adapters.experts.ModalityExpertLinear` reads it, so the
per-sample modality never has to be threaded through the backbone's own ``forward`` signatures.

Two modes:

* **hard** — each sample's modality selects its expert; only that expert is computed.
* **soft** — a gate mixes every loaded expert per token. Gate logits are negative squared distances between the
  unit-normalised token and one *router key per expert* (divided by a temperature): a nearest-centroid rule, since a
  key is the running mean of the normalised tokens its expert saw during training (and can be refined by gradient in
  soft-mode training). Each key belongs to its expert and travels in that expert's file, so an expert can be added
  or removed without retraining the others.
  Optional top-k sparsification and a Switch/Mixtral-style load-balancing auxiliary loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass
class RoutingState:
    """Per-forward routing decisions shared by all expert layers of one model.

    Attributes:
        mode: ``"hard"`` or ``"soft"``.
        expert_names: the experts taking part, in slot order. Hard routing: the distinct modalities of the batch.
            Soft routing: every loaded expert.
        sample_expert: LongTensor ``[B]``, the slot (index into ``expert_names``) of each sample's modality; ``None``
            when every sample uses slot 0 (hard) or when modalities are unknown (soft).
        batch_size: ``B``, used to map a layer's leading dimension (``B`` or ``B * windows``) back to samples.
        top_k: soft routing: keep the ``top_k`` largest gate weights per token (``None``: all).
        temperature: soft routing: softmax temperature over token-to-key distances.
        collect_aux: when true, soft layers append their load-balancing loss to ``aux_losses`` and, if
            ``sample_expert`` is known, their gate cross-entropy to ``gate_losses``.
        update_keys: hard routing during training: move each expert's router key towards the mean normalised token
            it sees (exponential moving average with ``key_momentum``).
        record_gates: soft routing: keep each layer's mean gate weights ``[B, E]`` in ``gate_weights`` (inspection).
    """

    mode: str = "hard"
    expert_names: tuple[str, ...] = ()
    sample_expert: torch.Tensor | None = None
    batch_size: int = 1
    top_k: int | None = None
    temperature: float = 0.05
    collect_aux: bool = False
    update_keys: bool = False
    key_momentum: float = 0.99
    record_gates: bool = False
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    gate_losses: list[torch.Tensor] = field(default_factory=list)
    gate_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return len(self.expert_names) > 0


def rows_per_sample(leading: int, batch_size: int, layer_name: str) -> int:
    """How many leading rows of a layer input belong to one sample.

    Swin layers see ``[B, ...]`` (MLP) or ``[B * num_windows, ...]`` (window attention); window partitioning is
    sample-major in timm, transformers and MONAI, so rows ``s * n ... (s + 1) * n - 1`` belong to sample ``s``.
    """
    if leading % batch_size != 0:
        raise ConfigError(
            f"layer {layer_name}: leading dimension {leading} is not a multiple of the batch size {batch_size}; "
            "per-sample routing needs sample-major inputs"
        )
    return leading // batch_size


def gate_probabilities(
    tokens: torch.Tensor, router_keys: torch.Tensor, temperature: float, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft gate.

    Args:
        tokens: ``[..., D]`` layer inputs.
        router_keys: ``[E, D]``, one key per expert.
        temperature: softmax temperature over negative squared distances.
        top_k: keep the ``top_k`` largest probabilities per token and renormalise (``None``: keep all).

    Returns:
        ``(weights, logits)``, both ``[..., E]``: the mixing weights (summing to 1 per token) and the raw logits.
    """
    # -||x̂ - k||² = 2 x̂·k - ||k||² - 1; the constant drops out of the softmax.
    similarity = 2 * F.linear(F.normalize(tokens, dim=-1), router_keys) - router_keys.pow(2).sum(-1)
    logits = similarity / temperature
    probabilities = logits.softmax(dim=-1)
    if top_k is not None and top_k < probabilities.shape[-1]:
        top_values, top_index = probabilities.topk(top_k, dim=-1)
        sparse = torch.zeros_like(probabilities).scatter(-1, top_index, top_values)
        probabilities = sparse / sparse.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return probabilities, logits


def load_balancing_loss(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Switch Transformer / Mixtral auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens whose top-k choice includes expert ``e`` (no gradient), ``P_e`` the mean router
    probability of ``e``. Equals 1 for perfectly balanced routing and grows as routing collapses.

    Args:
        logits: ``[..., E]`` gate logits.
        top_k: as in :func:`gate_probabilities` (``None`` counts top-1).
    """
    num_experts = logits.shape[-1]
    flat = logits.reshape(-1, num_experts)
    probabilities = flat.softmax(dim=-1)
    chosen = flat.topk(min(top_k or 1, num_experts), dim=-1).indices
    dispatch = torch.zeros_like(probabilities).scatter(-1, chosen, 1.0)
    fraction = dispatch.mean(dim=0) / (top_k or 1)
    return num_experts * (fraction.detach() * probabilities.mean(dim=0)).sum()
