"""Exploration: candidate routing features for every image of the zoo's datasets (dev/held-out split as the zoo)."""
import sys, time, random, json
sys.path.insert(0, "/work/main")
import numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
from m4oe_adapters.data import read_manifest, load_pair
from m4oe_adapters.protocol import split_in_domain
from m4oe_adapters import load_backbone
sys.path.insert(0, "/work/main/examples")
from build_zoo import RECIPES, ARCH, MODEL_ARGS

samples = read_manifest("/work/shared/data/manifest.csv")
backbone = load_backbone(ARCH, "/work/main/adapters_zoo/backbone", model_args=MODEL_ARGS, img_size=224)
backbone.eval()
rng = random.Random(0)
items = []  # (adapter or None, role, dataset, site, path, sample)
for name, (datasets, train_site, test_sites, _) in RECIPES.items():
    pool = [s for s in samples if s.dataset in datasets and s.site == train_site]
    dev, test = split_in_domain(pool, 0)
    dev_images = {str(s.image) + str(s.slice_index) for s in dev}
    for s in dev: items.append((name, "dev", s))
    for s in test: items.append((name, "test", s))
    for site in test_sites:
        for s in [s for s in samples if s.site == site and s.dataset in datasets]: items.append((name, "unseen", s))
# extra held-out: full polyp sets (excluding the subset dev frames), and modalities without adapter
dev_keys = {str(s.image) for a, r, s in items if r == "dev"}
seen = {str(s.image) + str(s.slice_index) for a, r, s in items}
kv = [s for s in samples if s.dataset == "Kvasir-SEG" and str(s.image) not in dev_keys]
cv = [s for s in samples if s.dataset == "CVC-ClinicDB"]
import os
subset_names = {os.path.basename(str(s.image)) for a, r, s in items if r == "dev" and a == "endoscopy"}
cv = [s for s in cv if os.path.basename(str(s.image)) not in subset_names]
for s in rng.sample(kv, 150): items.append(("endoscopy", "extra", s))
for s in rng.sample(cv, 150): items.append(("endoscopy", "extra", s))
for s in samples:
    if s.dataset in ("SCT_spinalcord_MRI", "CT_dcmqi_3slice"): items.append((None, "noadapter", s))
print(len(items), "items", flush=True)

def route_norm(raw):
    x = torch.as_tensor(raw, dtype=torch.float32)
    if x.shape[0] == 1: x = x.repeat(3, 1, 1)
    x = x[:3]
    flat = x.reshape(3, -1)
    lo = torch.quantile(flat[:, :: max(1, flat.shape[1] // 200000)], 0.005, dim=1)[:, None, None]
    hi = torch.quantile(flat[:, :: max(1, flat.shape[1] // 200000)], 0.995, dim=1)[:, None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)

def feats(x):  # x [3,H,W] in [0,1]
    out = {}
    for S in (224, 96, 64):
        t = F.interpolate(x[None], size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        t = (t - 0.45) / 0.25
        with torch.no_grad():
            fm = backbone(t)
        out[f"bb{S}_mean"] = torch.cat([f.mean((2, 3)) for f in fm], 1)[0].numpy()
        out[f"bb{S}_std"] = torch.cat([f.std((2, 3)) for f in fm], 1)[0].numpy()
        if S == 224:
            pe = backbone.model.patch_embed(t)  # timm: NHWC
            pe = pe.reshape(-1, pe.shape[-1])
            out["pe224"] = torch.cat([pe.mean(0), pe.std(0)]).numpy()
    g = F.interpolate(x[None], size=(16, 16), mode="area")[0]
    out["thumb"] = g.reshape(-1).numpy()
    return out

records = []
t0 = time.time()
for i, (adapter, role, s) in enumerate(items):
    try:
        raw, mask, meta = load_pair(s)
    except Exception as e:
        print("skip", s.image, e); continue
    f = feats(route_norm(raw))
    records.append({"adapter": adapter, "role": role, "dataset": s.dataset, "site": s.site,
                    "image": str(s.image), "slice": s.slice_index, **f})
    if i % 100 == 0: print(i, time.time() - t0, flush=True)
np.save("/work/main/runs/route_exp/records.npy", records, allow_pickle=True)
print("done", time.time() - t0)
