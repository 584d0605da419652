"""Print the compact site-generalisation table (Dice % in-domain / unseen site, per mode and shots) of a
`m4oe eval --train-sites ... --test-sites ...` report, for the README.

    python examples/sitegen_table.py runs/sitegen_random_fundus/metrics.json
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    summary = json.loads(open(path).read())["summary"]
    modes = list(dict.fromkeys(row["mode"] for row in summary))
    shots = list(dict.fromkeys(str(row["shots"]) for row in summary))
    print("| mode | " + " | ".join(f"{s} labels: in-domain | {s} labels: unseen site" for s in shots) + " |")
    print("|---|" + "---|---|" * len(shots))
    for mode in modes:
        cells = []
        for shot in shots:
            for domain in ("in", "out"):
                row = next(r for r in summary if r["mode"] == mode and str(r["shots"]) == shot and r["domain"] == domain)
                cells.append(f"{row['dice'] * 100:.1f} ({row['dice_low'] * 100:.0f}–{row['dice_high'] * 100:.0f})")
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
