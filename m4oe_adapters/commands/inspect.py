"""``m4oe inspect FILE``: an adapter file's metadata, tensor count and parameter count."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print an adapter file's metadata, tensor and parameter counts")
    parser.add_argument("file", help="adapter .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


ARCHITECTURE_KEYS = ("version", "embed_dim", "depths", "num_heads", "window_size", "pretrained_window_sizes", "use_v2")


def backbone_lines(backbone: dict) -> list[str]:
    """Architecture and load report lines (absent from adapters written before they were recorded).

    Values are printed through ``json.dumps`` (control characters escaped), so a file cannot drive the terminal.
    """
    def shown(value) -> str:
        return json.dumps(value, ensure_ascii=True)[:200]

    lines = []
    arch = backbone.get("architecture")
    if isinstance(arch, dict) and arch:
        parts = [f"{key} {shown(arch[key])}" for key in ARCHITECTURE_KEYS if key in arch]
        lines.append(f"architecture    {', '.join(parts)}")
    load = backbone.get("load")
    if isinstance(load, dict):
        line = (
            f"backbone load   {shown(load.get('tensors_from_file'))}/{shown(load.get('tensors_in_backbone'))} "
            f"tensors from {backbone.get('weights')}"
        )
        if load.get("prefix"):
            line += f", prefix {shown(load['prefix'])} removed"
        if load.get("transformed"):
            line += f", {shown(load['transformed'])} transformed"
        lines.append(line)
    return lines


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
        *backbone_lines(backbone),
        f"fingerprint     {backbone['fingerprint']}",
        f"tensors         {report['tensors']}",
        f"parameters      {report['parameters']:,} (experts {report['expert_parameters']:,}, "
        f"decoder+head {report['decoder_parameters']:,})",
        f"provenance      {json.dumps(provenance)}",
        f"metrics         {json.dumps(meta.get('metrics', {}))}",
    ]
    print("\n".join(lines))
    return 0
