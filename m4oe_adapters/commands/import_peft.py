"""``m4oe import-peft FOLDER -o OUT``: a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) as
an m4oe adapter file, so ``inspect``, ``eval --adapter``, ``predict`` and ``train --init`` can use it.

PEFT folders hold backbone LoRA weights only: the adapter gets them as its experts and a fresh (untrained) decoder
and head, recorded as such in its provenance. Train the decoder before trusting its masks:
``m4oe train --init OUT --mode decoder ...``.
"""
from __future__ import annotations

import argparse

from .common import add_backbone_arguments, load_backbone_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-peft", help="turn a PEFT LoRA folder into an m4oe adapter file (experts + an untrained decoder)"
    )
    parser.add_argument("folder", help="PEFT folder: adapter_config.json + adapter_model.safetensors")
    parser.add_argument("--output", "-o", required=True, help="adapter file (.safetensors) to write")
    parser.add_argument("--modality", required=True, help="modality name of the new adapter")
    add_backbone_arguments(parser)
    parser.add_argument("--classes", type=int, default=None, help="class count of the decoder (default: 2, or "
                        "the number of --labels)")
    parser.add_argument("--labels", default=None, help="comma-separated class names, background first")
    parser.add_argument("--rank", type=int, default=None, help="expert rank (default: the PEFT folder's r)")
    parser.add_argument("--size", type=int, default=224, help="input size the adapter records (multiple of 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapter_file import save_adapter
    from ..config import ExpertConfig
    from ..errors import ConfigError
    from ..model import SegmentationModel
    from ..peft_interop import import_peft, read_peft_folder
    from ..presets import default_preset
    from .data_args import comma_list

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it")
    config, _ = read_peft_folder(args.folder)
    rank = args.rank or int(config.get("r") or 8)
    labels = comma_list(args.labels)
    classes = args.classes or (len(labels) if labels else 2)
    backbone = load_backbone_from_args(args)
    model = SegmentationModel(backbone, ExpertConfig(rank=rank, alpha=float(rank)))
    model.add_modality(args.modality, classes, labels, preset=default_preset(args.modality),
                       input_size=(args.size, args.size))
    import_peft(model, args.folder, args.modality, num_classes=classes, label_names=labels)
    info = model.modalities[args.modality]
    info.provenance = {"mode": "experts", "imported_from_peft": Path(args.folder).name,
                       "peft_rank": int(config.get("r") or 0), "decoder": "untrained (fresh)",
                       "train_size": [args.size, args.size], "resize_mode": "crop"}
    path = save_adapter(model, args.modality, output)
    print(f"wrote {path}: PEFT LoRA of {args.folder} as the experts of {args.modality!r} (rank {rank}); the decoder "
          f"is untrained: train it with m4oe train --init {path} --mode decoder before using its masks")
    return 0
