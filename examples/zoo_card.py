"""Write adapters_zoo/README.md (the model card) from the files the runs produced, so no number is copied by hand.

    python examples/zoo_card.py --zoo adapters_zoo --pretrain-run runs/pretrain_ref \
        --random runs/zoo_random --sitegen-random runs/sitegen_random
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def fmt(value, scale=100.0):
    return "n/a" if value is None or not np.isfinite(value) else f"{value * scale:.1f}"


def experts_all(report: Path) -> dict[str, dict[str, float]]:
    """Per (domain, site) mean Dice of the experts/all-labels rows of a protocol metrics.json."""
    if not report.is_file():
        return {}
    rows = json.loads(report.read_text())["summary"]
    return {f"{r['domain']}:{r['site']}": r["dice"] for r in rows if r.get("mode") == "experts"
            and str(r.get("shots")) == "all"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--pretrain-run", default="runs/pretrain_ref")
    parser.add_argument("--random", default="runs/zoo_random")
    parser.add_argument("--sitegen-random", default="runs/sitegen_random")
    args = parser.parse_args()
    zoo = Path(args.zoo)
    index = json.loads((zoo / "index.json").read_text())
    config = json.loads((zoo / "backbone" / "config.json").read_text())
    provenance = config["m4oe"]
    log = list(csv.DictReader(open(Path(args.pretrain_run) / "log.csv")))
    losses = [float(r["loss"]) for r in log]
    import safetensors.torch

    parameters = sum(t.numel() for t in safetensors.torch.load_file(str(zoo / "backbone" / "model.safetensors")).values())
    lines = [
        "# adapters_zoo: the reference backbone and its modality adapters",
        "",
        "## Reference backbone (`backbone/`)",
        "",
        f"- Architecture: timm `swin_tiny_patch4_window7_224` with embed_dim 48, depths (2, 2, 6, 2), heads (3, 6, 12, 24), "
        f"window 7: {parameters / 1e6:.1f} M parameters, stored in fp16 "
        f"({(zoo / 'backbone' / 'model.safetensors').stat().st_size / 1e6:.1f} MB), timm hub layout "
        "(`model.safetensors` + `config.json`).",
        f"- Method: {provenance['method']}; AdamW, lr {provenance['lr']}, batch {provenance['batch_size']}, "
        f"{provenance['crop_size']}-px random resized crops, seed {provenance['seed']}, 1 CPU thread.",
        f"- Steps: {provenance['steps']} (loss {losses[0]:.3f} at step 1 → mean {np.mean(losses[-50:]):.3f} over the last 50 "
        f"steps), {provenance['seconds'] / 60:.0f} min of wall time on a shared 2-core CPU.",
        f"- Data: {provenance['images']} unlabeled images and slices of `../shared/data` (masks unused): "
        + ", ".join(f"{name} {count}" for name, count in sorted(provenance["data"].items())) + ".",
        "- Command: `examples/pretrain_reference.sh` (see the note on steps below); loss curve `loss_curve.png`.",
        "- Licence notes: the backbone has seen images whose terms restrict redistribution (DRIVE explicitly; PH2 for "
        "research use; several others unstated — see each dataset's SOURCE.md). Treat these weights as research "
        "artefacts of those datasets: check every dataset's terms before publishing them outside this project.",
        "",
        "## Adapters",
        "",
        "Each adapter was trained with `examples/build_zoo.py`: experts + decoder only, frozen backbone, rank 8, 150 "
        "steps of batch 4 at 224 px, seed 0, on the training site's development images (4 held out for validation), "
        "scored on held-out images of the training site (in-domain; the dataset's own test split when it has one, "
        "else a seeded 30 %) and on every image of an unseen site where one exists (at most 8 test images each).",
        "",
        "| adapter | labels | trained on | val Dice | in-domain test Dice | unseen site | unseen-site Dice | MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in index["adapters"]:
        metrics, prov = entry["metrics"], entry["provenance"]
        lines.append(
            f"| `{entry['file']}` | {', '.join(entry['labels'][1:])} | {', '.join(prov.get('sites', []))} "
            f"({prov.get('num_labelled_images')} images) | {fmt(metrics.get('val_dice'))} | "
            f"{fmt(metrics.get('in_domain_test_dice'))} | {', '.join(metrics.get('unseen_sites') or []) or '—'} | "
            f"{fmt(metrics.get('unseen_site_dice'))} | {entry['size_bytes'] / 1e6:.2f} |")
    lines += ["", "Dice in %, mean over test images of the foreground classes (MONAI `DiceMetric`). "
              "`index.json` lists each file's sha256, backbone fingerprint and provenance; `m4oe zoo verify` checks "
              "them. Per-image reports and overlays: `reports/<adapter>/`.", ""]
    # ---- pretrained vs random
    random_summary = {}
    random_file = Path(args.random) / "build_summary.json"
    if random_file.is_file():
        random_summary = json.loads(random_file.read_text())
    built = json.loads((zoo / "build_summary.json").read_text())
    comparison = []
    for name, sitegen in (("fundus", "fundus"), ("xray", "xray")):
        rows = experts_all(Path(f"{args.sitegen_random}_{sitegen}") / "metrics.json")
        if rows and name in built:
            unseen = [v for k, v in rows.items() if k.startswith("out:")]
            inside = [v for k, v in rows.items() if k.startswith("in:")]
            comparison.append((name, built[name], {"in_domain_dice": inside[0] if inside else None,
                                                   "unseen_site_dice": unseen[0] if unseen else None}))
    for name, result in random_summary.items():
        if name in built:
            comparison.append((name, built[name], result))
    if comparison:
        lines += ["## Does pretraining help?", "",
                  "Same adapters, same data, same protocol and seed; only the backbone weights differ: the SimMIM "
                  "reference backbone vs the same architecture with random weights (`--weights none`).", "",
                  "| modality | in-domain Dice, pretrained | in-domain Dice, random | unseen-site Dice, pretrained | "
                  "unseen-site Dice, random |", "|---|---|---|---|---|"]
        for name, pretrained, random_result in comparison:
            lines.append(f"| {name} | {fmt(pretrained['in_domain_dice'])} | {fmt(random_result['in_domain_dice'])} | "
                         f"{fmt(pretrained['unseen_site_dice'])} | {fmt(random_result['unseen_site_dice'])} |")
        lines += ["", "Random-backbone numbers: fundus and X-ray from the `experts`/all-labels rows of "
                  "`examples/site_generalisation.sh none runs/sitegen_random`; the others from "
                  "`python examples/build_zoo.py --weights none --zoo runs/zoo_random --only ...`.", ""]
    (zoo / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
