"""Modality experts: identity at creation, per-sample routing, soft gate, isolation between modalities, merge."""
from __future__ import annotations

import pytest
import torch

from m4oe_adapters import ConfigError, ExpertConfig, SegmentationModel
from m4oe_adapters.routing import load_balancing_loss

from conftest import tiny_backbone, tiny_model


def test_default_targets_are_attention_and_mlp_linears_of_every_block(model):
    suffixes = {name.rsplit(".", 1)[1] for name in model.expert_layers}
    assert suffixes == {"qkv", "proj", "fc1", "fc2"}
    assert len(model.expert_layers) == 4 * 5  # 5 blocks in the tiny Swin


def test_target_pattern_is_configurable_by_regex():
    model = SegmentationModel(tiny_backbone(), ExpertConfig(target_pattern=r".*\.attn\.qkv"))
    assert all(name.endswith("attn.qkv") for name in model.expert_layers) and len(model.expert_layers) == 5


def test_pattern_matching_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="matches no"):
        SegmentationModel(tiny_backbone(), ExpertConfig(target_pattern="nothing_here"))


def test_a_new_expert_starts_as_the_identity():
    model = tiny_model(trained=False)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        plain = model.backbone(x)
        routed = model._hard_features(x, ["CT", "CT"])
    for a, b in zip(plain, routed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mixed_modality_batch_equals_each_sample_alone(model):
    x = torch.randn(4, 1, 64, 96)
    names = ["CT", "MRI", "MRI", "CT"]
    with torch.no_grad():
        mixed = model(x, names)
        for index, name in enumerate(names):
            alone = model(x[index : index + 1], name)
            torch.testing.assert_close(mixed[index, : alone.shape[1]], alone[0], atol=1e-5, rtol=0)
            assert torch.isinf(mixed[index, alone.shape[1] :]).all()  # classes the modality does not have


def test_hard_routing_computes_only_the_selected_expert(model):
    model.train_only("CT")
    for parameter in model.modality_parameters("MRI"):
        parameter.requires_grad_(True)
    model(torch.randn(2, 1, 64, 64), "CT").sum().backward()
    assert all(p.grad is None for p in model.modality_parameters("MRI"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.modality_parameters("CT"))


def test_experts_change_the_features(model):
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ct = model._hard_features(x, ["CT"])[-1]
        mri = model._hard_features(x, ["MRI"])[-1]
    assert not torch.allclose(ct, mri)


def test_soft_gate_weights_the_layer_uses_sum_to_one_and_top_k_keeps_k(model, monkeypatch):
    import m4oe_adapters.experts as experts

    model.add_modality("xray", 2, seed=5)
    used = []
    real = experts.gate_probabilities

    def recording(*args, **kwargs):  # the weights each layer really multiplies its experts by
        weights, logits = real(*args, **kwargs)
        used.append(weights)
        return weights, logits

    monkeypatch.setattr(experts, "gate_probabilities", recording)
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 64), "CT", routing="soft", top_k=2)
    assert len(used) == len(model.expert_layers)
    for weights in used:
        assert weights.shape[-1] == 3
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert ((weights > 0).sum(-1) <= 2).all() and ((weights > 0).sum(-1) >= 1).all()


def soft_layer(keys: dict[str, torch.Tensor]):
    """One expert layer (16 -> 8, rank 2) with experts CT and MRI, non-zero B, the given router keys, and a soft
    routing state over both."""
    from m4oe_adapters.experts import ModalityExpertLinear
    from m4oe_adapters.routing import RoutingState

    generator = torch.Generator().manual_seed(0)
    layer = ModalityExpertLinear(torch.nn.Linear(16, 8), rank=2, alpha=4)
    with torch.no_grad():
        for name in ("CT", "MRI"):
            layer.add_expert(name, generator=generator)
            layer.lora_B[name].normal_(0, 1, generator=generator)
            layer.router_key[name].copy_(keys[name])
    layer.routing = RoutingState(mode="soft", expert_names=("CT", "MRI"), batch_size=2)
    return layer


def hard_output(layer, x, name):
    from m4oe_adapters.routing import RoutingState

    state = layer.routing
    layer.routing = RoutingState(mode="hard", expert_names=(name,), batch_size=2)
    try:
        return layer(x)
    finally:
        layer.routing = state


def test_soft_routing_with_a_far_away_key_equals_hard_routing_on_the_other_expert():
    unit = torch.nn.functional.normalize(torch.ones(16), dim=0)
    layer = soft_layer({"CT": unit, "MRI": 100 * unit})  # |k|^2 = 1e4: MRI's gate weight underflows to 0
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hard_output(layer, x, "CT"), atol=1e-5, rtol=0)
        assert not torch.allclose(layer(x), hard_output(layer, x, "MRI"), atol=1e-3)


def test_soft_routing_with_equal_keys_averages_the_two_experts():
    unit = torch.nn.functional.normalize(torch.ones(16), dim=0)
    layer = soft_layer({"CT": unit, "MRI": unit.clone()})  # equal distances: weights 1/2 and 1/2
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        mixed = (hard_output(layer, x, "CT") + hard_output(layer, x, "MRI")) / 2
        torch.testing.assert_close(layer(x), mixed, atol=1e-5, rtol=0)
        assert not torch.allclose(layer(x), hard_output(layer, x, "CT"), atol=1e-3)


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_collapsed():
    balanced = torch.zeros(100, 4)
    collapsed = torch.zeros(100, 4)
    collapsed[:, 0] = 10
    assert load_balancing_loss(balanced, None).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed, None).item() > 3.5


def test_soft_training_collects_load_balance_and_gate_losses(model):
    model.train()
    model.routing.collect_aux = True
    logits = model(torch.randn(2, 1, 64, 64), ["CT", "MRI"], routing="soft")
    losses = model.auxiliary_losses()
    assert set(losses) == {"load_balance", "gate"}
    (logits[0, :2].mean() + losses["load_balance"] + losses["gate"]).backward()
    assert model.expert_layers[next(iter(model.expert_layers))].router_key["CT"].grad is not None


def test_soft_gate_routes_images_to_the_modality_whose_expert_saw_them():
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)

    def images(name):  # two "modalities" with different appearance: smooth gradients vs high-frequency noise
        if name == "CT":
            ramp = torch.linspace(-1, 1, 64)
            return (ramp[None, None, :, None] * ramp[None, None, None, :]).repeat(4, 1, 1, 1) + 0.05 * torch.randn(
                4, 1, 64, 64, generator=generator
            )
        return torch.randn(4, 1, 64, 64, generator=generator) * 2

    model.train()
    model.routing.update_keys = True
    model.routing.key_momentum = 0.5
    with torch.no_grad():
        for _ in range(5):
            for name in ("CT", "MRI"):
                model(images(name), name)
    model.routing.update_keys = False
    model.eval()
    with torch.no_grad():
        model(torch.cat([images("CT"), images("MRI")]), routing="soft")
        gates = model.gate_weights()
    assert gates[:4, 0].min() > 0.5 and gates[4:, 1].min() > 0.5


def train_a_few_steps(model, name: str, steps: int = 3) -> None:
    """AdamW with weight decay on one modality's parameters (decay would move any parameter it were given)."""
    optimizer = torch.optim.AdamW(model.train_only(name), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(2, 1, 64, 64), name).logsumexp(1).mean().backward()
        optimizer.step()
    model.eval()


def test_training_one_modality_never_changes_another_modalitys_outputs(model):
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = model(x, "MRI").clone()
    model.add_modality("fundus", 2, seed=3)
    train_a_few_steps(model, "fundus")
    with torch.no_grad():
        assert torch.equal(model(x, "MRI"), before)


def test_backbone_bytes_stay_identical_through_training(model):
    fingerprint = model.backbone.fingerprint()
    train_a_few_steps(model, "CT")
    assert model.backbone.fingerprint(recompute=True) == fingerprint


def test_merge_matches_unmerged_and_unmerge_restores_exact_bytes(model):
    x = torch.randn(2, 1, 64, 64)
    fingerprint = model.backbone.fingerprint()
    with torch.no_grad():
        unmerged = model(x, "MRI")
        model.merge("MRI")
        merged = model(x, "MRI")
        assert model.backbone.fingerprint(recompute=True) != fingerprint
        with pytest.raises(ConfigError, match="merged"):
            model(x, "CT")
        model.unmerge()
        after = model(x, "MRI")
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert model.backbone.fingerprint(recompute=True) == fingerprint
    assert torch.equal(after, unmerged)


def test_switching_modality_changes_what_runs_and_copies_no_tensor(model):
    x = torch.randn(1, 1, 64, 64)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.set_modality("MRI")
        as_mri = model(x)  # no modality given: the active one
        assert torch.equal(as_mri, model(x, "MRI")) and as_mri.shape[1] == 3
        model.set_modality("CT")
        as_ct = model(x)
        assert torch.equal(as_ct, model(x, "CT")) and as_ct.shape[1] == 2
    assert pointers == {name: p.data_ptr() for name, p in model.named_parameters()}


def test_removing_a_modality_keeps_the_others(model):
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        before = model(x, "CT")
        model.remove_modality("MRI")
        assert torch.equal(model(x, "CT"), before)
    with pytest.raises(ConfigError, match="not loaded"):
        model(x, "MRI")


def test_unknown_modality_and_bad_routing_are_config_errors(model):
    x = torch.randn(1, 1, 64, 64)
    with pytest.raises(ConfigError, match="not loaded"):
        model(x, "dermoscopy")
    with pytest.raises(ConfigError, match="routing"):
        model(x, "CT", routing="fuzzy")
    with pytest.raises(ConfigError, match="invalid modality name"):
        model.add_modality("../etc", 2)


def test_cached_expert_stacks_follow_in_place_updates(model):
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = model(x, ["CT", "MRI"])
        for layer in model.expert_layers.values():
            layer.lora_B["MRI"].mul_(2)  # as an optimiser step would
        after = model(x, ["CT", "MRI"])
        alone = model(x[1:], "MRI")
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after[1, :3], alone[0], atol=1e-5, rtol=0)


def test_mixed_batches_of_ever_new_modality_sets_keep_a_bounded_cache_and_exact_results():
    """Serving many adapters sends batches of ever new modality sets: each layer keeps at most STACK_CACHE_SIZE
    stacks (least recently used dropped), and a set whose stack was dropped still gives the same output."""
    from itertools import combinations

    from m4oe_adapters.experts import STACK_CACHE_SIZE

    model = SegmentationModel(tiny_backbone(), ExpertConfig(rank=2))
    names = [f"m{index}" for index in range(7)]
    for index, name in enumerate(names):
        model.add_modality(name, 2, seed=index)
        with torch.no_grad():
            for layer in model.expert_layers.values():
                layer.lora_B[name].normal_(0, 0.1)
    x = torch.randn(3, 1, 64, 64)
    sets = list(combinations(names, 3))  # 35 distinct sets, more than the cache holds
    with torch.no_grad():
        first = model(x, list(sets[0]))
        for chosen in sets[1:]:
            model(x, list(chosen))
        sizes = {len(layer._stack_cache) for layer in model.expert_layers.values()}
        again = model(x, list(sets[0]))  # dropped from the cache long ago: stacked afresh
    assert len(sets) > STACK_CACHE_SIZE and sizes == {STACK_CACHE_SIZE}
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["timm", "transformers", "monai"])
def test_mixed_modality_batch_equals_each_sample_alone_on_every_family(family):
    from families import family_model

    model = family_model(family)
    x = torch.randn(3, 1, 64, 64)
    names = ["MRI", "CT", "MRI"]
    with torch.no_grad():
        mixed = model(x, names)
        for index, name in enumerate(names):
            alone = model(x[index : index + 1], name)
            torch.testing.assert_close(mixed[index, : alone.shape[1]], alone[0], atol=1e-5, rtol=0)
        assert not torch.allclose(model(x[:1], "CT")[0, :2], mixed[0, :2], atol=1e-4)  # the experts differ


def test_a_new_router_key_keeps_nothing_of_its_random_start_after_one_update():
    from m4oe_adapters.experts import ModalityExpertLinear

    layer = ModalityExpertLinear(torch.nn.Linear(8, 8), rank=2, alpha=2)
    layer.add_expert("CT", generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(4, 5, 8)
    layer._update_router_key("CT", tokens, momentum=0.99)
    expected = torch.nn.functional.normalize(tokens.reshape(-1, 8), dim=-1).mean(0)
    torch.testing.assert_close(layer.router_key["CT"].detach(), expected)
    layer.mark_keys_trained("CT")  # a key from a file keeps moving slowly
    before = layer.router_key["CT"].detach().clone()
    layer._update_router_key("CT", torch.randn(4, 5, 8), momentum=0.99)
    assert (layer.router_key["CT"].detach() - before).norm() < 0.05 * before.norm()


def test_mixed_batch_training_moves_each_experts_key_with_its_own_samples():
    from conftest import tiny_model

    model = tiny_model(modalities=("CT", "MRI"))
    model.train()
    model.routing.update_keys = True
    layer = next(iter(model.expert_layers.values()))
    before = {name: layer.router_key[name].detach().clone() for name in ("CT", "MRI")}
    model(torch.rand(3, 1, 64, 64), modality=["CT", "MRI", "CT"])
    for name in ("CT", "MRI"):
        assert not torch.equal(layer.router_key[name].detach(), before[name])
