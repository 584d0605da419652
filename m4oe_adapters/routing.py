"""Where routing happens: which adapter each image goes to, and which expert(s) each token goes through.

**Image-level routing** (:func:`route_images`; :func:`route_views` for an image and its unframed view, used by
``SegmentationModel.route`` and by ``model(images)`` when no modality is given): each loaded adapter's
:class:`~m4oe_adapters.signatures.ImageSignature` scores every image on its own; the image goes to the adapter with
the lowest *relative* score (score over that adapter's median held-out calibration score), and is **unknown** when
that adapter's confidence is under the threshold (its stored ``min_confidence``, or the caller's). An adapter's
scores depend only on its own signature, so loading or removing another adapter can change which adapter wins but
never another adapter's scores. A volume goes to one adapter as a whole (:func:`route_volumes`: each adapter's
median score over its slices).

**Token-level routing** inside the backbone:

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
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError


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


# ------------------------------------------------------------------------------------------ image-level routing
@dataclass
class RoutingDecision:
    """Where one image goes.

    Attributes:
        modality: the chosen adapter's modality, or ``None`` when the image fits no loaded adapter (unknown).
        confidence: the chosen (or, when unknown, the best-fitting) adapter's confidence in [0, 1]: the fraction
            of its own held-out calibration images that fit it worse than this image.
        scores: every scored adapter's confidence, by modality.
        nearest: the best-fitting adapter even when unknown (what it would have been sent to).
        reason: why an unknown image was refused: ``"confidence"`` (no adapter's confidence reached its threshold)
            or ``"noise"`` (its neighbouring pixels do not correlate: pixel noise, refused whatever the scores,
            :func:`~m4oe_adapters.signatures.looks_like_noise`); ``None`` when it was accepted.
    """

    modality: str | None
    confidence: float
    scores: dict[str, float]
    nearest: str | None = None
    reason: str | None = None

    @property
    def unknown(self) -> bool:
        return self.modality is None


def route_images(signatures: Mapping, descriptors: torch.Tensor, min_confidence: float | None = None
                 ) -> list[RoutingDecision]:
    """Decide each image's adapter.

    Args:
        signatures: modality → :class:`~m4oe_adapters.signatures.ImageSignature` of every candidate adapter.
        descriptors: ``[B, D]`` from :func:`~m4oe_adapters.signatures.image_descriptors`.
        min_confidence: accept an image only when the chosen adapter's confidence is at least this (default: each
            adapter's stored threshold).

    Returns: one :class:`RoutingDecision` per image.
    """
    return decide(signatures, signature_scores(signatures, descriptors), min_confidence)


def route_views(signatures: Mapping, stacks: Sequence[torch.Tensor], min_confidence: float | None = None
                ) -> list[RoutingDecision]:
    """Like :func:`route_images`, for images given as ``[V, D]`` stacks of views of themselves
    (:func:`~m4oe_adapters.signatures.routing_descriptors`: the image, and the image without its frame): each
    adapter scores an image by its best-fitting view."""
    return decide(signatures, view_scores(signatures, stacks), min_confidence)


def route_volumes(signatures: Mapping, volumes: Sequence[Sequence[torch.Tensor] | torch.Tensor],
                  min_confidence: float | None = None) -> list[RoutingDecision]:
    """One decision per volume (or any group of images that must go to one adapter). Each volume is given by some or
    all of its slices: a list of ``[V, D]`` view stacks (one per slice), or a ``[S, D]`` tensor (one view each).
    Each adapter's score of a volume is the median of its slices' scores, so a few atypical slices (the apex of a
    heart, the ends of a scan, a blank slice) neither split a volume between adapters nor decide it. A volume of one
    slice is routed exactly as that image."""
    if not volumes:
        raise DataError("no volumes to route")
    scores = torch.stack([view_scores(signatures, list(volume[:, None]) if torch.is_tensor(volume) else volume)
                          .median(0).values for volume in volumes])
    return decide(signatures, scores, min_confidence)


def view_scores(signatures: Mapping, stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, E]`` scores of images given as ``[V, D]`` view stacks: each adapter's best (lowest) score over an
    image's views."""
    if not stacks:
        raise DataError("no images to route")
    counts = [stack.shape[0] for stack in stacks]
    scores = signature_scores(signatures, torch.cat(list(stacks)))
    return torch.stack([part.min(0).values for part in scores.split(counts)])


VOLUME_ROUTING_SLICES = 16  # slices of a volume that route it, evenly spaced over all of them


def volume_routing_indices(count: int, wanted: int = VOLUME_ROUTING_SLICES) -> list[int]:
    """Indices of the slices that route a volume of ``count`` slices: all of them up to ``wanted``, else ``wanted``
    evenly spaced from the first to the last."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(index * (count - 1) / (wanted - 1)) for index in range(wanted)})


def signature_scores(signatures: Mapping, descriptors: torch.Tensor) -> torch.Tensor:
    """``[B, E]`` score of every image under every signature (in ``signatures``' order; lower is closer). An
    adapter's column depends on its own signature only."""
    if not signatures:
        raise ConfigError("no loaded adapter has a routing signature; fit one (m4oe sign) or give the modality")
    return torch.stack([signature.score(descriptors) for signature in signatures.values()], 1)


def decide(signatures: Mapping, scores: torch.Tensor, min_confidence: float | None = None) -> list[RoutingDecision]:
    """Decisions from a ``[B, E]`` score matrix (columns in ``signatures``' order): the adapter with the lowest
    score relative to its own calibration, accepted when its confidence reaches the threshold."""
    from .signatures import CALIBRATION_POINTS, calibrated_confidence

    names = list(signatures)
    calibration = torch.stack([signatures[name].calibration.double() for name in names])  # [E, CALIBRATION_POINTS]
    by_adapter = scores.double().T  # [E, B]
    relative = by_adapter / calibration[:, CALIBRATION_POINTS // 2, None].clamp_min(1e-12)  # as relative_score
    confidence = calibrated_confidence(calibration, by_adapter).T.tolist()  # [B][E]
    decisions = []
    for row, best in enumerate(relative.argmin(0).tolist()):
        name = names[best]
        threshold = signatures[name].min_confidence if min_confidence is None else float(min_confidence)
        value = confidence[row][best]
        accepted = value >= threshold
        decisions.append(RoutingDecision(name if accepted else None, value, dict(zip(names, confidence[row])), name,
                                         None if accepted else "confidence"))
    return decisions


def refuse_noise(decisions: Sequence[RoutingDecision], noise: Sequence[bool]) -> list[RoutingDecision]:
    """``decisions`` with every image flagged as pixel noise made unknown (reason ``"noise"``), its scores kept."""
    if len(decisions) != len(noise):
        raise DataError(f"{len(noise)} noise flags for {len(decisions)} decisions")
    return [RoutingDecision(None, decision.confidence, decision.scores, decision.nearest, "noise") if flagged
            else decision for decision, flagged in zip(decisions, noise)]


def volume_is_noise(flags: Sequence[bool]) -> bool:
    """A volume is noise when more than half of its routing slices are (a few noisy end slices do not decide)."""
    return 2 * sum(bool(flag) for flag in flags) > len(flags)
