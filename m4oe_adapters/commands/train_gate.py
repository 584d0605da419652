"""``m4oe train-gate``: train the soft-routing token gate (every adapter's router keys) on the adapters' own images."""
from __future__ import annotations

import argparse

from .common import (add_adapter_set_arguments, adapter_set, add_runtime_arguments, add_threads_argument,
                     runtime_from_args)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-gate",
        help="train the soft-routing gate (router keys) of several adapters together; experts stay as they are",
        description="Train every given adapter's router keys jointly (gate cross-entropy against each image's known "
                    "modality plus the load-balancing loss), on the images each adapter's signature was fitted on, "
                    "within the datasets its provenance names (its training and validation images; no label is "
                    "read). Experts, decoders and signatures are unchanged; the adapters are written again, with "
                    "the trained keys, into --out.",
    )
    add_adapter_set_arguments(parser)
    parser.add_argument("--weights", default=None, help="backbone weights (default: the zoo's)")
    parser.add_argument("--data", default=None, help="manifest CSV or folder holding the adapters' images "
                        "(default: $M4OE_DATA or ../shared/data)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=9, help="images per step, the modalities in turn")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the keys")
    parser.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for the adapters with trained keys")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same names in --out")
    add_threads_argument(parser)
    add_runtime_arguments(parser, precision=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapter_file import load_adapter, model_from_adapter, read_header, save_adapter
    from ..data import read_image, read_manifest
    from ..errors import ConfigError
    from ..gate_training import signature_images, train_gate
    from .data_args import default_data_root

    paths, weights = adapter_set(args)
    if len(paths) < 2:
        raise ConfigError("give at least two adapters (--adapter, repeated, or --zoo)")
    out = Path(args.out)
    targets = [out / path.name for path in paths]
    existing = [target for target in targets if target.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{existing[0]} exists; choose another --out or pass --overwrite")
    if any(target.resolve() == path.resolve() for target, path in zip(targets, paths)):
        raise ConfigError("--out must not be the folder the adapters are read from")
    root = Path(args.data) if args.data else default_data_root()
    samples = read_manifest(root / "manifest.csv" if root.is_dir() else root, nonempty_slices=True)
    model = model_from_adapter(paths[0], weights)
    for path in paths[1:]:
        load_adapter(model, path)
    images, dtypes = {}, {}
    for path in paths:
        metadata, _ = read_header(path)
        name, dtypes[name] = metadata["modality"], metadata["dtype"]
        datasets = set(metadata.get("provenance", {}).get("datasets", []))
        own = signature_images(metadata, [s for s in samples if s.dataset in datasets or not datasets])
        if not own:
            raise ConfigError(f"{path}: none of the images its signature was fitted on is in {root}")
        records = [read_image(s.image, slice_axis=s.slice_axis, slice_index=s.slice_index) for s in own]
        images[name] = [(record.array, record.meta) for record in records]
        print(f"{name}: {len(own)} images")
    device = runtime_from_args(args)[0]
    model.to(device)
    history = train_gate(model, images, steps=args.steps, batch_size=args.batch, lr=args.lr, balance=args.balance,
                         seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    record = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "balance": args.balance, "seed": args.seed,
              "trained_with": sorted(images), "final_gate_loss": round(history[-1]["gate"], 4)}
    model.to("cpu")
    for path, target in zip(paths, targets):
        metadata, _ = read_header(path)
        name = metadata["modality"]
        model.modalities[name].provenance = {**model.modalities[name].provenance, "gate": record}
        save_adapter(model, name, target, dtype=dtypes[name])
        print(f"wrote {target}")
    return 0
