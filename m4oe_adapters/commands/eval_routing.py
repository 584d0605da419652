"""``m4oe eval-routing``: confusion, top-1, false rejection and leave-one-adapter-out unknown detection of
image-level routing on held-out images; optionally Dice of routed vs true-modality segmentation."""
from __future__ import annotations

import argparse
import shlex

from .common import (add_adapter_set_arguments, adapter_set, add_runtime_arguments, add_threads_argument,
                     runtime_from_args)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-routing", help="how well images find their adapter (confusion, unknown detection, Dice)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Route held-out images of a manifest among the given adapters. Each manifest dataset belongs "
                    "to the adapter whose provenance lists it (add more with --map DATASET=MODALITY); datasets no "
                    "adapter claims are 'no adapter' images that should come out unknown. Images a signature "
                    "was fitted on are skipped.",
    )
    add_adapter_set_arguments(parser)
    parser.add_argument("--data", default=None, help="manifest CSV or folder (default: $M4OE_DATA or ../shared/data)")
    parser.add_argument("--map", action="append", default=[], metavar="DATASET=MODALITY",
                        help="the images of DATASET belong to adapter MODALITY (repeat)")
    parser.add_argument("--max-per-dataset", type=int, default=200, help="held-out images scored per dataset")
    parser.add_argument("--synthetic-unknowns", type=int, default=20,
                        help="noise, blank, ramp and checkerboard images added as 'no adapter' images")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="acceptance threshold (default: each adapter's stored one)")
    parser.add_argument("--dice", type=int, default=0, metavar="N",
                        help="also segment N held-out images per adapter routed and with the true modality "
                             "(needs --weights) and compare Dice")
    parser.add_argument("--weights", default=None, help="backbone weights for --dice (default: the zoo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--slice-axis", type=int, default=None,
                        help="axis along which 3D volumes are cut into 2D slices (default: a known dataset's axis, "
                             "else the coarsest-spacing axis in the header, else the shortest axis)")
    add_threads_argument(parser)
    add_runtime_arguments(parser)  # for --dice
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..adapter_file import read_adapter
    from ..data import read_manifest
    from ..errors import ConfigError
    from ..routing_eval import (RoutedImage, check_report_folder, describe_samples, evaluate_routing,
                                synthetic_unknowns, write_routing_report)
    from ..signatures import ImageSignature, looks_like_noise, routing_descriptors
    from .data_args import default_data_root

    check_report_folder(args.out, args.overwrite)
    paths, weights = adapter_set(args)
    if not paths:
        raise ConfigError("give adapters with --adapter or --zoo")
    signatures, expected, files = {}, {}, {}
    for path in paths:
        metadata, tensors = read_adapter(path)
        name = metadata["modality"]
        if "routing" not in metadata:
            raise ConfigError(f"{path}: no routing signature; add one with `m4oe sign`")
        signatures[name] = ImageSignature.from_file(metadata["routing"], tensors)
        files[name] = path
        for dataset in metadata.get("provenance", {}).get("datasets", []):
            expected[dataset] = name
    for item in args.map:
        dataset, _, name = item.partition("=")
        if name not in signatures:
            raise ConfigError(f"--map {item}: no loaded adapter {name!r} (loaded: {', '.join(signatures)})")
        expected[dataset] = name
    root = Path(args.data) if args.data else default_data_root()
    samples = read_manifest(root / "manifest.csv" if root.is_dir() else root, nonempty_slices=True,
                            slice_axis=args.slice_axis)
    images = describe_samples(samples, expected, signatures, args.max_per_dataset, args.seed,
                              progress=not args.no_progress)
    for source, array in synthetic_unknowns(args.synthetic_unknowns, args.seed):
        images.append(RoutedImage(source, "synthetic", None, routing_descriptors([array])[0],
                                  noise=looks_like_noise(array)))
    report = evaluate_routing(signatures, images, args.min_confidence)
    if args.dice:
        from ..routing_eval import routed_dice

        device, precision = runtime_from_args(args)
        report["dice"] = routed_dice(files, weights, samples, expected, signatures, args.dice, args.seed,
                                     args.min_confidence, progress=not args.no_progress, device=device,
                                     precision=precision)
    command = "m4oe " + shlex.join(getattr(args, "argv", []))
    for path in write_routing_report(report, args.out, command):
        print(f"wrote {path}")
    print(f"top-1 {report['top1_accuracy']:.3f}, false rejection {report['false_rejection_rate']:.3f}, "
          f"leave-one-out unknown {report['leave_one_out_unknown_rate']:.3f} on {report['known_images']} images")
    if "dice" in report:
        dice = report["dice"]
        print(f"Dice: hard routed {dice['routed_mean']:.4f}, hard true modality {dice['true_mean']:.4f}, soft gate "
              f"(true decoder) {dice['soft_mean']:.4f} on {dice['images']} images")
    return 0
