"""The segmentation model: frozen backbone (experts inside) → per-modality decoder → per-modality head.

    image [B, C, H, W] → backbone features (experts routed per sample) → decoder of each sample's modality → logits

Each modality owns: one expert in every targeted backbone linear (with its router key), its decoder and head, its
label names and its preprocessing preset. :mod:`~m4oe_adapters.adapter_file` saves exactly that as one file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from .adapter_header import DECODER_PREFIX, EXPERT_PREFIX
from .backbones import Backbone
from .config import DecoderConfig, ExpertConfig, check_modality_name
from .decoder import ModalityDecoder, PackedDecoder
from .errors import ConfigError, UnknownImageError
from .experts import ModalityExpertLinear
from .injection import inject_experts
from .routing import RoutingDecision, RoutingState, refuse_noise, route_views, route_volumes, volume_is_noise
from .signatures import ImageSignature, as_image_list, looks_like_noise, routing_descriptors

EXPERT_TENSORS = ("lora_A", "lora_B", "router_key")


@dataclass
class ModalityInfo:
    """What a modality needs beyond tensors: labels, preprocessing and where it came from.

    Attributes:
        name: modality name (``"fundus"``, ``"CT"``...).
        num_classes: output classes, background included.
        label_names: one name per class (``label_names[0]`` is the background).
        preset: intensity preset (see :mod:`m4oe_adapters.presets`), reapplied at prediction.
        input_size: ``[H, W]`` in pixels the expert was trained at (prediction tiles at this size).
        provenance: sites, number of labelled images, training mode, seed, dates...
        metrics: validation Dice, unseen-site Dice... when known.
    """

    name: str
    num_classes: int
    label_names: list[str]
    preset: dict[str, Any] = field(default_factory=dict)
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class SegmentationModel(nn.Module):
    """Frozen Swin backbone with modality experts, and one decoder + head per modality.

    Args:
        backbone: a frozen :class:`~m4oe_adapters.backbones.Backbone`.
        expert_config: rank, alpha, targets, default routing.
        decoder_config: width of the per-modality decoders.

    Example::

        model = SegmentationModel(load_backbone("timm:swin_tiny_patch4_window7_224", "swin_t.safetensors"))
        model.add_modality("fundus", num_classes=2, label_names=["background", "vessel"])
        logits = model(images, modality="fundus")          # [B, 2, H, W]
    """

    def __init__(
        self,
        backbone: Backbone,
        expert_config: ExpertConfig | None = None,
        decoder_config: DecoderConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.expert_config = expert_config or ExpertConfig()
        self.decoder_config = decoder_config or DecoderConfig()
        self.backbone.fingerprint()  # hash the pristine weights once, before anything can change them
        pattern = self.expert_config.target_pattern or backbone.default_target_pattern
        self.target_pattern = pattern
        layers = inject_experts(backbone.model, pattern, self.expert_config.rank, self.expert_config.alpha)
        # A plain dict (not a ModuleDict): the layers are already registered inside the backbone.
        self.expert_layers: dict[str, ModalityExpertLinear] = layers
        self.routing = RoutingState(temperature=self.expert_config.gate_temperature)
        for layer in layers.values():
            layer.routing = self.routing
        self.decoders = nn.ModuleDict()
        self.modalities: dict[str, ModalityInfo] = {}
        # Image-level routing: each modality's recogniser of its own images (see signatures.py), when it has one.
        self.signatures: dict[str, ImageSignature] = {}
        self.active_modality: str | None = None
        self._modality_chosen = False  # set_modality()/merge() name the default; otherwise images are routed
        self.merged_modality: str | None = None
        self.route_by_index = False  # set by compilation.compile_model

    # ------------------------------------------------------------------------------------------- modalities
    def add_modality(
        self,
        name: str,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        *,
        preset: dict[str, Any] | None = None,
        input_size: Sequence[int] = (224, 224),
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        packed: bool = False,
    ) -> ModalityInfo:
        """Create a new, untrained modality: identity experts (``B = 0``) and a fresh decoder + head.

        ``dtype``: how its experts and decoder are stored (default: the backbone's). A narrower one (``float16``,
        as :func:`~m4oe_adapters.adapter_file.load_adapter` ``keep_dtype=True`` uses for fp16 files) halves the
        memory of a served adapter; it is cast to the backbone's dtype at use, so the outputs equal those of the
        same values stored wide. Such a modality is for inference: :meth:`train_only` refuses it.

        ``packed``: hold the decoder as one flat buffer (:class:`~m4oe_adapters.decoder.PackedDecoder`, about
        0.1 MB less per adapter), for inference too; its values start at zero and come from
        :meth:`set_modality_tensors` (as :func:`~m4oe_adapters.adapter_file.load_adapter` does)."""
        check_modality_name(name)
        if name in self.modalities:
            raise ConfigError(f"modality {name!r} is already loaded; remove_modality({name!r}) first")
        if not isinstance(num_classes, int) or not (1 <= num_classes <= 1024):
            raise ConfigError(f"num_classes must be an integer in [1, 1024], got {num_classes!r}")
        labels = list(label_names) if label_names is not None else ["background"] + [
            f"class_{index}" for index in range(1, num_classes)
        ]
        if len(labels) != num_classes:
            raise ConfigError(f"{len(labels)} label names given for {num_classes} classes")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for layer in self.expert_layers.values():
            layer.add_expert(name, self.expert_config.init_std, generator, dtype=dtype)
        weight = next(self.backbone.parameters())  # the model's device and dtype (after .to()/.double())
        with torch.random.fork_rng(devices=[]):  # a seeded decoder must not reseed the caller's RNG
            if seed is not None:
                torch.manual_seed(seed)
            if packed:
                self.decoders[name] = PackedDecoder(*self._decoder_shape(num_classes), dtype=dtype or weight.dtype,
                                                    device=weight.device)
            else:
                self.decoders[name] = self._new_decoder(num_classes).to(device=weight.device,
                                                                        dtype=dtype or weight.dtype)
        info = ModalityInfo(name, num_classes, labels, dict(preset or {}), [int(s) for s in input_size])
        self.modalities[name] = info
        if self.active_modality is None:
            self.active_modality = name
        return info

    def _decoder_shape(self, num_classes: int) -> tuple:
        return (self.backbone.feature_channels, self.backbone.in_chans, num_classes, self.decoder_config.channels,
                self.decoder_config.stem_channels)

    def _new_decoder(self, num_classes: int) -> ModalityDecoder:
        return ModalityDecoder(*self._decoder_shape(num_classes))

    def remove_modality(self, name: str) -> None:
        """Drop a modality's experts, decoder and head; the others are untouched."""
        self._require(name)
        if self.merged_modality == name:
            raise ConfigError(f"modality {name!r} is merged into the backbone; call unmerge() first")
        for layer in self.expert_layers.values():
            layer.remove_expert(name)
        del self.decoders[name]
        del self.modalities[name]
        self.signatures.pop(name, None)
        if self.active_modality == name:
            self.active_modality = next(iter(self.modalities), None)
            self._modality_chosen = False

    def set_modality(self, name: str) -> None:
        """Make ``name`` the default modality of :meth:`forward` (no tensor is loaded or copied): ``model(images)``
        then segments every image with it instead of routing."""
        self._require(name)
        self.active_modality = name
        self._modality_chosen = True

    def set_signature(self, name: str, signature: ImageSignature | None) -> None:
        """Attach (or with ``None`` drop) the image signature that lets :meth:`route` send images to ``name``."""
        self._require(name)
        if signature is None:
            self.signatures.pop(name, None)
        else:
            self.signatures[name] = signature

    # ------------------------------------------------------------------------------------------ image routing
    @torch.no_grad()
    def route(self, images, min_confidence: float | None = None) -> list[RoutingDecision]:
        """Which loaded adapter each image belongs to, with a confidence; ``modality=None`` when none fits.

        Args:
            images: ``[B, C, H, W]`` (any size, any intensity scale: raw pixels, or normalised by an affine preset;
                not by ``clahe``, which changes an image's look: route its raw pixels), or a list of
                ``[C, H, W]`` arrays of different sizes.
            min_confidence: acceptance threshold in [0, 1] (default: each adapter's stored one).

        Only adapters with a signature take part. Costs one 160-px thumbnail per image (two for an image framed by
        a constant-colour border: with and without it, each adapter keeps its better fit), no backbone pass. Pixel
        noise is refused whatever the threshold (``reason="noise"``, :func:`~.signatures.looks_like_noise`).
        """
        candidates = self._signed_adapters()
        images = as_image_list(images)
        return refuse_noise(route_views(candidates, routing_descriptors(images), min_confidence),
                            [looks_like_noise(image) for image in images])

    def route_volume(self, slices, min_confidence: float | None = None) -> RoutingDecision:
        """One decision for a whole volume from some or all of its slices (``[S, C, H, W]`` or a list of
        ``[C, H, W]``): each adapter's median score over the slices, so every slice of a scan goes to the same
        adapter and a few atypical slices do not decide it (:func:`~m4oe_adapters.routing.route_volumes`). A volume
        most of whose slices are pixel noise is refused (``reason="noise"``)."""
        candidates = self._signed_adapters()
        slices = as_image_list(slices)
        decision = route_volumes(candidates, [routing_descriptors(slices)], min_confidence)[0]
        return refuse_noise([decision], [volume_is_noise([looks_like_noise(image) for image in slices])])[0]

    def _signed_adapters(self) -> dict:
        candidates = {name: self.signatures[name] for name in self.modalities if name in self.signatures}
        if not candidates:
            loaded = ", ".join(self.modalities) or "none"
            raise ConfigError(
                f"none of the loaded adapters ({loaded}) has a routing signature: give the modality, or add one "
                "with `m4oe sign ADAPTER --data ...` (adapters trained by m4oe train get one automatically)"
            )
        return candidates

    def _require(self, name: str) -> None:
        if name not in self.modalities:
            loaded = ", ".join(self.modalities) or "none"
            raise ConfigError(f"modality {name!r} is not loaded (loaded: {loaded}); load its adapter file first")

    # ------------------------------------------------------------------------------------------ tensors
    def modality_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Every tensor of one modality under its file key (``experts.<layer>.lora_A``, ``decoder.<param>``)."""
        self._require(name)
        tensors: dict[str, torch.Tensor] = {}
        for layer_name, layer in self.expert_layers.items():
            for kind in EXPERT_TENSORS:
                tensors[f"{EXPERT_PREFIX}{layer_name}.{kind}"] = getattr(layer, kind)[name]
        for key, tensor in self.decoders[name].state_dict(keep_vars=True).items():
            tensors[f"{DECODER_PREFIX}{key}"] = tensor
        return tensors

    def modality_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of one modality (its experts, router keys, decoder and head)."""
        self._require(name)
        parameters = [getattr(layer, kind)[name] for layer in self.expert_layers.values() for kind in EXPERT_TENSORS]
        return parameters + list(self.decoders[name].parameters())

    def expected_tensor_shapes(self, num_classes: int) -> dict[str, tuple[int, ...]]:
        """File keys and shapes a modality with ``num_classes`` classes must have on this backbone."""
        rank = self.expert_config.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for layer_name, layer in self.expert_layers.items():
            shapes[f"{EXPERT_PREFIX}{layer_name}.lora_A"] = (rank, layer.in_features)
            shapes[f"{EXPERT_PREFIX}{layer_name}.lora_B"] = (layer.out_features, rank)
            shapes[f"{EXPERT_PREFIX}{layer_name}.router_key"] = (layer.in_features,)
        with torch.device("meta"):  # shapes only, no memory
            reference = self._new_decoder(num_classes)
        for key, tensor in reference.state_dict().items():
            shapes[f"{DECODER_PREFIX}{key}"] = tuple(tensor.shape)
        return shapes

    @torch.no_grad()
    def set_modality_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors into an existing modality (keys and shapes must already match)."""
        own = self.modality_tensors(name)
        for key, target in own.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
        for layer in self.expert_layers.values():
            layer.mark_keys_trained(name)

    def train_only(self, name: str) -> list[nn.Parameter]:
        """Freeze everything except modality ``name``'s parameters, which are returned for the optimiser."""
        self._require(name)
        wide = next(self.backbone.parameters()).dtype
        if isinstance(self.decoders[name], PackedDecoder):
            raise ConfigError(f"modality {name!r} is packed for inference (loaded with keep_dtype=True); load it "
                              "without keep_dtype to train it")
        narrow = {p.dtype for p in self.modality_parameters(name)} - {wide}
        if narrow:
            raise ConfigError(f"modality {name!r} is stored in {sorted(map(str, narrow))[0]} for inference (loaded "
                              "with keep_dtype=True); load it without keep_dtype to train it")
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        parameters = self.modality_parameters(name)
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def parameter_count(self, name: str) -> int:
        return sum(tensor.numel() for tensor in self.modality_tensors(name).values())

    def train(self, mode: bool = True) -> "SegmentationModel":
        """Train mode for decoders; the frozen backbone's own modules stay in eval mode (no dropout/drop-path)."""
        super().train(mode)
        self.backbone.train(mode)  # keeps the backbone's own modules in eval mode
        return self

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        images: torch.Tensor,
        modality: str | Sequence[str] | None = None,
        *,
        routing: str | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Segment a batch.

        Args:
            images: ``[B, C, H, W]``, preprocessed with each modality's preset; ``H, W`` multiples of 32.
            modality: one name for the whole batch, one name per sample (mixed batch), ``"auto"`` to route each
                image to its adapter (:meth:`route` of these inputs, so not for images normalised with the ``clahe``
                preset: route their raw pixels first; still one backbone pass for the batch), or ``None``: the
                modality chosen with :meth:`set_modality`, else the only loaded one, else routing as ``"auto"``
                (with soft routing, ``None`` lets the token gate mix every expert).
            routing: ``"hard"`` or ``"soft"`` (default: the model's ``expert_config.routing``).
            top_k: soft routing: experts kept per token (default: the config's).

        Returns:
            logits ``[B, K, H, W]`` where ``K`` is the largest class count in the batch; classes a sample's modality
            does not have are ``-inf`` (so softmax gives them 0 and argmax never picks them).

        Raises:
            UnknownImageError: routing found no adapter for some image (``error.decisions`` has every image's
                decision; call :meth:`route` first to segment only the known ones).
        """
        mode = routing or self.expert_config.routing
        if mode not in ("hard", "soft"):
            raise ConfigError(f"routing must be 'hard' or 'soft', got {mode!r}")
        batch = images.shape[0]
        per_sample = self._per_sample_modalities(modality, batch, mode, images)
        if per_sample is None:  # soft routing, modality unknown: let the gate decide
            features = self._soft_features(images, None, top_k, record=True)
            per_sample = self._modalities_from_gates()
        elif mode == "soft":
            features = self._soft_features(images, per_sample, top_k, record=False)
        else:
            features = self._hard_features(images, per_sample)
        return self._decode(features, images, per_sample)

    def _per_sample_modalities(self, modality, batch: int, mode: str, images: torch.Tensor | None = None
                               ) -> list[str] | None:
        if modality is None:
            if mode == "soft":
                return None
            if self.active_modality is None:
                raise ConfigError("no modality is loaded; add_modality() or load_adapter() first")
            routable = len(self.modalities) > 1 and any(name in self.signatures for name in self.modalities)
            modality = "auto" if routable and not self._modality_chosen else self.active_modality
        if modality == "auto" and "auto" not in self.modalities:
            return self._routed_modalities(images)
        names = [modality] * batch if isinstance(modality, str) else list(modality)
        if len(names) != batch:
            raise ConfigError(f"{len(names)} modalities given for a batch of {batch} images")
        for name in dict.fromkeys(names):
            self._require(name)
        return names

    def _routed_modalities(self, images: torch.Tensor) -> list[str]:
        decisions = self.route(images)
        unknown = [index for index, decision in enumerate(decisions) if decision.unknown]
        if unknown:
            raise UnknownImageError(
                f"{len(unknown)} of {len(decisions)} images fit no loaded adapter (indices {unknown[:8]}; best "
                f"confidence {max(decisions[i].confidence for i in unknown):.2g}); segment them with an explicit "
                "modality or load their adapter", decisions)
        return [decision.modality for decision in decisions]

    def _hard_features(self, images: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        distinct = tuple(dict.fromkeys(names))
        if self.route_by_index and self.merged_modality is None:
            # Compiled backbone (see compilation.py): every loaded expert takes part and each sample's choice is an
            # index tensor, so a modality switch changes data, not the traced Python constants (no recompile).
            distinct = tuple(self.modalities)
        state = self.routing
        state.mode = "hard"
        state.expert_names = distinct
        state.batch_size = images.shape[0]
        state.sample_expert = (
            None if len(distinct) == 1 else torch.tensor([distinct.index(n) for n in names], device=images.device)
        )
        try:
            return self.backbone(images)
        finally:
            self._reset_routing()

    def _soft_features(self, images, names, top_k, record: bool) -> list[torch.Tensor]:
        if self.merged_modality is not None:
            raise ConfigError(f"soft routing needs unmerged experts; call unmerge() (merged: {self.merged_modality})")
        loaded = tuple(self.modalities)
        if not loaded:
            raise ConfigError("no modality is loaded; add_modality() or load_adapter() first")
        state = self.routing
        state.mode = "soft"
        state.expert_names = loaded
        state.batch_size = images.shape[0]
        state.top_k = top_k if top_k is not None else self.expert_config.top_k
        state.sample_expert = (
            None if names is None else torch.tensor([loaded.index(n) for n in names], device=images.device)
        )
        state.record_gates = record
        try:
            return self.backbone(images)
        finally:
            self._reset_routing(keep_records=record)

    def _reset_routing(self, keep_records: bool = False) -> None:
        state = self.routing
        state.expert_names = ()
        state.sample_expert = None
        state.record_gates = False
        state.top_k = None
        if not keep_records:
            state.gate_weights = {}

    def _modalities_from_gates(self) -> list[str]:
        gates = torch.stack(list(self.routing.gate_weights.values())).mean(dim=0)  # [B, E]
        loaded = list(self.modalities)
        return [loaded[index] for index in gates.argmax(dim=1).tolist()]

    def gate_weights(self) -> torch.Tensor | None:
        """Mean soft-gate weights ``[B, E]`` (E = loaded modalities, in order) of the last modality-free soft
        forward, averaged over layers and tokens; ``None`` if none was recorded."""
        if not self.routing.gate_weights:
            return None
        return torch.stack(list(self.routing.gate_weights.values())).mean(dim=0)

    def _run_decoder(self, name: str, features: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Modality ``name``'s decoder; one stored narrower than the backbone runs on a transient wide copy of its
        parameters (the stored ones are not touched)."""
        decoder = self.decoders[name]
        wide = next(self.backbone.parameters()).dtype
        if isinstance(decoder, PackedDecoder):
            return decoder(features, images, dtype=wide)
        stored = next(decoder.parameters()).dtype
        if stored == wide:
            return decoder(features, images)
        state = {key: value.to(wide) if value.is_floating_point() else value
                 for key, value in [*decoder.named_parameters(), *decoder.named_buffers()]}
        return torch.func.functional_call(decoder, state, (features, images))

    def _decode(self, features: list[torch.Tensor], images: torch.Tensor, names: list[str]) -> torch.Tensor:
        distinct = list(dict.fromkeys(names))
        if len(distinct) == 1:
            return self._run_decoder(distinct[0], features, images)
        # Mixed batch: each modality's decoder runs once on its own samples.
        max_classes = max(self.modalities[name].num_classes for name in distinct)
        height, width = images.shape[-2:]
        logits = None  # allocated in the decoders' output dtype (bf16/fp16 under autocast)
        for name in distinct:
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=images.device)
            subset = [feature.index_select(0, index) for feature in features]
            output = self._run_decoder(name, subset, images.index_select(0, index))
            if logits is None:
                logits = output.new_full((images.shape[0], max_classes, height, width), float("-inf"))
            logits[index, : output.shape[1]] = output.to(logits.dtype)
        return logits

    # ------------------------------------------------------------------------------------------ auxiliary losses
    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Losses collected during soft-routing forwards with ``routing.collect_aux`` on (then cleared):
        ``load_balance`` (Switch/Mixtral, mean over layers) and ``gate`` (gate cross-entropy against the known
        modality)."""
        state = self.routing
        losses = {}
        if state.aux_losses:
            losses["load_balance"] = torch.stack(state.aux_losses).mean()
        if state.gate_losses:
            losses["gate"] = torch.stack(state.gate_losses).mean()
        state.aux_losses, state.gate_losses = [], []
        return losses

    # ------------------------------------------------------------------------------------------ merge
    def merge(self, name: str) -> None:
        """Fold modality ``name``'s experts into the backbone weights (single-modality deployment: the forward
        then costs what the frozen base costs). Other modalities cannot run until :meth:`unmerge`."""
        self._require(name)
        if self.merged_modality is not None:
            raise ConfigError(f"modality {self.merged_modality!r} is already merged; call unmerge() first")
        for layer in self.expert_layers.values():
            layer.merge(name)
        self.merged_modality = name
        self.active_modality = name
        self._modality_chosen = True

    def unmerge(self) -> None:
        """Restore the exact backbone bytes (the fingerprint matches again)."""
        for layer in self.expert_layers.values():
            layer.unmerge()
        self.merged_modality = None
