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
