"""The 100-adapter memory scenario of `m4oe serve-bench` alone (the load test takes minutes more):

    OMP_NUM_THREADS=1 python examples/serve_memory_probe.py [--zoo adapters_zoo] [--adapters 100] [--out FILE]

Writes renamed copies of the zoo's adapters into a temporary folder, then a fresh process measures its resident
memory with the backbone alone, after loading every copy into one service, and after 12 mixed batches of 8 random
modalities (m4oe_adapters/serve/loadtest.py, ``memory_probe``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from m4oe_adapters.serve.loadtest import _memory
from m4oe_adapters.zoo import read_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    zoo = Path(args.zoo)
    files = {entry["modality"]: (zoo / entry["file"]).read_bytes() for entry in read_index(zoo)["adapters"]}
    report = _memory(zoo, files, args.adapters)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
