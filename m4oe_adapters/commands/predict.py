"""``m4oe predict``: masks for images, volumes or folders, routed to each input's adapter."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (add_backbone_arguments, add_mask_arguments, add_runtime_arguments, add_threads_argument,
                     apply_threads, load_backbone_from_args, runtime_from_args)


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="segment images, volumes or folders with one or more adapters")
    parser.add_argument("inputs", nargs="+", help="image files, NIfTI volumes or folders")
    parser.add_argument("--adapter", action="append", required=True, help="adapter file (repeat to load several; a lora/full/scratch file alone)")
    add_backbone_arguments(parser, required=False)
    parser.add_argument("--modality", default=None,
                        help="modality of every input (default: a DICOM tag naming a loaded adapter, the only loaded "
                             "adapter, else image-level routing)")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="routing: inputs whose best adapter's confidence is below this are reported unknown "
                             "(default: each adapter's stored threshold)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--out", required=True, help="output folder; masks: NIfTI (class ids) for volumes, PNG for "
                        "images: 0/255 for two-class modalities, else a palette PNG whose values are class ids")
    add_mask_arguments(parser)
    parser.add_argument("--overlay", action="store_true", help="also write overlay PNGs")
    parser.add_argument("--slice-axis", type=int, default=None,
                        help="axis along which volumes are segmented slice by slice (default: the coarsest-spacing "
                        "axis in the header, else the shortest axis)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar over files and windows")
    add_threads_argument(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import load_adapter
    from ..errors import ConfigError
    from ..prediction import predict_files

    from ..segmenter_file import SingleModalityModel, load_segmenter

    apply_threads(args)
    device, precision = runtime_from_args(args)
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
    model.eval().to(device)
    results = predict_files(model, args.inputs, args.out, modality=args.modality, overlays=args.overlay,
                            slice_axis=args.slice_axis, min_confidence=args.min_confidence, overwrite=args.overwrite,
                            progress=not args.no_progress, device=device, precision=precision,
                            tta=args.tta, threshold=args.threshold)
    failed = [r for r in results if r.error]
    for result in results:
        if result.error:
            print(f"{'UNKNOWN' if result.unknown else 'SKIPPED'} {result.source}: {result.error}", file=sys.stderr)
        else:
            how = result.chosen_by + ("" if result.confidence is None else f", confidence {result.confidence:.2g}")
            print(f"{result.source} [{result.modality}, {how}] -> {result.output}")
    unknown = sum(result.unknown for result in results)
    print(f"{len(results) - len(failed)} segmented, {unknown} unknown, {len(failed) - unknown} skipped; "
          f"decisions in {Path(args.out) / 'predictions.csv'}")
    return 1 if failed and len(failed) == len(results) else 0
