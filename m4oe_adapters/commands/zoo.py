"""``m4oe zoo list | info NAME | verify``: the reference backbone and adapters shipped in ``adapters_zoo/``."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="list, describe or verify the shipped adapters")
    parser.add_argument("action", choices=["list", "info", "verify"])
    parser.add_argument("name", nargs="?", help="modality or file name (for info)")
    parser.add_argument("--zoo", default=None, help="zoo folder (default: adapters_zoo/ of this checkout)")
    parser.set_defaults(func=run)


def reference_backbone_name(zoo, entry: dict) -> str:
    """The spec with the architecture the backbone folder's ``config.json`` records (a JSON read, no model)."""
    from pathlib import Path

    from ..reporting import describe_backbone
    from ..zoo import default_zoo

    family, _, name = entry["spec"].partition(":")
    config = Path(zoo or default_zoo()) / entry["path"] / "config.json"
    try:
        model_args = json.loads(config.read_text()).get("model_args")
    except (OSError, ValueError, AttributeError):
        model_args = None
    return describe_backbone(family, name, model_args)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..zoo import read_index, verify

    index = read_index(args.zoo)
    if args.action == "list":
        backbone = index["backbone"]
        print(f"backbone  {reference_backbone_name(args.zoo, backbone)}  {backbone['path']}  fingerprint {backbone['fingerprint'][:12]}  "
              f"({backbone.get('description', '')})")
        print(f"{'modality':<22}{'file':<36}{'MB':>6}  {'val Dice':>8}  {'unseen-site Dice':>16}  labels")
        for entry in index["adapters"]:
            metrics = entry.get("metrics", {})
            val = metrics.get("val_dice")
            unseen = metrics.get("unseen_site_dice")
            print(f"{entry['modality']:<22}{entry['file']:<36}{entry['size_bytes'] / 1e6:>6.2f}  "
                  f"{'' if val is None else f'{val:.3f}':>8}  {'' if unseen is None else f'{unseen:.3f}':>16}  "
                  f"{','.join(entry['labels'])}")
        return 0
    if args.action == "info":
        matches = [e for e in index["adapters"] if args.name in (e["modality"], e["file"])]
        if not matches:
            raise ConfigError(f"no zoo adapter named {args.name!r}; see 'm4oe zoo list'")
        print(json.dumps(matches[0], indent=2))
        return 0
    results = verify(args.zoo)
    for result in results:
        print(f"{'OK ' if result['ok'] else 'BAD'} {result['file']}" + (f": {result['problem']}" if result["problem"] else ""))
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)} ok, {len(bad)} bad")
    return 1 if bad else 0
