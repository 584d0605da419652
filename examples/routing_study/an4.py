import sys, numpy as np, torch, torch.nn.functional as F, collections
torch.set_num_threads(1); torch.manual_seed(0)
R = list(np.load("/work/main/runs/route_exp/records.npy", allow_pickle=True))
T = torch.from_numpy(np.load("/work/main/runs/route_exp/thumbs160.npy").astype(np.float32))
ADAPTERS = sorted({r["adapter"] for r in R if r["adapter"]})
lab = np.array([r["adapter"] or "none" for r in R]); role = np.array([r["role"] for r in R])
SOBX = torch.tensor([[-1., 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None] / 8
def renorm(x):
    B = x.shape[0]; flat = x.reshape(B, -1)
    lo = torch.quantile(flat, 0.005, dim=1).view(B, 1, 1, 1); hi = torch.quantile(flat, 0.995, dim=1).view(B, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
def hist(v, edges):
    return torch.stack([((v >= edges[i]) & (v < edges[i + 1])).float().mean(tuple(range(1, v.dim()))) for i in range(len(edges) - 1)], 1)
def hand(x):
    B = x.shape[0]; grey = x.mean(1, keepdim=True); chroma = x - grey
    mx, mn = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
    sat = (mx - mn) / mx.clamp_min(1e-3)
    lit = (grey > 0.1).float()
    f = [chroma.abs().mean((1, 2, 3))[:, None], chroma.mean((2, 3)), chroma.std((2, 3)),
         (grey < 0.05).float().mean((1, 2, 3))[:, None], (grey > 0.95).float().mean((1, 2, 3))[:, None],
         F.adaptive_avg_pool2d(grey, 4).reshape(B, -1), F.adaptive_avg_pool2d((grey < 0.05).float(), 4).reshape(B, -1),
         hist(grey, torch.linspace(0, 1.0001, 11))]
    # colour of lit pixels: normalised rg chromaticity, saturation histogram, specular highlights
    s = x.sum(1, keepdim=True).clamp_min(1e-3)
    w = lit / lit.sum((2, 3), keepdim=True).clamp_min(1)
    f += [((x / s) * w).sum((2, 3)), hist(torch.where(lit > 0, sat, torch.full_like(sat, -1)), torch.tensor([0, .1, .2, .35, .5, .7, 1.01])),
          ((grey > 0.9) & (sat < 0.2)).float().mean((1, 2, 3))[:, None]]
    for g in (grey, F.avg_pool2d(grey, 2), F.avg_pool2d(grey, 4)):
        gx = F.conv2d(g, SOBX, padding=1); gy = F.conv2d(g, SOBX.transpose(2, 3), padding=1)
        mag = (gx ** 2 + gy ** 2).sqrt()[..., 2:-2, 2:-2]
        f.append(hist(mag, torch.tensor([0, .005, .01, .02, .04, .08, .16, 10.])))
        lv = F.avg_pool2d(g ** 2, 5, 1) - F.avg_pool2d(g, 5, 1) ** 2
        f.append(lv.clamp_min(0).sqrt().mean((1, 2, 3))[:, None])
    return torch.cat(f, 1)
def augment(x, g):
    B = x.shape[0]; out = []
    for i in range(B):
        s = float(torch.empty(1).uniform_(0.6, 1.0, generator=g)); a = float(torch.empty(1).uniform_(0.8, 1.25, generator=g))
        h = int(min(160, 160 * (s * a) ** .5)); w = int(min(160, 160 * (s / a) ** .5))
        t = int(torch.randint(0, 161 - h, (1,), generator=g)); l = int(torch.randint(0, 161 - w, (1,), generator=g))
        y = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(160, 160), mode="bilinear")
        if torch.rand(1, generator=g) < 0.5: y = y.flip(-1)
        gain = torch.empty(1, 3, 1, 1).uniform_(0.9, 1.1, generator=g) if x[i, 0].ne(x[i, 1]).any() else 1.0
        y = (y * gain).clamp(0, 1) ** float(torch.empty(1).uniform_(0.7, 1.4, generator=g))
        y = y * float(torch.empty(1).uniform_(0.8, 1.2, generator=g)) + float(torch.empty(1).uniform_(-0.1, 0.1, generator=g))
        if torch.rand(1, generator=g) < 0.3: y = F.interpolate(F.avg_pool2d(y, 2), size=(160, 160), mode="bilinear")
        out.append(y)
    return renorm(torch.cat(out))
def feats(x): return torch.cat([hand(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy()
G = torch.Generator().manual_seed(0)
VIEWS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
import os
CACHE='/work/main/runs/route_exp/an4cache.npy'
Xall = feats(T)
fitsets = {}
for a in ADAPTERS:
    idx = np.where((lab == a) & (role == "dev"))[0]
    views = [Xall[idx]] + [feats(augment(T[idx], G)) for _ in range(VIEWS)]
    fitsets[a] = (np.stack(views, 1), idx)  # [n, V+1, D]
np.save(CACHE, {'X': Xall, 'fit': fitsets}, allow_pickle=True)
class Diag:
    def fit(self, X):
        self.mu = X.mean(0); v = X.var(0); self.var = v + 0.05 * np.median(v) + 1e-8; return self
    def score(self, X): return (((X - self.mu) ** 2) / self.var).mean(1)
fits, calib = {}, {}
for a, (V, idx) in fitsets.items():
    n = len(V); fits[a] = Diag().fit(V.reshape(-1, V.shape[-1]))
    perm = np.random.RandomState(0).permutation(n); cs = []
    for f in range(5):
        te = perm[f::5]; tr = np.setdiff1d(perm, te)
        m = Diag().fit(V[tr].reshape(-1, V.shape[-1])); cs.append(m.score(V[te].reshape(-1, V.shape[-1])))
    calib[a] = np.sort(np.concatenate(cs))
def conf(a, s):
    c = calib[a]; q90, q99 = np.quantile(c, .9), np.quantile(c, .99)
    p = np.array([(c >= x).mean() for x in s])
    tail = 0.01 * np.exp(-(s - q99) / max(q99 - q90, 1e-6) * np.log(10))
    return np.where(s > q99, np.minimum(tail, 0.01), np.maximum(p, 0.01))
E = np.where(role != "dev")[0]
S = np.stack([fits[a].score(Xall[E]) for a in ADAPTERS], 1)
Nrm = S / np.array([np.quantile(calib[a], .9) for a in ADAPTERS])[None]
C = np.stack([conf(a, S[:, j]) for j, a in enumerate(ADAPTERS)], 1)
truth = np.array([ADAPTERS.index(l) if l != "none" else -1 for l in lab[E]]); known = truth >= 0
best = Nrm.argmin(1)
print("top1", (best[known] == truth[known]).mean())
per = collections.Counter(); tot = collections.Counter()
for i in np.where(known)[0]:
    k = (ADAPTERS[truth[i]], R[E[i]]["dataset"]); tot[k] += 1; per[k] += best[i] == truth[i]
print({k: f"{per[k]}/{tot[k]}" for k in tot})
for t in (0.01, 0.001, 1e-4):
    chosen_conf = C[np.arange(len(E)), best]
    frr = (chosen_conf[known] < t).mean()
    loo = []; det = {}
    for j, a in enumerate(ADAPTERS):
        fl = np.delete(C[truth == j], j, 1).max(1) < t; loo.append(fl); det[a] = round(fl.mean(), 2)
    print(f"t={t}: FRR {frr:.3f} LOO {np.concatenate(loo).mean():.3f} noadapter-unk {(C[~known].max(1) < t).mean():.2f}", det)
    frr_d = collections.Counter(); 
    for i in np.where(known & (chosen_conf < t))[0]: frr_d[R[E[i]]["dataset"]] += 1
    print("   FR by dataset", dict(frr_d))
