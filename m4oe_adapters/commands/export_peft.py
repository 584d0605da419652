"""``m4oe export-peft ADAPTER OUT``: a modality's backbone experts as a standard PEFT LoRA folder."""
from __future__ import annotations

import argparse

from .common import add_backbone_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("export-peft", help="export an adapter's backbone experts as a PEFT LoRA folder")
    parser.add_argument("adapter", help="adapter .safetensors file")
    parser.add_argument("out", help="folder to write (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write the two PEFT files into an existing folder that holds other files (kept)")
    add_backbone_arguments(parser, required=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import model_from_adapter, read_header
    from ..peft_interop import export_peft

    metadata, _ = read_header(args.adapter)
    model = model_from_adapter(args.adapter, args.weights)
    folder = export_peft(model, metadata["modality"], args.out, overwrite=args.overwrite)
    print(f"wrote {folder} (load with peft.PeftModel.from_pretrained(<{metadata['backbone']['family']} backbone>, ...))")
    return 0
