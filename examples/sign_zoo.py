"""Refit every zoo adapter's routing signature without touching its experts, decoder or backbone binding, then
rewrite ``index.json`` with the new file hashes.

    python examples/sign_zoo.py --zoo adapters_zoo [--data ../shared/data] [--broaden]

Each signature is refitted on the images it was fitted on before (found by the content hashes the file stores: the
zoo builder's development split, what the adapter trained and validated on, and any unlabelled images an earlier
``--broaden`` added), so running it again after a change to the signature fitting refits the same images. With
``--broaden``, unlabelled images of more of the modality are added where one site's few images made the signature
too narrow (measured in the README, "A new site's unlabelled images fix its routing"):

* fundus: CHASE_DB1 children 01–07 (14 images; children 08–14 stay out, for testing);
* endoscopy: nothing since 2026-11-28: the adapter trains on both polyp sets and its signature is fitted on its own
  CVC-ClinicDB training frames (README, "Image-level routing"). Its CVC-ClinicDB-only predecessor was broadened with
  the frames of that recipe's development sequences (``split_in_domain`` of CVC-ClinicDB alone, seed 0), which would
  now include frames the new adapter is tested on.

No label is read, and the added images are recorded in the file (``routing.image_hashes``), so evaluations skip
them.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from m4oe_adapters.adapter_file import read_header, sign_adapter
from m4oe_adapters.data import read_manifest
from m4oe_adapters.signatures import image_hash, signature_from_samples
from m4oe_adapters.zoo import write_index


def broader(name: str, samples) -> list:
    """The unlabelled images ``--broaden`` adds to adapter ``name`` (see the module docstring)."""
    if name == "fundus":
        return [s for s in samples if s.dataset == "CHASE_DB1" and int(Path(s.image).stem.split("_")[1][:2]) <= 7]
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--data", default=os.environ.get("M4OE_DATA", "../shared/data"))
    parser.add_argument("--broaden", action="store_true", help="add the unlabelled images listed in the docstring")
    args = parser.parse_args(argv)
    zoo = Path(args.zoo)
    samples = read_manifest(Path(args.data) / "manifest.csv", nonempty_slices=True)
    hashes = [image_hash(s.image, s.slice_index) for s in samples]
    index = json.loads((zoo / "index.json").read_text())
    for entry in index["adapters"]:
        name, path = entry["modality"], zoo / entry["file"]
        metadata, _ = read_header(path)
        wanted = set(metadata["routing"]["image_hashes"])  # what it was signed on (unlabelled additions included)
        own = [s for s, h in zip(samples, hashes) if h in wanted]
        found = {h for h in hashes if h in wanted}
        if found != wanted:
            raise SystemExit(f"{path}: {len(wanted - found)} of its signature's images are not in {args.data}")
        extra = [s for s in broader(name, samples) if image_hash(s.image, s.slice_index) not in wanted] \
            if args.broaden else []
        signature = signature_from_samples(own + extra, seed=0)
        sign_adapter(path, signature, path, overwrite=True)
        print(f"{name}: signature from {signature.images} images ({len(found)} it was signed on before"
              f"{f', {signature.images - len(found)} unlabelled added' if extra else ''}), {path.stat().st_size} bytes",
              flush=True)
    write_index(zoo, index["backbone"], [zoo / entry["file"] for entry in index["adapters"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
