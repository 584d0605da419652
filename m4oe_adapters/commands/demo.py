"""``m4oe demo``: segment while swapping adapters, adapt to a new site from a few labels, a Dice table."""
from __future__ import annotations

import argparse

from .common import add_threads_argument, add_runtime_arguments, runtime_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the three jobs on the reference backbone and the zoo adapters")
    parser.add_argument("--data", default=None, help="data folder with manifest.csv (default: ../shared/data if "
                        "present, else synthetic images)")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: adapters_zoo/)")
    parser.add_argument("--out", default="m4oe_demo", help="output folder (report.md and overlay PNGs)")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser, precision=False)
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    device, _ = runtime_from_args(args)
    run_demo(args.out, data=args.data, zoo=args.zoo, shots=args.shots, steps=args.steps, seed=args.seed,
             device=str(device))
    print(f"report: {args.out}/report.md")
    return 0
