"""The math of one layer: a frozen ``nn.Linear`` plus one low-rank expert per modality.

For expert ``k`` the update is ``ΔW_k = (alpha / r) · B_k A_k`` with ``A_k: [r, in]`` and ``B_k: [out, r]``;
``B_k`` starts at zero so a new expert is the identity. Experts are kept as one parameter per modality (so each
modality trains, saves and loads independently) and are applied together as *stacked* tensors with one batched
matmul — never a Python loop over experts:

* hard routing, one modality in the batch:   ``y = W x + s · B_k (A_k x)``, one fused autograd function that adds the
  update in place and saves only ``x`` and ``A_k x`` for backward (:mod:`~m4oe_adapters.expert_kernels`)
* hard routing, mixed batch:                 the same, with each sample's ``A, B`` gathered from the stack (``bmm``)
* soft routing:                              ``h = [A_1; ...; A_E] x`` (one matmul, rank ``E·r``), each expert's
  ``r`` slice weighted by its gate weight, then ``y = W x + s · [B_1 ... B_E] h`` (one matmul).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .expert_kernels import low_rank_linear, per_sample_low_rank_linear
from .routing import RoutingState, gate_probabilities, load_balancing_loss, rows_per_sample


STACK_CACHE_SIZE = 4  # expert stacks cached per layer (one per distinct modality set of a mixed batch)


class ModalityExpertLinear(nn.Module):
    """A frozen linear layer with per-modality low-rank experts.

    Args:
        base_layer: the backbone's ``nn.Linear`` (kept frozen, never copied).
        rank: expert rank ``r``.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        name: the layer's dotted name inside the backbone (used in file keys and errors).

    Shapes: input ``[..., in_features]`` → output ``[..., out_features]``; the leading dimension must be the batch
    or batch × windows (sample-major), see :func:`~m4oe_adapters.routing.rows_per_sample`.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.layer_name = name
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.router_key = nn.ParameterDict()
        # Set by the model after injection; a plain attribute (not a submodule) shared by all layers.
        self.routing: RoutingState | None = None
        self.merged_modality: str | None = None
        # A buffer (not saved in state dicts) so that .to(device/dtype) moves the bytes unmerge() restores.
        self.register_buffer("_weight_before_merge", None, persistent=False)
        self._stack_cache: dict[tuple[str, ...], tuple] = {}
        # Router-key updates seen per expert: the running mean is bias-corrected (cumulative while few tokens were
        # seen), so a new key holds nothing of its random start after its first update.
        self._key_updates: dict[str, int] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # ----------------------------------------------------------------------------------------------- experts
    def add_expert(self, modality: str, init_std: float = 0.02, generator: torch.Generator | None = None,
                   dtype: torch.dtype | None = None) -> None:
        """Create modality ``modality``'s expert: ``A ~ N(0, init_std²)``, ``B = 0``, a random unit router key
        (replaced by the mean normalised token once the expert trains). ``dtype``: how ``A`` and ``B`` are stored
        (default: the layer's); a narrower one (fp16 for serving many adapters) is cast to the layer's at use."""
        if modality in self.lora_A:
            raise ConfigError(f"layer {self.layer_name} already has an expert for modality {modality!r}")
        weight = self.base_layer.weight
        # The experts' dtype is the layer's (fp32 unless the model was moved with .double()/.half()); drawn on the
        # CPU (a CPU generator cannot draw on a GPU), so a seed gives the same expert on every device.
        compute = weight.dtype if weight.is_floating_point() else torch.float32
        factory = dict(device=weight.device, dtype=dtype or compute)
        lora_a = (torch.randn(self.rank, self.in_features, generator=generator) * init_std).to(**factory)
        key = torch.randn(self.in_features, generator=generator).to(device=weight.device, dtype=compute)
        self.lora_A[modality] = nn.Parameter(lora_a)
        self.lora_B[modality] = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        self.router_key[modality] = nn.Parameter(key / key.norm())
        self._key_updates[modality] = 0
        self._stack_cache.clear()

    def remove_expert(self, modality: str) -> None:
        if self.merged_modality == modality:
            raise ConfigError(f"modality {modality!r} is merged into {self.layer_name}; call unmerge() first")
        for table in (self.lora_A, self.lora_B, self.router_key):
            del table[modality]
        self._key_updates.pop(modality, None)
        self._stack_cache.clear()

    @property
    def modalities(self) -> list[str]:
        return list(self.lora_A.keys())

    def _stack(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A: [E, r, in]`` and ``B: [E, out, r]`` of the named experts, in that order.

        Without autograd (inference) the stacks are cached until an expert is replaced, changed in place or moved
        (the key holds each parameter's identity, version counter, storage address, dtype and device: ``.to()``,
        ``.double()`` and ``.cuda()`` swap ``param.data`` without touching the version counter), so serving a mixed
        batch copies nothing. One stack is cached per distinct modality set, the ``STACK_CACHE_SIZE`` most recently
        used: with many adapters and random traffic the sets are unbounded, the memory must not be.
        """
        missing = [name for name in names if name not in self.lora_A]
        if missing:
            raise ConfigError(f"layer {self.layer_name} has no expert for modality {missing[0]!r}")
        parameters = [self.lora_A[name] for name in names] + [self.lora_B[name] for name in names]
        # No cache inside torch.compile: the key reads storage addresses, which a traced graph cannot.
        cacheable = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
        )
        if cacheable:
            key = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in parameters)
            cached = self._stack_cache.pop(names, None)
            if cached is not None and cached[0] == key:
                self._stack_cache[names] = cached  # most recently used last
                return cached[1], cached[2]
        lora_a = torch.stack(parameters[: len(names)])
        lora_b = torch.stack(parameters[len(names) :])
        if cacheable:
            while len(self._stack_cache) >= STACK_CACHE_SIZE:
                del self._stack_cache[next(iter(self._stack_cache))]  # least recently used
            self._stack_cache[names] = (key, lora_a.detach(), lora_b.detach())
        return lora_a, lora_b

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.routing
        if state is None or not state.active:
            return self.base_layer(x)
        if self.merged_modality is not None:
            if state.expert_names != (self.merged_modality,) or state.mode != "hard":
                raise ConfigError(
                    f"the backbone is merged with modality {self.merged_modality!r}; it can only run that modality "
                    "with hard routing. Call unmerge() to use other modalities or soft routing."
                )
            return self.base_layer(x)
        if state.mode == "soft":
            return self.base_layer(x) + self._soft_delta(x, state)
        return self._hard_forward(x, state)

    def _hard_forward(self, x: torch.Tensor, state: RoutingState) -> torch.Tensor:
        """``W x + b + s · B_k A_k x`` with each sample's expert ``k``, fused (see :mod:`.expert_kernels`)."""
        names = state.expert_names
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if len(names) == 1 or state.sample_expert is None:
            name = names[0]
            if name not in self.lora_A:
                raise ConfigError(f"layer {self.layer_name} has no expert for modality {name!r}")
            if state.update_keys and self.training:
                self._update_router_key(name, x, state.key_momentum)
            lora_a, lora_b = _as(weight, self.lora_A[name], self.lora_B[name])
            return low_rank_linear(x, weight, bias, lora_a, lora_b, self.scaling)
        # Mixed batch: each sample's rows use its own expert, gathered from the stack; one bmm per factor.
        lora_a, lora_b = self._stack(names)
        batch = state.batch_size
        rows_per_sample(x.shape[0], batch, self.layer_name)  # validates the sample-major layout
        per_sample = x.reshape(batch, -1, self.in_features)  # [B, rows * tokens, in]
        sample_a, sample_b = _as(weight, lora_a.index_select(0, state.sample_expert),  # [B, r, in]
                                 lora_b.index_select(0, state.sample_expert))  # [B, out, r]
        if state.update_keys and self.training:  # each expert's key learns from its own samples' tokens
            for slot, name in enumerate(names):
                self._update_router_key(name, per_sample[state.sample_expert == slot], state.key_momentum)
        output = per_sample_low_rank_linear(per_sample, weight, bias, sample_a, sample_b, self.scaling)
        return output.reshape(*x.shape[:-1], self.out_features)

    def _soft_delta(self, x: torch.Tensor, state: RoutingState) -> torch.Tensor:
        names = state.expert_names
        lora_a, lora_b = _as(self.base_layer.weight, *self._stack(names))
        num_experts = len(names)
        keys = torch.stack([self.router_key[name] for name in names])  # [E, in]
        # The gate in fp32 even under autocast: logits are distances / temperature (0.05), and bf16's 3 significant
        # digits would move them by about 0.3.
        with torch.autocast(x.device.type, enabled=False):
            weights, logits = gate_probabilities(x.float(), keys.float(), state.temperature, state.top_k)  # [..., E]
        # One matmul of rank E·r, then each expert's r columns scaled by its gate weight.
        hidden = F.linear(x, lora_a.reshape(num_experts * self.rank, self.in_features))  # [..., E*r]
        hidden = hidden.unflatten(-1, (num_experts, self.rank)) * weights.unsqueeze(-1).to(hidden.dtype)
        stacked_b = lora_b.permute(1, 0, 2).reshape(self.out_features, num_experts * self.rank)  # [out, E*r]
        delta = F.linear(hidden.flatten(-2), stacked_b) * self.scaling
        if state.collect_aux:
            state.aux_losses.append(load_balancing_loss(logits, state.top_k))
            if state.sample_expert is not None:
                rows = rows_per_sample(x.shape[0], state.batch_size, self.layer_name)
                per_row = state.sample_expert.repeat_interleave(rows)
                target = per_row.view(-1, *([1] * (logits.dim() - 2))).expand(logits.shape[:-1])
                state.gate_losses.append(F.cross_entropy(logits.reshape(-1, num_experts), target.reshape(-1)))
        if state.record_gates:
            rows_per_sample(x.shape[0], state.batch_size, self.layer_name)
            per_sample = weights.detach().reshape(state.batch_size, -1, num_experts).mean(dim=1)
            state.gate_weights[self.layer_name] = per_sample
        return delta

    @torch.no_grad()
    def _update_router_key(self, name: str, x: torch.Tensor, momentum: float) -> None:
        """Move the key towards the mean normalised token of ``x``: a cumulative mean over the first updates
        (weight ``1 / (t + 1)`` for update ``t``), then an exponential moving average with ``momentum``. A key
        loaded from a file counts as fully trained (see :meth:`mark_keys_trained`)."""
        if x.numel() == 0:
            return
        mean_token = F.normalize(x.detach().reshape(-1, self.in_features).float(), dim=-1).mean(dim=0)
        seen = self._key_updates.get(name, 0)
        keep = min(momentum, seen / (seen + 1))
        key = self.router_key[name]
        key.mul_(keep).add_(mean_token.to(key.dtype), alpha=1 - keep)
        self._key_updates[name] = seen + 1

    def mark_keys_trained(self, modality: str) -> None:
        """The key came from a trained adapter: further updates continue its moving average."""
        self._key_updates[modality] = 1 << 30

    # ------------------------------------------------------------------------------------------ merge/unmerge
    def delta_weight(self, modality: str) -> torch.Tensor:
        """``s · B A`` of one expert, ``[out, in]`` (the update merged into ``W``)."""
        lora_a, lora_b = _as(self.base_layer.weight, self.lora_A[modality], self.lora_B[modality])
        return (lora_b @ lora_a) * self.scaling

    @torch.no_grad()
    def merge(self, modality: str) -> None:
        """Fold ``modality``'s expert into the frozen weight; the original bytes are kept for :meth:`unmerge`."""
        if self.merged_modality is not None:
            raise ConfigError(f"layer {self.layer_name} is already merged with {self.merged_modality!r}")
        weight = self.base_layer.weight
        self._weight_before_merge = weight.detach().clone()
        weight.add_(self.delta_weight(modality).to(weight.dtype))
        self.merged_modality = modality

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact bytes the weight had before :meth:`merge`."""
        if self.merged_modality is None:
            return
        self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_modality = None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"experts={self.modalities}"
        )


def _as(weight: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Experts stored narrower than the layer (fp16 adapters kept as fp16 in memory) in the layer's dtype."""
    return tuple(t if t.dtype == weight.dtype else t.to(weight.dtype) for t in tensors)


def expert_parameter_count(in_features: int, out_features: int, rank: int) -> int:
    """Parameters of one expert in one layer: ``A``, ``B`` and the router key."""
    return rank * (in_features + out_features) + in_features


__all__ = ["ModalityExpertLinear", "expert_parameter_count"]
