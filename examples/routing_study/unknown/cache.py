"""Cache routing thumbnails of every zoo adapter's signature images (dev) and of the 571 held-out images of the
last eval-routing run (runs/routing_zoo_views/routing.csv)."""
import csv, json, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from m4oe_adapters.adapter_file import read_header
from m4oe_adapters.data import read_manifest, read_image
from m4oe_adapters.signatures import image_hash, routing_thumbnails
torch.set_num_threads(1)
samples = read_manifest(Path("/work/shared/data/manifest.csv"), nonempty_slices=True)
by_key = {(str(s.image), s.slice_index): s for s in samples}
hashes = {image_hash(s.image, s.slice_index): s for s in samples}
zoo = Path("adapters_zoo")
index = json.loads((zoo / "index.json").read_text())
def thumb(sample):
    record = read_image(sample.image, slice_axis=getattr(sample, "slice_axis", 2), slice_index=sample.slice_index)
    return routing_thumbnails([record.array])[0]
dev, dev_names = [], []
for entry in index["adapters"]:
    metadata, _ = read_header(zoo / entry["file"])
    for h in metadata["routing"]["image_hashes"]:
        dev.append(thumb(hashes[h])); dev_names.append(entry["modality"])
    print(entry["modality"], len(metadata["routing"]["image_hashes"]), flush=True)
held, held_names, held_sets = [], [], []
for row in csv.DictReader(open("runs/routing_zoo_views/routing.csv")):
    path, _, sl = row["image"].partition("#slice")
    sample = by_key.get((path, int(sl) if sl else None))
    if sample is None:
        continue
    held.append(thumb(sample)); held_names.append(row["expected"]); held_sets.append(row["dataset"])
Path("runs/route_exp5").mkdir(parents=True, exist_ok=True)
np.savez_compressed("runs/route_exp5/thumbs.npz", dev=torch.stack(dev).half().numpy(), dev_names=np.array(dev_names),
                    held=torch.stack(held).half().numpy(), held_names=np.array(held_names), held_sets=np.array(held_sets))
print(len(dev), len(held))
