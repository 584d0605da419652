"""``m4oe predict``: masks for images, volumes or folders, routed to each input's adapter."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_backbone_arguments, load_backbone_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="segment images, volumes or folders with one or more adapters")
    parser.add_argument("inputs", nargs="+", help="image files, NIfTI volumes or folders")
    parser.add_argument("--adapter", action="append", required=True, help="adapter file (repeat to load several)")
    add_backbone_arguments(parser, required=False)
    parser.add_argument("--modality", default=None,
                        help="modality of every input (default: a DICOM tag naming a loaded adapter, the only loaded "
                             "adapter, else image-level routing)")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="routing: inputs whose best adapter's confidence is below this are reported unknown "
                             "(default: each adapter's stored threshold)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overlay", action="store_true", help="also write overlay PNGs")
    parser.add_argument("--slice-axis", type=int, default=2, help="axis along which volumes are sliced")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import load_adapter, model_from_adapter
    from ..prediction import predict_files

    first, *rest = args.adapter
    backbone = load_backbone_from_args(args) if args.backbone else None
    model = model_from_adapter(first, args.weights, backbone=backbone)
    for path in rest:
        load_adapter(model, path)
    results = predict_files(model, args.inputs, args.out, modality=args.modality, overlays=args.overlay,
                            slice_axis=args.slice_axis, min_confidence=args.min_confidence, overwrite=args.overwrite)
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
