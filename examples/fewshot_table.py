"""Table and plot of a few-label sweep (examples/fewshot_sweep.py, and the training-free ``threshold`` rows of
examples/fewshot_threshold.py): mean ± sd over seeds per (mode, k), a 95 % interval of that mean (t distribution over
the seeds), and Dice against k per mode.

    python examples/fewshot_table.py runs/fewshot_fundus [--png docs/fewshot_fundus.png]
    python examples/fewshot_table.py runs/fewshot_endoscopy --title "CVC-ClinicDB → Kvasir-SEG" --png docs/...
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78}  # two-sided 95 % t quantiles by degrees of freedom


def summarise(rows):
    groups = defaultdict(list)
    for row in rows:
        groups[(row["mode"], row["k"])].append(float(row["dice"]))
    table = {}
    for key, values in groups.items():
        values = np.asarray(values)
        mean, sd = values.mean(), values.std(ddof=1) if len(values) > 1 else float("nan")
        half = T95.get(len(values) - 1, 2.0) * sd / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        table[key] = (mean, sd, half, len(values))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--png", default=None)
    parser.add_argument("--title", default="DRIVE → CHASE_DB1, labelled images of the new site")
    args = parser.parse_args()
    rows = list(csv.DictReader(open(Path(args.folder) / "results.csv")))
    table = summarise(rows)
    ks = sorted({k for _, k in table if k != "0"}, key=lambda k: (k == "all", int(k) if k != "all" else 0))
    modes = [m for m in ("experts", "full", "lora", "scratch", "threshold") if any((m, k) in table for k in ks)]
    print("| mode | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    if ("zero-shot", "0") in table:
        mean = table[("zero-shot", "0")][0]
        print(f"| zero-shot (source adapter, k = 0) | {mean * 100:.1f} (one run) |" + " |" * (len(ks) - 1))
    for mode in modes:
        cells = []
        for k in ks:
            if (mode, k) not in table:
                cells.append("not run")
                continue
            mean, sd, half, n = table[(mode, k)]
            cells.append(f"{mean * 100:.1f} ± {sd * 100:.1f} (95 % CI {100 * (mean - half):.1f}–{100 * (mean + half):.1f}, "
                         f"{n} seeds)" if n > 1 else f"{mean * 100:.1f} (1 seed)")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print()
    print("Paired by seed (each seed draws the same k images for every mode): experts minus the other mode.")
    print()
    print("| k | " + " | ".join(f"experts − {m}" for m in modes if m != "experts") + " |")
    print("|---|" + "---|" * (len(modes) - 1))
    by_run = {(r["mode"], r["k"], r["seed"]): float(r["dice"]) for r in rows}
    for k in ks:
        cells = []
        for mode in modes:
            if mode == "experts":
                continue
            seeds = sorted({seed for (m, kk, seed) in by_run if m == "experts" and kk == k}
                           & {seed for (m, kk, seed) in by_run if m == mode and kk == k})
            diffs = np.asarray([by_run[("experts", k, seed)] - by_run[(mode, k, seed)] for seed in seeds]) * 100
            if len(diffs) < 2:
                cells.append("n/a")
                continue
            half = T95.get(len(diffs) - 1, 2.0) * diffs.std(ddof=1) / np.sqrt(len(diffs))
            cells.append(f"{diffs.mean():+.1f} (95 % CI {diffs.mean() - half:+.1f} to {diffs.mean() + half:+.1f})")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.4))
        positions = {k: index + 1 for index, k in enumerate(ks)}
        for offset, mode in zip(np.linspace(-0.15, 0.15, len(modes)), modes):
            present = [k for k in ks if (mode, k) in table]
            means = [table[(mode, k)][0] * 100 for k in present]
            errors = [0 if np.isnan(table[(mode, k)][2]) else table[(mode, k)][2] * 100 for k in present]
            axis.errorbar([positions[k] + offset for k in present], means, yerr=errors, marker="o", capsize=3,
                          label=mode)
        if ("zero-shot", "0") in table:
            axis.axhline(table[("zero-shot", "0")][0] * 100, color="grey", linestyle="--", label="zero-shot")
        axis.set_xticks(list(positions.values()), [f"k={k}" for k in ks])
        test_images = rows[0]["test_images"]
        axis.set_ylabel(f"Dice on {test_images} held-out images (%)")
        axis.set_title(args.title)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
