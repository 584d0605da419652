"""`m4oe bench --quick` runs on a tiny model and writes a complete JSON report (no timing is asserted)."""
from __future__ import annotations

import json

from m4oe_adapters.cli import main


def test_bench_quick_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["training"]) == {
        "experts_hard_k1", "experts_hard_k4", "experts_soft_k4", "experts_soft_k4_top2",
        "peft_lora", "full_finetune", "decoder_only", "experts_hard_k1_bf16", "experts_hard_k1_checkpointed",
    }
    for row in report["training"].values():
        assert row["step_seconds"] > 0 and row["total_bytes"] == row["saved_activation_bytes"] + row["state_bytes"]
        assert 0 < row["trainable_share"] <= 1 and row["gflop_per_step"] > 0 and row["share_of_matmul_peak"] > 0
    for batch in report["inference_seconds"].values():
        assert set(batch) == {"frozen_base", "merged", "unmerged_hard", "mixed_4_modalities",
                              "routed_4_modalities", "route_only", "forward_of_routed", "soft_gate"}
    assert report["matmul_peak_gflops"] > 0 and report["adapter_load_ms"] > 0
    assert set(report["targets"]) == set(report["ratios"]) - {
        "lora_vs_full_memory", "soft_vs_hard_latency", "bf16_vs_fp32_time", "bf16_vs_fp32_activations",
        "routed_vs_mixed_latency_end_to_end"}
    batch = report["inference_seconds"]["batch_2"]  # the routing ratio is (route + mixed forward) / mixed forward
    assert report["ratios"]["routed_vs_mixed_latency"] == 1 + batch["route_only"] / batch["mixed_4_modalities"]
    assert report["inspect_startup_seconds"] > 0 and report["import_torch_seconds"] > 0
    detail = report["switch_detail_ms"]  # the switch is timed as forward passes, not as an attribute assignment
    assert detail["forward_after_a_switch"] > 0.1 and detail["forward_same_modality"] > 0.1
    assert "compile" not in report
    assert report["training"]["full_finetune"]["trainable_share"] == 1.0
    assert report["setup"]["weights_given"] is False and "random" in report["setup"]["weights"]
    printed = capsys.readouterr().out
    assert "ratios and targets:" in printed and "random weights" in printed


def test_bench_skip_training_measures_inference_and_routing_only(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--skip-training", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "training" not in report and report["setup"]["training"] is False
    assert set(report["inference_seconds"]) == {"batch_1", "batch_2"}
    for batch in report["inference_seconds"].values():
        assert min(batch.values()) > 0
    assert {"routed_vs_mixed_latency", "routed_vs_mixed_latency_batch_1", "switch_ms"} <= set(report["ratios"])
    assert not any(name.startswith(("experts_", "bf16_", "checkpointed_")) for name in report["ratios"])
    assert set(report["targets"]) <= set(report["ratios"])
    assert "not measured: --skip-training" in capsys.readouterr().out
