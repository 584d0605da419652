"""Print the README's benchmark table from a `m4oe bench` JSON report.

    python examples/bench_table.py benchmarks/bench_swin_t_224_b8.json
"""
from __future__ import annotations

import json
import sys

LABELS = {
    "experts_k4_vs_lora_time": "train step time, experts K=4 vs PEFT LoRA",
    "experts_k4_vs_lora_memory": "train step memory, experts K=4 vs PEFT LoRA",
    "experts_vs_full_memory": "training memory, experts vs full fine-tuning",
    "merged_vs_base_latency": "merged inference vs frozen base",
    "unmerged_vs_base_latency": "unmerged hard routing vs frozen base",
    "mixed4_vs_single_latency": "mixed batch of 4 modalities vs one",
    "switch_ms": "switch modality (ms)",
    "adapter_load_ms": "load one adapter file (ms)",
    "file_vs_full": "adapter file / full fine-tuned model file",
}


def main(path: str) -> None:
    report = json.loads(open(path).read())
    setup, machine = report["setup"], report["machine"]
    print(f"{setup['backbone']}, {setup['weights']}, {setup['img_size']} px, batch {setup['batch']}, rank "
          f"{setup['rank']}, {machine['threads']} CPU threads, {setup['repeats']} repeats:\n")
    print("| | measured | target | |\n|---|---|---|---|")
    for name, target in report["targets"].items():
        mark = "met" if target["met"] else "**missed**"
        print(f"| {LABELS.get(name, name)} | {target['measured']:.3f} | ≤ {target['limit']:.3f} | {mark} |")
    training = report["training"]
    print("\n| training step | seconds | saved activations MB | state MB | total MB | trainable |\n|---|---|---|---|---|---|")
    for name, row in training.items():
        print(f"| {name} | {row['step_seconds']:.2f} | {row['saved_activation_bytes'] / 1e6:.0f} | "
              f"{row['state_bytes'] / 1e6:.0f} | {row['total_bytes'] / 1e6:.0f} | {row['trainable_share'] * 100:.2f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
