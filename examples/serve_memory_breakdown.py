"""Where a served adapter's memory goes: tensor data against Python objects against the rest (issue 15).

    OMP_NUM_THREADS=1 python examples/serve_memory_breakdown.py [--zoo adapters_zoo] [--adapter fundus] [--count 20]

Loads one adapter into a service (the warm-up), then ``--count`` renamed copies of it, and reports per copy: the
file size; the resident memory it added after ``gc.collect()`` + ``malloc_trim(0)``; the bytes of tensor storage it
added (every tensor the garbage collector can reach, each storage once). Then ``--count`` more copies under
``tracemalloc`` (which costs memory of its own, so resident memory is measured in the first round only): the bytes
of Python objects each copy added, by the file that allocated them.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import tracemalloc
from pathlib import Path

import torch

from m4oe_adapters.adapter_file import read_header
from m4oe_adapters.config import DecoderConfig, ExpertConfig
from m4oe_adapters.model import SegmentationModel
from m4oe_adapters.serve import Service, ServeSettings
from m4oe_adapters.serve.loadtest import renamed, resident_mb
from m4oe_adapters.zoo import load_reference_backbone, read_index


def storage_bytes() -> dict[int, int]:
    storages = {}
    for item in gc.get_objects():
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def settle() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="adapters_zoo")
    parser.add_argument("--adapter", default="fundus")
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    zoo = Path(args.zoo)
    entry = next(e for e in read_index(zoo)["adapters"] if e["modality"] == args.adapter)
    raw = (zoo / entry["file"]).read_bytes()
    metadata, _ = read_header(zoo / entry["file"])
    model = SegmentationModel(load_reference_backbone(zoo), ExpertConfig.from_dict(metadata["expert"]),
                              DecoderConfig.from_dict(metadata["decoder"]))
    service = Service(model, ServeSettings(device="cpu"))
    service.add_adapter(renamed(raw, "warmup"), source="warmup")
    resident, storages = settle(), storage_bytes()
    for index in range(args.count):
        service.add_adapter(renamed(raw, f"copy-{index:03d}"), source=str(index))
    resident_added = (settle() - resident) * 2 ** 20 / args.count
    added_storages = {ptr: size for ptr, size in storage_bytes().items() if ptr not in storages}
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for index in range(args.count):
        service.add_adapter(renamed(raw, f"traced-{index:03d}"), source=str(index))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python = after.compare_to(before, "filename")
    top = [{"file": str(stat.traceback[0].filename).split("site-packages/")[-1], "bytes_per_adapter":
            round(stat.size_diff / args.count)} for stat in python[:6]]
    file_bytes = len(raw)
    report = {
        "adapter": args.adapter, "copies": args.count, "file_bytes": file_bytes,
        "tensor_storage_per_adapter": round(sum(added_storages.values()) / args.count),
        "tensors_per_adapter": round(len(added_storages) / args.count),
        "python_objects_per_adapter": round(sum(stat.size_diff for stat in python) / args.count),
        "resident_per_adapter": round(resident_added),
        "python_objects_by_file": top,
    }
    for key in ("tensor_storage_per_adapter", "python_objects_per_adapter", "resident_per_adapter"):
        report[key.replace("_per_adapter", "_over_file")] = round(report[key] / file_bytes, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
