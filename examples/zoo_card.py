"""Write adapters_zoo/README.md (the model card) from the files the runs produced, so no number is copied by hand.

    python examples/zoo_card.py --zoo adapters_zoo [--section FILE.md ...] [--random FOLDER]

The backbone's description and training curve come from its own ``config.json`` (``m4oe`` block, written by
``m4oe pretrain``; the curve is drawn to ``backbone/loss_curve.png``), the adapter table from ``index.json`` and the
builder's ``build_summary.json``; sections written by hand (readings of runs, with their commands) are appended from
Markdown files; an optional random-weights comparison reads the adapters that ``examples/build_zoo.py --weights
none`` wrote (their metadata holds the test Dice).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def fmt(value, scale=100.0):
    return "n/a" if value is None or not np.isfinite(value) else f"{value * scale:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--random", nargs="*", default=[],
                        help="folders of adapters trained with --weights none (a pretrained-vs-random table)")
    parser.add_argument("--verdict", action="append", default=[], help="a line read off the comparison table")
    parser.add_argument("--note", action="append", default=[], help="a line for the adapters section (repeatable)")
    parser.add_argument("--command", default="", help="how the backbone was made (a sentence, Markdown)")
    parser.add_argument("--section", action="append", default=[],
                        help="a Markdown file appended as it is (routing, few labels, history; repeatable)")
    args = parser.parse_args()
    zoo = Path(args.zoo)
    index = json.loads((zoo / "index.json").read_text())
    config = json.loads((zoo / "backbone" / "config.json").read_text())
    provenance = config["m4oe"]
    curve = provenance.get("loss_curve") or []
    if curve:
        draw_curve(curve, zoo / "backbone" / "loss_curve.png", "SimMIM pretraining of backbone/")
    import safetensors.torch

    parameters = sum(t.numel() for t in safetensors.torch.load_file(str(zoo / "backbone" / "model.safetensors")).values())
    excluded = provenance.get("excluded_entries") or {}
    summary_path = zoo / "build_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    lines = [
        "# adapters_zoo: the reference backbone and its modality adapters",
        "",
        "## Reference backbone (`backbone/`)",
        "",
        f"- Architecture: timm `swin_tiny_patch4_window7_224` with embed_dim 48, depths (2, 2, 6, 2), heads (3, 6, 12, 24), "
        f"window 7: {parameters / 1e6:.1f} M parameters, stored in fp16 "
        f"({(zoo / 'backbone' / 'model.safetensors').stat().st_size / 1e6:.1f} MB), timm hub layout "
        "(`model.safetensors` + `config.json`); fingerprint "
        f"`{index['backbone']['fingerprint'][:12]}`.",
        f"- Method: {provenance['method']}; AdamW, lr {provenance['lr']}, batch {provenance['batch_size']}, "
        f"{provenance['crop_size']}-px random resized crops, seed {provenance['seed']}, 1 CPU thread.",
        f"- Steps: {provenance['steps']}; loss {provenance['first_loss']:.3f} at step 1 → mean "
        f"{provenance['final_loss_mean_last_50']:.3f} over the last 50 steps; {provenance['seconds'] / 60:.0f} min of "
        "step time on one thread of a shared 2-core CPU." + (f" {args.command}" if args.command else ""),
        f"- Data: {provenance['images']} unlabeled images and slices of `../shared/data` (masks unused): "
        + ", ".join(f"{name} {count}" for name, count in sorted(provenance["data"].items())) + ".",
    ]
    if provenance.get("excluded_sites"):
        lines.append(
            "- **Never seen in pretraining** (`excluded_sites` in `config.json`, checked by `tests/test_clean_backbone.py`): "
            + ", ".join(provenance["excluded_sites"]) + f" ({sum(excluded.values())} manifest rows: "
            + ", ".join(f"{name} {count}" for name, count in sorted(excluded.items())) + "). Every site this card "
            "calls unseen is among them.")
    lines += [
        "- Licence notes: the backbone has seen images whose terms restrict redistribution (DRIVE explicitly; PH2 for "
        "research use; several others unstated — see each dataset's SOURCE.md). Treat these weights as research "
        "artefacts of those datasets: check every dataset's terms before publishing them outside this project.",
        "",
        "## Adapters",
        "",
        "Each adapter was trained with `examples/build_zoo.py` following its recipe in `m4oe_adapters/recipes.py` "
        "(stored in its provenance): experts + decoder only, frozen backbone, rank 8, batch 4, seed 0, on the "
        "training site's development images, validated every 100 steps on the held-out validation images of that "
        "site; training stops after 5 validations without a better Dice, at the step cap, or at the recipe's "
        "wall-time budget (45 min, cardiac MRI 60, one thread), and keeps the best validation weights. Scored on "
        "every held-out test image of the training site (in-domain; the dataset's own test split when it has one, "
        "else a seeded 30 %, CVC-ClinicDB by video sequence) and on every image of the unseen site where one exists.",
        "",
        "| adapter | labels | trained on | steps run | val Dice | in-domain test Dice | unseen site | unseen-site Dice "
        "| minutes | MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in index["adapters"]:
        metrics, prov = entry["metrics"], entry["provenance"]
        recipe = prov.get("recipe") or {}
        seconds = summary.get(entry["modality"], {}).get("seconds")
        lines.append(
            f"| `{entry['file']}` | {', '.join(entry['labels'][1:])} | {', '.join(prov.get('sites', []))} "
            f"({prov.get('num_labelled_images')} images, {prov.get('num_validation_images')} validation) "
            f"| {prov.get('steps')} of ≤ {recipe.get('max_steps', '?')} | {fmt(metrics.get('val_dice'))} | "
            f"{fmt(metrics.get('in_domain_test_dice'))} | {', '.join(metrics.get('unseen_sites') or []) or '—'} | "
            f"{fmt(metrics.get('unseen_site_dice'))} | {'?' if seconds is None else round(seconds / 60)} "
            f"| {entry['size_bytes'] / 1e6:.2f} |")
    lines += ["", "Dice in %, mean over test images of the foreground classes (MONAI `DiceMetric`); minutes: training "
              "and evaluation, one thread. `index.json` lists each file's sha256, backbone fingerprint and provenance; "
              "`m4oe zoo verify` checks them. Per-site and per-class reports with 95% intervals: `reports/<adapter>/` "
              "(their overlay PNGs show images of the shared datasets, so they are not committed; "
              "`examples/build_zoo.py` writes them).", ""]
    lines += [f"- {note}" for note in args.note] + ([""] if args.note else [])
    # ---- pretrained vs random: the same recipe on the same architecture with random weights
    from m4oe_adapters.adapter_file import read_header

    pretrained = {e["modality"]: e["metrics"] for e in index["adapters"]}
    random_metrics = {}
    for path in sorted(p for folder in args.random for p in Path(folder).glob("*.safetensors")):
        meta, _ = read_header(path)
        random_metrics[meta["modality"]] = meta["metrics"]
    comparison = [(name, pretrained[name], random_metrics[name]) for name in random_metrics if name in pretrained]
    if comparison:
        lines += ["## Does pretraining help?", "",
                  "Same adapter recipe, data, split and seed; only the backbone weights differ: the SimMIM reference "
                  "backbone vs the same architecture with random weights (`--weights none`). Command: "
                  "`python examples/build_zoo.py --weights none --zoo FOLDER --only NAMES` (here: "
                  + ", ".join(f"`{folder}`" for folder in args.random) + ").", "",
                  "| modality | in-domain Dice: pretrained | random | difference | unseen site | "
                  "unseen-site Dice: pretrained | random | difference |", "|---|---|---|---|---|---|---|---|"]
        for name, ours, theirs in comparison:
            cells = []
            for key in ("in_domain_test_dice", "unseen_site_dice"):
                a, b = ours.get(key), theirs.get(key)
                cells += [fmt(a), fmt(b), "n/a" if a is None or b is None else f"{(a - b) * 100:+.1f}"]
            lines.append(f"| {name} | {' | '.join(cells[:3])} | {', '.join(ours.get('unseen_sites') or []) or '—'} "
                         f"| {' | '.join(cells[3:])} |")
        lines += ["", "One seed: differences of a few points are within the noise (per-site 95% intervals in "
                  "`reports/<adapter>/report.md`).", ""]
        lines += [f"- {verdict}" for verdict in args.verdict] + ([""] if args.verdict else [])
    if curve:
        shown = curve[:: max(1, len(curve) // 10)]
        shown = shown if shown[-1] == curve[-1] else [*shown, curve[-1]]
        lines += ["## Pretraining curve", "", f"Mean masked-L1 loss per window of {curve[1][0] - curve[0][0]} steps, "
                  "from the run that made these weights (`config.json`, `m4oe.loss_curve`).", "",
                  "![loss curve](backbone/loss_curve.png)", "",
                  "| step | " + " | ".join(str(step) for step, _ in shown) + " |", "|---|" + "---|" * len(shown),
                  "| mean loss | " + " | ".join(f"{loss:.3f}" for _, loss in shown) + " |", ""]
    for section in args.section:
        lines += [Path(section).read_text().rstrip("\n"), ""]
    lines += ["---", "", "Written by `examples/zoo_card.sh` (`examples/zoo_card.py`) from `index.json`, the adapters' "
              "metadata, `build_summary.json`, the files in `backbone/` and the sections in `examples/zoo_card/`.", ""]
    (zoo / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def draw_curve(curve: list[list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot([step for step, _ in curve], [loss for _, loss in curve])
    axis.set_xlabel("step")
    axis.set_ylabel("masked L1 (window mean)")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
