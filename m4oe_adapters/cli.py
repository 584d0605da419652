"""The ``m4oe`` command line: a thin layer over the Python API.

Each subcommand lives in ``m4oe_adapters/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a function of the parsed arguments returning an exit code. Library errors
(:class:`~m4oe_adapters.errors.M4oEError`) are printed as one line, ``m4oe: error: ...``, with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import M4oEError

COMMANDS = ("inspect", "train", "eval", "predict", "pretrain", "bench", "zoo", "demo", "export-peft", "import-peft",
            "backbone", "sign", "eval-routing", "train-gate", "serve", "serve-bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m4oe",
        description="Modality experts (LoRA mixture-of-experts) on one frozen Swin backbone.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name.replace('-', '_')}", __package__)
        except ModuleNotFoundError as error:
            if error.name and error.name.endswith(name.replace("-", "_")):
                continue  # command not built yet
            raise
        module.register(subparsers)
    from .commands.common import HelpFormatter

    for subparser in subparsers.choices.values():  # every --help shows the defaults
        subparser.formatter_class = HelpFormatter
        for action in subparser._actions:  # argparse prints nothing, not even the default, for an option without help
            if action.help is None and action.option_strings and action.default is not None and action.default is not False:
                action.help = "(default: %(default)s)"
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Deprecation notices of dependencies (MONAI, timm...) are for this package's developers, not its users.
    for module in ("monai", "timm", "torch", "transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=rf"{module}(\.|$)")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports quote the exact command
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        from .commands.common import apply_threads

        apply_threads(args)  # every command that computes takes --threads
        return int(args.func(args) or 0)
    except M4oEError as error:
        print(f"m4oe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m4oe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
