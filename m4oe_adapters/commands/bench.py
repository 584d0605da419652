"""``m4oe bench``: measured speed, memory and size against PEFT LoRA and full fine-tuning."""
from __future__ import annotations

import argparse

from .common import add_threads_argument, add_runtime_arguments, json_mapping, runtime_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time and memory of experts vs PEFT LoRA vs full fine-tuning")
    parser.add_argument("--backbone", default="timm:swin_tiny_patch4_window7_224")
    parser.add_argument("--weights", default="none",
                        help="checkpoint, or 'none' (random weights; speed, memory and size do not depend on them)")
    parser.add_argument("--model-args", type=json_mapping, default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", default="1,4,8",
                        help="comma-separated numbers K of loaded experts for the hard-routed training step")
    parser.add_argument("--repeats", type=int, default=3,
                        help="round-robin repeats per comparison (medians); lower it if training steps are slow")
    parser.add_argument("--quick", action="store_true", help="a tiny model in seconds (for tests)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the hard-routed model under torch.compile (inductor) and count recompilations "
                             "on modality switches (compiling takes minutes on a CPU)")
    parser.add_argument("--skip-training", action="store_true",
                        help="measure inference, routing, switching, loading and sizes only (the training steps take "
                             "most of the run); the ratios that need training steps are left out")
    add_runtime_arguments(parser, precision=False)
    parser.add_argument("--out", default="bench.json", help="JSON report")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import format_report, run_benchmark, write_json
    from ..errors import ConfigError

    try:
        experts = tuple(int(k) for k in args.experts.split(","))
    except ValueError:
        raise ConfigError(f"--experts must be comma-separated integers such as 1,4,8, got {args.experts!r}") from None
    if args.repeats < 1 or min(experts) < 1:
        raise ConfigError("--repeats and every --experts value must be at least 1")
    report = run_benchmark(
        backbone=args.backbone, weights=None if args.weights == "none" else args.weights,
        model_args=args.model_args, img_size=args.img_size, batch=args.batch, rank=args.rank,
        experts=experts, repeats=args.repeats, quick=args.quick, compile=args.compile,
        device=str(runtime_from_args(args)[0]), training=not args.skip_training,
    )
    report["command"] = "m4oe " + " ".join(args.argv)
    print(format_report(report))
    print(f"wrote {write_json(report, args.out)}")
    return 0
