"""``m4oe inspect FILE``: an adapter file's metadata, tensor count and parameter count."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="print an adapter file's metadata, tensor and parameter counts (any training mode)")
    parser.add_argument("file", help="adapter .safetensors file written by m4oe (any mode)")
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
    from ..adapter_header import inspect_adapter  # torch-free: inspect starts without torch
    from ..reporting import describe_backbone

    report = inspect_adapter(args.file)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    meta = report["metadata"]
    backbone = meta.get("backbone")
    provenance = meta.get("provenance", {})
    mode = meta.get("mode", "experts")
    routing = meta.get("routing")
    lines = [
        f"file            {report['file']} ({report['size_bytes'] / 1e6:.2f} MB, {meta['dtype']})",
        f"format          {meta['format']} v{meta['format_version']}",
        f"mode            {mode}" + ("" if mode in ("experts", "decoder") else " (a baseline, not an expert adapter)"),
        f"modality        {meta['modality']}",
        f"classes         {meta['num_classes']}: {', '.join(meta['label_names'])}",
        f"preset          {json.dumps(meta['preset'])}",
        f"input           {meta['in_chans']} channel(s), {meta['input_size'][0]}x{meta['input_size'][1]} px, "
        f"{provenance.get('resize_mode', 'crop')} mode",
    ]
    if mode in ("experts", "decoder", "lora"):
        expert = meta["expert"]
        layers = f"{report['expert_layers']} layers" if mode != "lora" else "layers"
        lines.append(f"{'experts' if mode != 'lora' else 'lora':<16}rank {expert['rank']}, alpha {expert['alpha']}, "
                     f"{layers} matching {expert['target_pattern']}")
    if backbone is None:
        lines.append(f"network         {json.dumps(meta.get('network', {}))} (trained from scratch, no backbone)")
    else:
        lines += [
            f"backbone        {describe_backbone(backbone['family'], backbone['name'], backbone.get('model_args'))} "
            f"({'pretrained: ' + str(backbone.get('weights')) if backbone.get('pretrained') else 'RANDOM weights'})",
            *backbone_lines(backbone),
            f"fingerprint     {backbone['fingerprint']}",
        ]
    if mode in ("experts", "decoder"):
        parameters = (f"{report['parameters']:,} (experts {report['expert_parameters']:,}, "
                      f"decoder+head {report['decoder_parameters']:,})")
    else:
        parameters = f"{report['parameters']:,} (the {mode} model's stored state)"
    if routing:
        lines.append(f"routing         signature of {routing['images']} images ({report['routing_signature_bytes']:,} "
                     f"bytes), min confidence {routing['min_confidence']:g}")
    lines += [
        f"tensors         {report['tensors']}",
        f"parameters      {parameters}",
        f"provenance      {json.dumps(provenance)}",
        f"metrics         {json.dumps(meta.get('metrics', {}))}",
    ]
    print("\n".join(lines))
    return 0
