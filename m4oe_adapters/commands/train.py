"""``m4oe train``: fit one modality's adapter (or a baseline) on a frozen backbone from labelled images."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import (add_backbone_arguments, add_runtime_arguments, add_threads_argument, apply_threads,
                     backbone_from_init_adapter, load_backbone_from_args, runtime_from_args)
from .data_args import add_data_arguments, comma_list, select_samples


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one modality's adapter (or a baseline) on a frozen backbone")
    add_backbone_arguments(parser, required=False)  # required unless --init names a backbone the zoo holds
    add_data_arguments(parser)
    parser.add_argument("--modality", required=True, help="modality name (also selects manifest rows)")
    parser.add_argument("--sites", default=None, help="comma-separated training sites (default: all)")
    parser.add_argument("--shots", type=int, default=None, help="use only N labelled images (few-label new site)")
    parser.add_argument("--val", type=int, default=None,
                        help="validation images for early stopping, never taken from the --shots images "
                             "(default: 0 with --shots, so all k labels train; 4 held out without --shots)")
    parser.add_argument("--val-from-shots", type=int, default=None, metavar="FOLDS",
                        help="choose the step count by FOLDS-fold cross-validation over the training images, then "
                             "train on all of them (FOLDS + 1 trainings; no image is spent on validation)")
    parser.add_argument("--init", default=None,
                        help="start from this adapter file (adapt a known modality; experts/decoder modes); its "
                        "recipe (size, resize mode, preset, rank, alpha, targets) applies unless a flag overrides it")
    parser.add_argument("--mode", default="experts", choices=["experts", "decoder", "lora", "full", "scratch"],
                        help="what is trained; every mode writes a file that eval --adapter, predict and inspect read")
    parser.add_argument("--rank", type=int, default=None,
                        help=f"LoRA rank (default {DEFAULT_RANK}, or the --init adapter's; experts/decoder/lora)")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"LoRA alpha, scale alpha/rank (default {DEFAULT_ALPHA}, or the --init adapter's)")
    parser.add_argument("--targets", default=None,
                        help="regex of the linears that get experts (default: the backbone's attention and MLP "
                        "linears, or the --init adapter's)")
    parser.add_argument("--size", type=int, default=None,
                        help="training input size, multiple of 32 (default 224, or the --init adapter's)")
    parser.add_argument("--resize", choices=["crop", "resize"], default=None,
                        help="crop: native-resolution crops (predict with sliding windows); resize: whole image "
                        "(default crop, or the --init adapter's)")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="the training images' pixel size (e.g. mm), recorded in the adapter; predict/eval then "
                             "resample inputs of another pixel size to it (default: measured where possible: fundus "
                             "field of view, CT/MRI header spacing)")
    parser.add_argument("--classes", type=int, default=None, help="class count (default: from the masks)")
    parser.add_argument("--labels", default=None, help="comma-separated class names, background first")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=None, help="early stopping: validations without gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    parser.add_argument("--out-dir", default=None, help="folder for checkpoint.pt and log.csv")
    parser.add_argument("--output", "-o", required=True, help="adapter file (.safetensors) to write")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute backbone blocks during backward: less memory, about one more forward pass")
    parser.add_argument("--augment", choices=["basic", "site"], default="basic",
                        help="basic: flips, rotations, intensity jitter; site: also colour cast, gamma, blur, noise "
                             "and zoom 0.7-1.4 (what differs between hospitals and devices)")
    parser.add_argument("--prefetch", type=int, default=0,
                        help="batches read and augmented ahead in a background thread while a step runs (same batches; "
                             "helps on a GPU or with large images; 0: read each batch when needed)")
    add_threads_argument(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


DEFAULT_RANK, DEFAULT_ALPHA = 8, 16.0
# Flags that only mean something for some modes: refused elsewhere rather than silently ignored.
MODE_FLAGS = {
    "--init": ("init", ("experts", "decoder")),
    "--rank": ("rank", ("experts", "decoder", "lora")),
    "--alpha": ("alpha", ("experts", "decoder", "lora")),
    "--targets": ("targets", ("experts", "decoder", "lora")),
}


def check_mode_flags(args: argparse.Namespace) -> None:
    if args.prefetch < 0:
        raise ConfigError(f"--prefetch must be 0 or more, got {args.prefetch}")
    for flag, (dest, modes) in MODE_FLAGS.items():
        if getattr(args, dest) is not None and args.mode not in modes:
            raise ConfigError(f"{flag} does not apply to --mode {args.mode} (only to {', '.join(modes)}); drop it")


def run(args: argparse.Namespace) -> int:
    from ..adapt import fit_modality, inherit_recipe
    from ..config import ExpertConfig
    from ..training import TrainConfig, distributed_context

    check_mode_flags(args)
    apply_threads(args)
    device, precision = runtime_from_args(args)
    if args.mode != "scratch":  # a U-Net from scratch needs no backbone
        backbone_from_init_adapter(args)
    size = None if args.size is None else (args.size, args.size)
    resize_mode, rank, alpha, targets = args.resize, args.rank, args.alpha, args.targets
    if args.init:
        recipe, notes = inherit_recipe(args.init, size=size, resize_mode=resize_mode, rank=rank, alpha=alpha,
                                       target_pattern=targets)
        for note in notes:
            print(note)
        size, resize_mode = recipe["size"], recipe["resize_mode"]
        rank, alpha, targets = recipe["rank"], recipe["alpha"], recipe["target_pattern"]
    rank = DEFAULT_RANK if rank is None else rank
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    samples = select_samples(args, args.modality, comma_list(args.sites))
    backbone_args = args
    in_chans = args.in_chans or 3
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.output).with_suffix("").with_name(
        Path(args.output).stem + "_run")
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, val_every=args.val_every, patience=args.patience,
        seed=args.seed, checkpoint_every=args.checkpoint_every, precision=precision, device=str(device),
        gradient_checkpointing=args.gradient_checkpointing, prefetch=args.prefetch,
    )
    labels = comma_list(args.labels)
    fit = fit_modality(
        lambda: load_backbone_from_args(backbone_args), samples, args.modality, mode=args.mode, shots=args.shots,
        val_count=args.val, in_chans=in_chans, size=size, resize_mode=resize_mode,
        num_classes=args.classes or (len(labels) if labels else None), label_names=labels,
        expert_config=ExpertConfig(rank=rank, alpha=alpha, target_pattern=targets),
        init_adapter=args.init, train_config=config, out_dir=out_dir, resume=args.resume,
        progress=not args.no_progress, pixel_size=args.pixel_size, cross_validation_folds=args.val_from_shots,
        augment=args.augment,
    )
    rank, _ = distributed_context()
    if rank == 0:
        from ..adapt import save_result

        path = save_result(fit, args.modality, args.output, dtype=args.dtype)
        dice = fit.result.best_val_dice
        if fit.result.steps_done == 0:  # --val-from-shots chose the --init adapter as it is
            kept = "cross-validation kept the starting adapter unchanged (0 steps)"
        elif dice is None:  # --val 0 (or nothing left to validate on): the final weights are the ones saved
            kept = f"no validation images, so the weights after the last step ({fit.result.steps_done}) were saved"
        elif fit.result.best_step == 0:
            kept = f"no step beat the starting adapter (validation Dice {dice:.3f} at step 0): it was saved unchanged"
        else:
            kept = f"best validation Dice {dice:.3f} at step {fit.result.best_step} (those weights were saved)"
        print(
            f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {args.mode}, {fit.provenance['num_labelled_images']}"
            f" training images ({len(fit.train_samples)} samples) / {fit.provenance['num_validation_images']} "
            f"validation images; {kept}; log {out_dir / 'log.csv'}"
        )
    return 0
