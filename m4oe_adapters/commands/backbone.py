"""``m4oe backbone check WEIGHTS``: load a checkpoint as a frozen backbone and report what it is.

Prints the family and architecture, the source file, how many backbone tensors came from it (``loaded, N/N``),
what was unwrapped or transformed on the way, and the fingerprint adapters will record; or the typed refusal
(exit code 2) naming the cause and the fix. Nothing is trained or written.
"""
from __future__ import annotations

import argparse
import json

from .common import add_runtime_arguments, add_threads_argument, json_mapping, runtime_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("backbone", help="check a backbone checkpoint (what it is, whether it loads)")
    actions = parser.add_subparsers(dest="backbone_action", metavar="ACTION")
    check = actions.add_parser("check", help="load WEIGHTS as a backbone and print the load report")
    check.add_argument("weights", help="checkpoint file or folder")
    check.add_argument(
        "--backbone", default=None,
        help="FAMILY:NAME (default: from the folder's config.json); needed for single files",
    )
    check.add_argument("--in-chans", type=int, default=None, help="input channels (default: the checkpoint's)")
    check.add_argument("--img-size", type=int, default=224, help="size of the test forward pass in pixels")
    check.add_argument("--model-args", type=json_mapping, default=None, help="architecture arguments as JSON")
    check.add_argument("--no-forward", action="store_true", help="skip the test forward pass")
    check.add_argument("--json", action="store_true", help="print one JSON document")
    add_runtime_arguments(check, precision=False)
    add_threads_argument(check)
    check.set_defaults(func=run_check)
    parser.set_defaults(func=lambda args: parser.print_help() or 1)


def format_report(report: dict) -> str:
    arch = report["architecture"]
    load = report.get("load") or {}
    lines = [
        f"backbone        {report['spec']} ({'pretrained' if report['pretrained'] else 'RANDOM weights'})",
        f"architecture    {', '.join(f'{key} {value}' for key, value in arch.items())}",
        f"input           {report['in_chans']} channel(s); maps {report['feature_channels']} channels at strides "
        f"{report['feature_strides']}",
        f"source          {report['source']}",
        f"load            {report['summary']}",
    ]
    for item in load.get("transformed", []):
        lines.append(f"  transformed   {item}")
    if load.get("ignored"):
        shown = ", ".join(load["ignored"][:6]) + (" ..." if len(load["ignored"]) > 6 else "")
        lines.append(f"  ignored       {len(load['ignored'])} file tensors not in the backbone: {shown}")
    if load.get("ignored_entries"):
        lines.append(f"  not weights   {', '.join(load['ignored_entries'][:10])}")
    lines.append(f"parameters      {report['parameters']:,}")
    lines.append(f"fingerprint     {report['fingerprint']}")
    lines.append(f"load time       {report['load_seconds']} s")
    if "feature_shapes" in report:
        lines.append(f"test forward    {report['feature_shapes']} at {report['img_size']} px")
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    from ..backbones import check_backbone

    report = check_backbone(
        args.weights, args.backbone, in_chans=args.in_chans, img_size=args.img_size, model_args=args.model_args,
        forward=not args.no_forward, device=str(runtime_from_args(args)[0]),
    )
    report["img_size"] = args.img_size
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
