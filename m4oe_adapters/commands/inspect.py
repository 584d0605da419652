"""``m4oe inspect FILE``: an adapter file's metadata, tensor count and parameter count."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print an adapter file's metadata, tensor and parameter counts")
    parser.add_argument("file", help="adapter .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import inspect_adapter
    from ..reporting import describe_backbone

    report = inspect_adapter(args.file)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["metadata"]
    backbone = meta["backbone"]
    provenance = meta.get("provenance", {})
    lines = [
        f"file            {report['file']} ({report['size_bytes'] / 1e6:.2f} MB, {meta['dtype']})",
        f"format          {meta['format']} v{meta['format_version']}",
        f"modality        {meta['modality']}",
        f"classes         {meta['num_classes']}: {', '.join(meta['label_names'])}",
        f"preset          {json.dumps(meta['preset'])}",
        f"input           {meta['in_chans']} channel(s), {meta['input_size'][0]}x{meta['input_size'][1]} px",
        f"experts         rank {meta['expert']['rank']}, alpha {meta['expert']['alpha']}, "
        f"{report['expert_layers']} layers matching {meta['expert']['target_pattern']}",
        f"backbone        {describe_backbone(backbone['family'], backbone['name'], backbone.get('model_args'))} "
        f"({'pretrained: ' + str(backbone.get('weights')) if backbone.get('pretrained') else 'RANDOM weights'})",
        f"fingerprint     {backbone['fingerprint']}",
        f"tensors         {report['tensors']}",
        f"parameters      {report['parameters']:,} (experts {report['expert_parameters']:,}, "
        f"decoder+head {report['decoder_parameters']:,})",
        f"provenance      {json.dumps(provenance)}",
        f"metrics         {json.dumps(meta.get('metrics', {}))}",
    ]
    print("\n".join(lines))
    return 0
