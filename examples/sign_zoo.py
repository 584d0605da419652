"""Give every zoo adapter its routing signature, fitted on the images it was trained and validated on (the zoo
builder's development split: ``split_in_domain`` with seed 0), without touching its experts, decoder or backbone
binding; then rewrite ``index.json`` with the new file hashes.

    python examples/sign_zoo.py --zoo adapters_zoo [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_zoo import RECIPES  # noqa: E402

from m4oe_adapters.adapter_file import sign_adapter  # noqa: E402
from m4oe_adapters.data import read_manifest  # noqa: E402
from m4oe_adapters.protocol import split_in_domain  # noqa: E402
from m4oe_adapters.signatures import signature_from_samples  # noqa: E402
from m4oe_adapters.zoo import write_index  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    args = parser.parse_args(argv)
    zoo = Path(args.zoo)
    samples = read_manifest(Path(args.data) / "manifest.csv", nonempty_slices=True)
    index_path = zoo / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["adapters"]:
        name = entry["modality"]
        datasets, train_site, _, _ = RECIPES[name]
        pool = [s for s in samples if s.dataset in datasets and s.site == train_site]
        development, _ = split_in_domain(pool, seed=0)  # what build_zoo.py trained and validated on
        signature = signature_from_samples(development, seed=0)
        path = zoo / entry["file"]
        sign_adapter(path, signature, path, overwrite=True)
        print(f"{name}: signature from {signature.images} images ({len(development)} development samples), "
              f"{path.stat().st_size} bytes", flush=True)
    write_index(zoo, index["backbone"], [zoo / entry["file"] for entry in index["adapters"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
