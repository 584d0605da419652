import sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main"); torch.set_num_threads(1)
from m4oe_adapters.data import load_pair
from m4oe_adapters.data import read_manifest
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
samples = {(str(s.image), s.slice_index): s for s in read_manifest("/work/shared/data/manifest.csv")}
out = np.zeros((len(R), 3, 160, 160), np.float16)
for i, r in enumerate(R):
    raw, _, meta = load_pair(samples[(r["image"], r["slice"])])
    x = torch.as_tensor(raw, dtype=torch.float32)
    if x.shape[0] == 1: x = x.repeat(3, 1, 1)
    x = x[:3]
    flat = x.reshape(-1)[:: max(1, x.numel() // 300000)]
    lo, hi = torch.quantile(flat, 0.005), torch.quantile(flat, 0.995)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    out[i] = F.interpolate(x[None], size=(160, 160), mode="bilinear", antialias=True)[0].numpy()
    if i % 200 == 0: print(i, flush=True)
np.save("/work/main/runs/route_exp/thumbs160.npy", out)
print("done")
