"""torch.compile: the hard-routed model compiles, and after the first compilation per shape neither a modality
switch, a mixed batch nor replacing an adapter with another of the same rank compiles again (counted)."""
from __future__ import annotations

import torch

from m4oe_adapters import load_adapter, save_adapter
from m4oe_adapters.compilation import compile_model, recompile_count

from conftest import tiny_model


def test_compiled_model_switches_modality_and_swaps_adapters_without_recompiling(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    donor = tiny_model(seed=0)
    with torch.no_grad():  # another MRI adapter of the same rank, with other values
        for layer in donor.expert_layers.values():
            layer.lora_B["MRI"].mul_(-3)
    replacement = save_adapter(donor, "MRI", tmp_path / "mri_v2.safetensors")
    model = tiny_model()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        eager = {name: model(x, name) for name in ("CT", "MRI")}
        eager_mixed = model(x, ["MRI", "CT"])
    counter = CompileCounter()  # counts the graphs dynamo compiles; runs them eagerly (fast on CPU)
    compile_model(model, backend=counter, fullgraph=True)  # fullgraph: the backbone traces without a graph break
    with torch.no_grad():
        torch.testing.assert_close(model(x, "CT"), eager["CT"], atol=1e-5, rtol=0)
        warm = counter.frame_count
        frames = recompile_count()
        assert warm == 1
        for name in ("MRI", "CT", "MRI"):  # switching
            torch.testing.assert_close(model(x, name), eager[name], atol=1e-5, rtol=0)
        mixed = model(x, ["MRI", "CT"])
        torch.testing.assert_close(mixed[torch.isfinite(mixed)], eager_mixed[torch.isfinite(eager_mixed)],
                                   atol=1e-5, rtol=0)
        load_adapter(model, replacement, replace=True)  # hot-swap an adapter of the same rank
        swapped = model(x, "MRI")
        assert not torch.allclose(swapped, eager["MRI"], atol=1e-4)  # the new adapter's values are used
        with torch.no_grad():
            reference = tiny_model(seed=0)
            load_adapter(reference, replacement, replace=True)
            torch.testing.assert_close(swapped, reference(x, "MRI"), atol=1e-5, rtol=0)
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompilations after warm-up"
    assert recompile_count() == frames
