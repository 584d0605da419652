"""``m4oe predict``: masks for images, volumes or folders, routed to each input's adapter."""
from __future__ import annotations

import argparse
import sys

from .common import add_backbone_arguments, add_threads_argument, apply_threads, load_backbone_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="segment images, volumes or folders with one or more adapters")
    parser.add_argument("inputs", nargs="+", help="image files, NIfTI volumes or folders")
    parser.add_argument("--adapter", action="append", required=True, help="adapter file (repeat to load several; a lora/full/scratch file alone)")
    add_backbone_arguments(parser, required=False)
    parser.add_argument("--modality", default=None,
                        help="modality of every input (default: DICOM tag or the only loaded adapter)")
    parser.add_argument("--out", required=True, help="output folder; masks: NIfTI (class ids) for volumes, PNG for "
                        "images: 0/255 for two-class modalities, else a palette PNG whose values are class ids")
    parser.add_argument("--overlay", action="store_true", help="also write overlay PNGs")
    parser.add_argument("--slice-axis", type=int, default=None,
                        help="axis along which volumes are segmented slice by slice (default: the coarsest-spacing "
                        "axis in the header, else the shortest axis)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar over files and windows")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import load_adapter
    from ..errors import ConfigError
    from ..prediction import predict_files

    from ..segmenter_file import SingleModalityModel, load_segmenter

    apply_threads(args)
    first, *rest = args.adapter
    backbone = load_backbone_from_args(args) if args.backbone else None
    loaded = load_segmenter(first, args.weights, backbone=backbone)
    if loaded.model is None:  # a baseline (lora/full/scratch) file: one model for one modality
        if rest:
            raise ConfigError(f"{first}: a {loaded.mode}-mode file cannot share a backbone with other adapters; "
                              "predict with it alone")
        model = SingleModalityModel(loaded)
    else:
        model = loaded.model
    for path in rest:
        load_adapter(model, path)
    results = predict_files(model, args.inputs, args.out, modality=args.modality, overlays=args.overlay,
                            slice_axis=args.slice_axis, progress=not args.no_progress)
    failed = [r for r in results if r.error]
    for result in results:
        if result.error:
            print(f"SKIPPED {result.source}: {result.error}", file=sys.stderr)
        else:
            print(f"{result.source} [{result.modality}] -> {result.output}")
    print(f"{len(results) - len(failed)} segmented, {len(failed)} skipped")
    return 1 if failed and len(failed) == len(results) else 0
