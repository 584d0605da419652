"""``m4oe sign``: fit an adapter's routing signature on the images it was made for, experts untouched."""
from __future__ import annotations

import argparse

from .common import add_threads_argument

from .data_args import add_data_arguments, comma_list, select_samples


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sign", help="give an adapter a routing signature fitted on its training images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fit the image signature that lets routing recognise this adapter's images (predict, serve, "
                    "model(images) without a modality). Use the adapter's own training images, plus unlabelled "
                    "images of each new site it should serve (a signature of one site loses that site's look-alikes "
                    "to broader neighbours), never the images you will test on. Experts, decoder and backbone "
                    "binding are copied unchanged.",
    )
    parser.add_argument("adapter", help="adapter file")
    add_data_arguments(parser, masks=False)
    parser.add_argument("--modality", default=None, help="manifest modality column to select (default: any)")
    parser.add_argument("--sites", default=None, help="comma-separated sites to select (default: any)")
    parser.add_argument("--datasets", default=None, help="comma-separated manifest datasets to select (default: any)")
    parser.add_argument("-o", "--output", required=True, help="signed adapter file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (may be ADAPTER)")
    parser.add_argument("--views", type=int, default=8, help="augmented views per image")
    parser.add_argument("--min-confidence", type=float, default=1e-3, help="stored acceptance threshold")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import sign_adapter
    from ..signatures import signature_from_samples

    from ..errors import DataError

    samples = select_samples(args, args.modality, comma_list(args.sites))
    datasets = comma_list(args.datasets)
    if datasets:
        samples = [sample for sample in samples if sample.dataset in datasets]
    if not samples:
        raise DataError(f"no images in datasets {datasets}; check --datasets against the manifest")
    signature = signature_from_samples(samples, views=args.views, seed=args.seed, min_confidence=args.min_confidence)
    path = sign_adapter(args.adapter, signature, args.output, overwrite=args.overwrite)
    print(f"{path}: routing signature from {signature.images} images ({signature.views} views each)")
    return 0
