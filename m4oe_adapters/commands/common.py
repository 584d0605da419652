"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import json

from ..errors import ConfigError


def json_mapping(text: str) -> dict:
    """Parse ``--model-args '{"embed_dim": 48}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except ``None``/``False`` ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or "").lower():
            return action.help or ""
        return super()._get_help_string(action)


def threshold_value(text: str) -> float | str:
    """argparse type of ``--threshold``: a number strictly between 0 and 1, or ``otsu``
    (:func:`~m4oe_adapters.inference.parse_threshold`, which the service uses too)."""
    from ..inference import parse_threshold

    try:
        return parse_threshold(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tta`` and ``--threshold``: how ``eval`` and ``predict`` turn an adapter's outputs into masks."""
    parser.add_argument("--tta", choices=["none", "flip", "flips"], default="none",
                        help="test-time augmentation: average the logits over mirrored views (flip: left-right, "
                             "2 passes; flips: left-right, up-down and both, 4 passes)")
    parser.add_argument("--threshold", type=threshold_value, default=None,
                        help="two-class adapters: foreground where its probability exceeds this (0-1) instead of "
                             "the most probable class, or 'otsu': chosen per image from its own probabilities, no "
                             "labels (for images that each hold the structure; it helped at new sites, see the "
                             "README) (default: the most probable class; predict keeps it for adapters of more "
                             "classes, eval refuses them)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, usually the number of cores)")


def apply_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_backbone_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--backbone",
        required=required,
        help="FAMILY:NAME, e.g. timm:swin_tiny_patch4_window7_224, transformers:swin, monai:swin_unetr",
    )
    group.add_argument(
        "--weights",
        required=required,
        help="local checkpoint (file or folder) in the family's native format, or 'none' for random weights",
    )
    group.add_argument("--in-chans", type=int, default=None, help="input channels (default: the checkpoint's)")
    group.add_argument("--img-size", type=int, default=224, help="nominal input size in pixels (multiple of 32)")
    group.add_argument("--model-args", type=json_mapping, default=None, help="architecture arguments as JSON")


def load_backbone_from_args(args: argparse.Namespace):
    from ..backbones import load_backbone

    if args.img_size % 32:
        raise ConfigError(f"--img-size {args.img_size} is not a multiple of 32")
    return load_backbone(
        args.backbone, args.weights, in_chans=args.in_chans, img_size=args.img_size, model_args=args.model_args
    )


def add_runtime_arguments(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device auto|cpu|cuda|mps`` and (for commands that run a model) ``--precision 32|bf16|16``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto",
                       help="auto (CUDA when a GPU is visible, else CPU), cpu, cuda, cuda:N or mps")
    if precision:
        group.add_argument("--precision", default="32", choices=["32", "bf16", "16"],
                           help="arithmetic: fp32, or torch.autocast in bf16 / fp16 (fp16 training uses a gradient "
                                "scaler); parameters and adapter files stay fp32")


def runtime_from_args(args: argparse.Namespace):
    """``(torch.device, precision)`` of :func:`add_runtime_arguments`' options (typed errors for unavailable
    devices)."""
    from ..runtime import check_precision, resolve_device

    return resolve_device(getattr(args, "device", "auto")), check_precision(getattr(args, "precision", "32"))


def backbone_from_init_adapter(args: argparse.Namespace, zoo=None) -> None:
    """``--init ADAPTER`` without ``--backbone``/``--weights``: use the zoo's reference backbone when its
    fingerprint is the one the adapter was trained on; otherwise a :class:`ConfigError` naming the fingerprint
    needed. Fills ``args.backbone``, ``args.weights`` (and ``args.in_chans``) in place; a no-op when both are given."""
    if args.backbone and args.weights:
        return
    if not getattr(args, "init", None):
        raise ConfigError("--backbone and --weights are required (or --init ADAPTER, whose backbone is then used)")
    from ..adapter_file import read_header
    from ..errors import M4oEError
    from ..zoo import backbone_weights, read_index

    metadata, _ = read_header(args.init)
    wanted = metadata["backbone"]
    try:
        reference = read_index(zoo)["backbone"]
        weights = backbone_weights(zoo)
    except M4oEError:
        reference, weights = None, None
    if reference is None or reference.get("fingerprint") != wanted["fingerprint"]:
        raise ConfigError(
            f"{args.init}: trained on backbone {wanted['family']}:{wanted['name']} with fingerprint "
            f"{wanted['fingerprint']} (weights {wanted.get('weights')}), which is not the zoo's reference backbone; "
            "pass --backbone and --weights of that checkpoint"
        )
    args.backbone = args.backbone or reference["spec"]
    args.weights = args.weights or str(weights)
    args.in_chans = args.in_chans or metadata.get("in_chans")


def add_adapter_set_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapter FILE`` (repeat) and ``--zoo FOLDER``, for commands that work on several adapters at once."""
    parser.add_argument("--adapter", action="append", default=[], help="adapter file (repeat)")
    parser.add_argument("--zoo", default=None, help="a zoo folder: every adapter in its index.json")


def adapter_set(args: argparse.Namespace):
    """``(adapter paths, backbone weights)`` of :func:`add_adapter_set_arguments`' options: the ``--adapter`` files,
    then the zoo's, and ``args.weights`` or else the zoo's backbone folder."""
    import json
    from pathlib import Path

    paths = [Path(p) for p in args.adapter]
    weights = getattr(args, "weights", None)
    if args.zoo:
        index = json.loads((Path(args.zoo) / "index.json").read_text())
        paths += [Path(args.zoo) / entry["file"] for entry in index["adapters"]]
        weights = weights or str(Path(args.zoo) / index["backbone"]["path"])
    return paths, weights
