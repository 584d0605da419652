"""``m4oe eval``: score adapters (Dice, HD95 per image/class/site), or run the site-generalisation protocol."""
from __future__ import annotations

import argparse

from .common import (add_backbone_arguments, add_mask_arguments, add_runtime_arguments, add_threads_argument,
                     apply_threads, load_backbone_from_args, runtime_from_args)
from .data_args import add_data_arguments, comma_list, select_samples


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an adapter, or train+test every mode across sites (--train-sites A --test-sites B,C)",
    )
    add_backbone_arguments(parser, required=False)
    add_data_arguments(parser)
    parser.add_argument("--modality", required=True)
    parser.add_argument("--adapter", default=None, help="file written by m4oe train (any --mode) to evaluate (without --train-sites)")
    parser.add_argument("--sites", default=None, help="sites to evaluate the adapter on (default: all)")
    parser.add_argument("--train-sites", default=None, help="protocol: comma-separated training sites")
    parser.add_argument("--test-sites", default=None, help="protocol: comma-separated unseen test sites")
    parser.add_argument("--modes", default="experts", help="protocol: comma-separated modes "
                        "(experts, decoder, lora, full, scratch)")
    parser.add_argument("--shots", default="all", help="protocol: comma-separated labelled-image counts or 'all'")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize", choices=["crop", "resize"], default="crop")
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-test-images", type=int, default=None)
    parser.add_argument("--scale", choices=["auto", "off"], default="auto",
                        help="auto: resample each image to the scale the adapter recorded (field-of-view diameter, "
                             "pixel spacing) and the mask back; off: predict at the image's own pixel size")
    parser.add_argument("--adapter-scale", default=None,
                        help="KIND:VALUE for an adapter that recorded no scale, e.g. fov_diameter_px:540 "
                             "(measured on its training images)")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="the images' pixel size, in the unit the adapter's scale uses (overrides headers)")
    add_mask_arguments(parser)
    parser.add_argument("--save-adapters", default=None, help="protocol: folder for the trained adapters")
    parser.add_argument("--labels", default=None, help="comma-separated class names, background first, for the "
                        "report (default: the adapter's names; protocol: the dataset's known names, else class_<k>)")
    parser.add_argument("--out", required=True, help="report folder (report.md, metrics.csv/json, PNGs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (images, windows, steps)")
    add_threads_argument(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..evaluation import write_outputs

    apply_threads(args)
    check_flags(args)
    if args.train_sites:
        rows, skipped, title, notes = run_protocol_from_args(args)
    elif args.adapter:
        rows, skipped, title, notes = evaluate_adapter_from_args(args)
    else:
        raise ConfigError("give --adapter FILE to evaluate, or --train-sites/--test-sites to run the protocol")
    outputs = write_outputs(args.out, rows, skipped, title, notes)
    print((outputs["report"]).read_text())
    print(f"wrote {', '.join(str(p) for p in outputs.values())}")
    return 0


# Flags of one of eval's two jobs, refused in the other rather than silently ignored.
PROTOCOL_FLAGS = ("--test-sites", "--modes", "--shots", "--steps", "--batch", "--lr", "--rank", "--size", "--resize",
                  "--val", "--seed", "--save-adapters")
ADAPTER_FLAGS = ("--adapter-scale", "--tta", "--threshold")
LOW_RANK_MODES = ("experts", "decoder", "lora")


def given(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag`` was on the command line (not just its default)."""
    return any(token == flag or token.startswith(flag + "=") for token in getattr(args, "argv", ()))


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do nothing in the job asked for (evaluate one adapter, or run the protocol)."""
    from ..errors import ConfigError

    if args.train_sites and args.adapter:
        raise ConfigError("--adapter evaluates a trained file and --train-sites runs the protocol (which trains its "
                          "own): give one of them")
    if args.train_sites:
        wrong = [flag for flag in ADAPTER_FLAGS if given(args, flag)]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} applies only when evaluating an --adapter, not to the protocol "
                              "(--train-sites); drop it")
        modes = comma_list(args.modes)
        if given(args, "--rank") and not set(modes) & set(LOW_RANK_MODES):
            raise ConfigError(f"--rank does not apply to --modes {args.modes} (only to {', '.join(LOW_RANK_MODES)}); "
                              "drop it")
    elif args.adapter:
        wrong = [flag for flag in PROTOCOL_FLAGS if given(args, flag)]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to the protocol "
                              "(--train-sites/--test-sites); an --adapter is evaluated as it was trained: drop "
                              f"{'it' if len(wrong) == 1 else 'them'}")


def backbone_note(backbone) -> str:
    return backbone.summary_line()


def evaluate_adapter_from_args(args):
    from ..errors import ConfigError
    from ..evaluation import evaluate_samples
    from ..inference import flip_averaged
    from ..runtime import device_predictor
    from ..segmenter_file import load_segmenter
    from ..scale import parse_scale

    device, precision = runtime_from_args(args)
    backbone = load_backbone_from_args(args) if args.backbone else None
    loaded = load_segmenter(args.adapter, args.weights, backbone=backbone)
    loaded.segmenter.eval().to(device)
    info = loaded.info
    if loaded.model is not None and args.modality in loaded.model.modalities:
        info = loaded.model.modalities[args.modality]
    label_names = comma_list(args.labels) or info.label_names
    if len(label_names) != info.num_classes:
        raise ConfigError(f"--labels names {len(label_names)} classes, the adapter {args.adapter} has "
                          f"{info.num_classes} ({', '.join(info.label_names)})")
    if args.threshold is not None and info.num_classes != 2:
        raise ConfigError(f"--threshold applies to two-class adapters; {args.adapter} has {info.num_classes} classes "
                          f"({', '.join(info.label_names)}): drop it")
    samples = select_samples(args, args.modality, comma_list(args.sites))
    scale = None
    if args.scale == "auto":
        scale = parse_scale(args.adapter_scale) if args.adapter_scale else info.provenance.get("scale")
    rows, skipped = evaluate_samples(
        flip_averaged(device_predictor(loaded, device, precision), args.tta), samples, preset=info.preset,
        in_chans=loaded.in_chans, num_classes=info.num_classes, label_names=label_names, input_size=info.input_size,
        resize_mode=info.provenance.get("resize_mode", "crop"), extra={"mode": loaded.mode},
        keep_predictions=True, progress=not args.no_progress, volumes=True, scale=scale, pixel_size=args.pixel_size,
        threshold=args.threshold,
    )
    notes = [f"adapter {args.adapter} ({info.name}, {loaded.mode} mode, trained on sites "
             f"{info.provenance.get('sites')})", loaded.backbone_note, scale_note(scale)]
    if args.threshold is not None:
        chosen = ("Otsu's threshold of each image's probabilities" if args.threshold == "otsu"
                  else f"{args.threshold:g}")
        notes.append(f"foreground where its probability exceeds {chosen} (--threshold), not the argmax")
    if args.tta != "none":
        notes.append(f"test-time augmentation {args.tta}: logits averaged over the image and its mirrored views")
    return rows, skipped, f"Evaluation of {args.adapter}", notes


def scale_note(scale) -> str:
    if not scale:
        return "scale harmonisation off (no recorded scale, or --scale off): images predicted at their own pixel size"
    return (f"scale harmonisation: each image resampled to the adapter's {scale['kind']} = {scale['value']:.4g} "
            "(column scale_factor), the mask back to its grid")


def run_protocol_from_args(args):
    from ..config import ExpertConfig
    from ..protocol import run_protocol
    from ..training import TrainConfig

    device, precision = runtime_from_args(args)
    train_sites = comma_list(args.train_sites)
    test_sites = comma_list(args.test_sites) or []
    samples = select_samples(args, args.modality, train_sites + test_sites)
    shots = [None if s == "all" else int(s) for s in comma_list(args.shots)]
    modes = comma_list(args.modes)
    probe = load_backbone_from_args(args) if "scratch" not in modes or len(modes) > 1 else None
    rows, skipped = run_protocol(
        lambda: load_backbone_from_args(args), samples, args.modality, train_sites=train_sites,
        test_sites=test_sites, modes=modes, shots=shots,
        train_config=TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                 val_every=max(1, args.steps // 6), precision=precision, device=str(device)),
        in_chans=probe.in_chans if probe else (args.in_chans or 3), size=(args.size, args.size),
        resize_mode=args.resize, val_count=args.val, expert_config=ExpertConfig(rank=args.rank),
        max_test_images=args.max_test_images, save_dir=args.save_adapters, progress=not args.no_progress,
        label_names=comma_list(args.labels),
    )
    counts = sorted({(str(row["mode"]), str(row["shots"]), row["train_images"], row["val_images"]) for row in rows})
    notes = [
        f"modality {args.modality}; trained on {', '.join(train_sites)}; unseen sites {', '.join(test_sites)}",
        f"modes {', '.join(modes)}; shots {args.shots}; {args.steps} steps, batch {args.batch}, lr {args.lr}, "
        f"size {args.size} ({args.resize}), seed {args.seed}",
        backbone_note(probe) if probe else "scratch U-Net only",
        "training images (validation images) per run: "
        + "; ".join(f"{mode} {shots} shots: {train} ({val})" for mode, shots, train, val in counts),
        "command: m4oe " + " ".join(args.argv),
    ]
    return rows, skipped, f"Site generalisation: {args.modality}", notes
